"""What quantizing one block costs, measured on one block of the architecture with the method itself.

FLOPs are counted, not guessed: `torch.utils.flop_counter` on a meta-device copy (shapes only, no numbers) counts
every matmul and attention product of an fp block forward per pool row and of one fit step (the student's forward
and backward at the fit's batch, with whatever layers the method prepared: a soft VQ weight's mixing included).
Time is measured: the method quantizes a block of random weights through the ordinary `quantize_block` on a few
synthetic rows, with a few fit steps timed by a Trainer callback; what the run spends outside the steps (k-means,
GPTQ, Trainer set-up, hardening) is the block's fixed time. The rows it touched are counted too (block errors on
held-out rows, layer-input passes over training rows), so a caller scales them to the real pool. Memory is read
off the objects the method built: the prepared layers, their gradients, the optimizer's state, and the tensors
autograd saves for backward in one step. Nothing here asks which method it runs.
"""

import copy
import statistics
import time
import warnings
from dataclasses import dataclass, replace
from functools import partial

import lightning as L
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from vq4dit.calibration.block_calibration import BlockCalibration
from vq4dit.calibration.pipeline import BlockTrainers, quantize_block
from vq4dit.methods.base import FitSettings, Method
from vq4dit.methods.block_data import BlockData
from vq4dit.precision import autocast

META = torch.device("meta")
FORWARD_BUDGET = 2e11  # FLOPs of the timed forward chunk at most (DiT-XL/2: 23 rows, 1 to 5 s on a CPU)


@dataclass
class BlockCost:
    row_flops: float            # fp block forward, per pool row
    step_flops: float           # one fit step (student forward + backward at the fit's batch); 0 without a fit
    step_bytes: float           # memory traffic of one fit step: every op's inputs and outputs (unfused: an upper
                                # bound), the soft weights' gathers and the optimizer's update included
    row_seconds: float          # measured: fp block forward per row, in chunks as the pool runs it
    step_seconds: float         # measured: one fit step (optimizer, the method's hooks and Lightning included)
    fixed_seconds: float        # measured: everything of a block's quantization that is not a step or a row pass
    train_passes: int           # forward passes over the training rows the method made (GPTQ's Hessians: 1)
    heldout_passes: int         # block errors on the held-out rows (start, result, hardening ...)
    block_bytes: int            # the fp block's parameters and buffers
    student_bytes: int          # the layers the method trains or builds (parameters and buffers)
    gradient_bytes: int
    optimizer_bytes: int
    saved_bytes: int            # tensors autograd saves for backward in one step (fp32 count)
    peak_bytes: int | None      # CUDA: measured peak of the short run

    @property
    def forward_tflops(self) -> float:
        return self.row_flops / self.row_seconds / 1e12

    @property
    def step_tflops(self) -> float:
        return self.step_flops / self.step_seconds / 1e12 if self.step_seconds else 0.0


class _CountingData(BlockData):
    """BlockData that counts the passes the method makes over its rows."""

    train_passes: int = 0
    heldout_passes: int = 0

    def heldout_mse(self, block, device=None):
        self.heldout_passes += 1
        return super().heldout_mse(block, device)

    def observe_inputs(self, *args, **kwargs):
        self.train_passes += 1
        return super().observe_inputs(*args, **kwargs)


class StepTimer(L.Callback):
    """Times the fit's steps (start to start, so the method's per-step hooks are in) and keeps the fitted module."""

    def __init__(self, device: torch.device):
        self.device, self.starts, self.end, self.module, self.optimizer_bytes = device, [], 0.0, None, 0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(self._now())

    def on_train_end(self, trainer, pl_module):
        self.end, self.module = self._now(), pl_module
        self.optimizer_bytes = sum(_nbytes(v) for opt in trainer.optimizers for state in opt.state.values()
                                   for v in state.values() if isinstance(v, torch.Tensor))


def measure_block(block: nn.Module, tokens: int, num_classes: int, method: Method, fit: FitSettings,
                  device: torch.device, precision: str = "fp32", steps: int = 3, seed: int = 0,
                  trainer: partial | None = None) -> BlockCost:
    """Quantize a copy of `block` (random weights are as good as real ones for cost) with `method` on
    `fit.batch_size` synthetic rows of `tokens` tokens, timing `steps` fit steps after a warm-up step."""
    block = copy.deepcopy(block).to(device).eval().requires_grad_(False)
    row_flops = forward_flops(block, tokens)
    # forward passes run in chunks of up to 256 rows (the pool's); fewer where a chunk would take long to time
    chunk = max(fit.batch_size, min(256, int(FORWARD_BUDGET // row_flops)))
    row_seconds = forward_seconds_per_row(block, synthetic_rows(chunk, tokens, _width(block), num_classes, seed),
                                          device, precision)
    rows = fit.batch_size
    x, t, y = synthetic_rows(rows, tokens, _width(block), num_classes, seed)
    with torch.no_grad(), autocast(device, precision):
        target = block(x.to(device), timestep=t.to(device), class_labels=y.to(device)).float().cpu()
    data = _CountingData(block, 0, (x, t, y, target), (x, t, y, target), device, seed, precision=precision)
    timer = StepTimer(device)
    trainers = BlockTrainers(device, None, trainer or partial(L.Trainer, enable_model_summary=False), precision)
    short = replace(fit, iterations=steps + 2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_block(method, data, short, lambda **kw: trainers(callbacks=[timer], enable_progress_bar=False, **kw))
    total = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    step_seconds = statistics.median(b - a for a, b in zip(timer.starts[1:], timer.starts[2:])) if method.fits else 0.0
    fixed = total - (timer.end - timer.starts[0]) if method.fits else total
    fixed -= data.heldout_passes * rows * row_seconds + data.train_passes * rows * row_seconds  # scaled by the caller
    student = _Counts()
    if method.fits:
        student = _count_step(timer.module, (x, t, y, target))
    return BlockCost(row_flops=row_flops, step_flops=student.flops, step_bytes=student.moved_bytes,
                     row_seconds=row_seconds,
                     step_seconds=step_seconds, fixed_seconds=max(fixed, 0.0), train_passes=data.train_passes,
                     heldout_passes=data.heldout_passes, block_bytes=_module_bytes(block),
                     student_bytes=student.layer_bytes, gradient_bytes=student.gradient_bytes,
                     optimizer_bytes=timer.optimizer_bytes, saved_bytes=student.saved_bytes, peak_bytes=peak)


def forward_flops(module: nn.Module, tokens: int, blocks_input: bool = True) -> float:
    """FLOPs of one row through `module` (a DiT block, or a transformer with blocks_input=False), counted on a
    meta copy."""
    meta = copy.deepcopy(module).to(META)
    t, y = torch.zeros(1, dtype=torch.long, device=META), torch.zeros(1, dtype=torch.long, device=META)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        if blocks_input:
            meta(torch.zeros(1, tokens, _width(meta), device=META), timestep=t, class_labels=y)
        else:
            c, size = meta.config.in_channels, meta.config.sample_size
            meta(torch.zeros(1, c, size, size, device=META), timestep=t, class_labels=y)
    return float(counter.get_total_flops())


def forward_seconds_per_row(block: nn.Module, rows: tuple, device: torch.device, precision: str,
                            min_seconds: float = 0.3) -> float:
    """Measured seconds per row of an fp block forward in `precision` (after a warm-up call)."""
    x, t, y = (r.to(device) for r in rows)
    run = lambda: block(x, timestep=t, class_labels=y)  # noqa: E731
    with torch.no_grad(), autocast(device, precision):
        run()
        calls, start = 0, time.perf_counter()
        while True:
            run()
            calls += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds or calls >= 20:
                return elapsed / (calls * len(x))


class _BytesMoved(TorchDispatchMode):
    """Counts the bytes every (non-view) op reads and writes."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.total += sum(_nbytes(t) for t in tensors)
        return out


@dataclass
class _Counts:
    flops: float = 0.0
    moved_bytes: float = 0.0
    layer_bytes: int = 0
    gradient_bytes: int = 0
    saved_bytes: int = 0


def _count_step(module: BlockCalibration, batch: tuple) -> _Counts:
    """FLOPs and saved-for-backward bytes of one training step of `module`'s student, on a meta copy."""
    student = copy.deepcopy(module.student).to(META)
    layers = {name: student.get_submodule(name) for name in module.layers}
    meta = BlockCalibration(student, layers, module.method, module.fit_settings, module.data, module.mse_scale)
    saved = []

    def pack(tensor):
        saved.append(_nbytes(tensor))
        return tensor

    optimizer = meta.configure_optimizers()
    with warnings.catch_warnings(), FlopCounterMode(display=False) as counter, _BytesMoved() as moved:
        warnings.simplefilter("ignore")  # self.log() outside a Trainer
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = meta.training_step(tuple(b.to(META) for b in batch), 0)
        loss.backward()
        optimizer.step()
    trainable = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
    return _Counts(float(counter.get_total_flops()), float(moved.total),
                   sum(_module_bytes(layer) for layer in layers.values()), sum(_nbytes(p) for p in trainable),
                   sum(saved))


def synthetic_rows(rows: int, tokens: int, width: int, num_classes: int, seed: int):
    """(hidden states, timesteps, labels) of `rows` random block inputs."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, tokens, width, generator=g), torch.randint(0, 1000, (rows,), generator=g),
            torch.randint(0, num_classes + 1, (rows,), generator=g))  # the null label too


def _width(block: nn.Module) -> int:
    return block.norm1.linear.in_features


def _module_bytes(module: nn.Module) -> int:
    return sum(_nbytes(t) for t in list(module.parameters()) + list(module.buffers()))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
