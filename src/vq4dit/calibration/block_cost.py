"""What quantizing one block costs, measured on one block of the architecture with the method itself.

The method quantizes a block of random weights (as good as real ones for cost) through the ordinary
`quantize_block` on a few synthetic rows, in a short fit whose schedule is the real one shortened (so a method's
later, cheaper steps, such as VQ4DiT's hard codes, are among its steps); a Trainer callback marks every step. What
the run spends outside the steps and the row passes (k-means, GPTQ, Trainer set-up) is the block's set-up. The
rows it touched are counted (block errors on held-out rows, layer-input passes over training rows), so a caller
scales them to the real pool. After it: the quantized block's forward per row, a step of its deployed layers'
float parameters (the model-level fit's share of each block) and what saving the block takes.

All of it is timed, or with `count=True` counted instead (`Work`: matmul and attention FLOPs by
`torch.utils.flop_counter`'s formulas, bytes every op reads and writes, ops), set-up and steps apart, for a machine
this is not. The fp block forward's FLOPs per row are counted on a meta-device copy (shapes only). Memory is read
off the objects the method built: the layers it trains, their gradients, the optimizer's state, and the tensors
autograd saves for the first step's backward. Nothing here asks which method it runs.
"""

import copy
import statistics
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from vq4dit.calibration.block_calibration import BlockCalibration
from vq4dit.calibration.model_fit import trainable_parameters
from vq4dit.calibration.pipeline import BlockTrainers, quantize_block
from vq4dit.calibration.settings import ModelFitSettings
from vq4dit.methods.base import FitSettings, Method
from vq4dit.methods.block_data import BlockData, with_layers
from vq4dit.precision import autocast
from vq4dit.quant.checkpoint import stored_state, tensor_digests

META = torch.device("meta")
FORWARD_BUDGET = 2e11  # FLOPs of the timed forward chunk at most (DiT-XL/2: 23 rows, 1 to 5 s on a CPU)


@dataclass
class Work:
    """What some ops ask of a machine, counted: matmul and attention FLOPs, the bytes every op reads and writes
    (unfused: an upper bound), and the ops themselves (a GPU launches a kernel for each)."""

    flops: float = 0.0
    bytes: float = 0.0
    ops: float = 0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.bytes + other.bytes, self.ops + other.ops)

    def __sub__(self, other: "Work") -> "Work":
        return Work(self.flops - other.flops, self.bytes - other.bytes, self.ops - other.ops)

    def __mul__(self, times: float) -> "Work":
        return Work(self.flops * times, self.bytes * times, self.ops * times)

    def device_seconds(self, tflops: float, tbps: float | None) -> float:
        """On a device that sustains `tflops` TFLOP/s and `tbps` TB/s (None: bytes left out)."""
        return self.flops / tflops / 1e12 + (self.bytes / tbps / 1e12 if tbps else 0.0)

    def seconds(self, tflops: float, tbps: float | None, op_seconds: float) -> float:
        """The longer of the device's work and the host's (`op_seconds` per op: Python, dispatch, launch)."""
        return max(self.device_seconds(tflops, tbps), self.ops * op_seconds)


class WorkCounter(TorchDispatchMode):
    """Counts the `Work` of every (non-view) op run under it, on any device, meta included. `work` only grows: a
    stretch of the run is the difference of two snapshots."""

    def __init__(self):
        super().__init__()
        self.work = Work()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not func.is_view:
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.work.flops += formula(*args, **kwargs, out_val=out)
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.work.bytes += sum(_nbytes(t) for t in tensors)
            self.work.ops += 1
        return out

    def snapshot(self) -> Work:
        return replace(self.work)


@dataclass
class BlockCost:
    row_flops: float            # fp block forward, per pool row
    step_flops: float           # one fit step (student forward + backward at the fit's batch); 0 without a fit
    step_bytes: float           # memory traffic of one fit step: every op's inputs and outputs (unfused: an upper
                                # bound), the soft weights' gathers and the optimizer's update included
    row_seconds: float          # measured: fp block forward per row, in chunks as the pool runs it
    step_seconds: float         # measured: a fit step, the mean over the short fit (its hooks and Lightning in)
    fixed_seconds: float        # measured: everything of a block's quantization that is not a step or a row pass
    train_passes: int           # forward passes over the training rows the method made (GPTQ's Hessians: 1)
    heldout_passes: int         # block errors on the held-out rows (start, result, hardening ...)
    block_bytes: int            # the fp block's parameters and buffers
    student_bytes: int          # the layers the method trains or builds (parameters and buffers)
    gradient_bytes: int
    optimizer_bytes: int
    saved_bytes: int            # tensors autograd saves for backward in one step (fp32 count)
    peak_bytes: int | None      # CUDA: measured peak of the short run
    quantized_row_seconds: float = 0.0   # measured: the quantized block's forward per row (not when counted)
    deployed_step_seconds: float = 0.0   # measured: a step of the deployed layers' float parameters (model fit)
    save_seconds: float = 0.0            # measured: the quantized block into its checkpoint form, digests, bytes
    save_bytes: int = 0                  # its checkpoint bytes
    setup_work: Work | None = None       # counted (count=True): the set-up (what fixed_seconds times),
    step_work: Work | None = None        # the mean fit step of the short fit,
    deployed_step_work: Work | None = None  # and the deployed layers' step

    @property
    def forward_tflops(self) -> float:
        return self.row_flops / self.row_seconds / 1e12

    @property
    def step_tflops(self) -> float:
        return self.step_flops / self.step_seconds / 1e12 if self.step_seconds else 0.0


class StepTimer(L.Callback):
    """Marks the start of every fit step and the fit's end (`starts`, `end`: seconds; `counts`: the counter's work at
    each mark, with a counter) and looks into the first step, a warm-up: the layers it trains, the tensors autograd
    saves for its backward and, without a counter, its work (`first_work`)."""

    def __init__(self, device: torch.device, counter: WorkCounter | None = None):
        self.device, self.counter = device, counter
        self.starts, self.end, self.counts, self.fitting = [], 0.0, [], False
        self.layer_bytes = self.gradient_bytes = self.saved_bytes = self.optimizer_bytes = 0
        self.first_work, self._watching = None, []

    def now(self) -> tuple[float, Work]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter(), self.counter.snapshot() if self.counter is not None else Work()

    def step(self) -> int | None:
        """The index of the fit step running now; None outside the fit."""
        return len(self.starts) - 1 if self.fitting else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._stop_watching()
        seconds, work = self.now()
        self.starts.append(seconds)
        self.counts.append(work)
        self.fitting = True
        if len(self.starts) == 1:
            self._watch(pl_module)

    def on_train_end(self, trainer, pl_module):
        self._stop_watching()
        (self.end, work), self.fitting = self.now(), False
        self.counts.append(work)
        self.optimizer_bytes = sum(_nbytes(v) for opt in trainer.optimizers for state in opt.state.values()
                                   for v in state.values() if isinstance(v, torch.Tensor))

    def _watch(self, module: BlockCalibration) -> None:
        layers = list(module.layers.values())
        self.layer_bytes = sum(_module_bytes(layer) for layer in layers)
        self.gradient_bytes = sum(_nbytes(p) for layer in layers for p in layer.parameters() if p.requires_grad)

        def pack(tensor):
            self.saved_bytes += _nbytes(tensor)
            return tensor

        # entered here and left at the next step's start: the hooks see the whole step
        self._watching = [torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)]
        if self.counter is None:
            self._watching.append(WorkCounter())
        for context in self._watching:
            context.__enter__()

    def _stop_watching(self) -> None:
        for context in reversed(self._watching):
            context.__exit__(None, None, None)
            if isinstance(context, WorkCounter):
                self.first_work = context.work
        self._watching = []


class _CountingData(BlockData):
    """BlockData that counts the passes the method makes over its rows, and keeps what each took and in which fit
    step (None: outside the fit), so that the steps and the set-up are told apart from them."""

    train_passes: int = 0
    heldout_passes: int = 0
    timer: StepTimer | None = None
    passes: list | None = None  # (fit step or None, seconds, Work)

    def heldout_mse(self, block, device=None):
        self.heldout_passes += 1
        return self._pass(super().heldout_mse, block, device)

    def observe_inputs(self, *args, **kwargs):
        self.train_passes += 1
        return self._pass(super().observe_inputs, *args, **kwargs)

    def _pass(self, run, *args, **kwargs):
        step, (start, before) = self.timer.step(), self.timer.now()
        result = run(*args, **kwargs)
        end, after = self.timer.now()
        self.passes.append((step, end - start, after - before))
        return result

    def spent(self, step: int | None) -> tuple[float, Work]:
        """Seconds and work of the passes made during fit step `step` (None: outside the fit)."""
        mine = [(s, w) for at, s, w in self.passes if at == step]
        return sum(s for s, _ in mine), sum((w for _, w in mine), Work())


def measure_block(block: nn.Module, tokens: int, num_classes: int, method: Method, fit: FitSettings,
                  device: torch.device, precision: str = "fp32", steps: int = 3, seed: int = 0,
                  trainer: partial | None = None, model_fit: ModelFitSettings | None = None,
                  count: bool = False) -> BlockCost:
    """Quantize a copy of `block` (random weights are as good as real ones for cost) with `method` on
    `fit.batch_size` synthetic rows of `tokens` tokens, in a short fit of `steps` + 2 steps whose schedule is the
    fit's shortened (the first step is a warm-up); then the quantized block's forward, a step of its deployed
    layers at `model_fit`'s batch (None: not measured) and saving it. `count`: the quantization and the deployed
    step are counted (`Work`), and their times, which then include the counting, are not to be used."""
    block = copy.deepcopy(block).to(device).eval().requires_grad_(False)
    row_flops = forward_flops(block, tokens)
    # forward passes run in chunks of up to 256 rows (the pool's); fewer where a chunk would take long to time
    chunk = max(fit.batch_size, min(256, int(FORWARD_BUDGET // row_flops)))
    chunk_rows = synthetic_rows(chunk, tokens, _width(block), num_classes, seed)
    row_seconds = forward_seconds_per_row(block, chunk_rows, device, precision)
    rows = fit.batch_size
    x, t, y = synthetic_rows(rows, tokens, _width(block), num_classes, seed)
    with torch.no_grad(), autocast(device, precision):
        target = block(x.to(device), timestep=t.to(device), class_labels=y.to(device)).float().cpu()
    counter = WorkCounter() if count else None
    timer = StepTimer(device, counter)
    data = _CountingData(block, 0, (x, t, y, target), (x, t, y, target), device, seed, precision=precision)
    data.timer, data.passes = timer, []
    trainers = BlockTrainers(device, None, trainer or partial(L.Trainer, enable_model_summary=False), precision)
    short = replace(fit, iterations=steps + 2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, started = timer.now()
    with warnings.catch_warnings(), counter or nullcontext():
        warnings.simplefilter("ignore")
        layers, _ = quantize_block(method, data, short,
                                   lambda **kw: trainers(callbacks=[timer], enable_progress_bar=False, **kw))
    end, ended = timer.now()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    # every step from its start to the next one's (or the fit's end), less the row passes made in it
    marks = list(zip([*timer.starts, timer.end], timer.counts))
    spans = [(b - a - data.spent(i)[0], wb - wa - data.spent(i)[1])
             for i, ((a, wa), (b, wb)) in enumerate(zip(marks, marks[1:]))]
    step_seconds = statistics.mean(s for s, _ in spans[1:]) if method.fits else 0.0
    # counted: the mean step of the short fit (its schedule's share of later steps in); timed: the first step's
    step_work = sum((w for _, w in spans), Work()) * (1 / len(spans)) if count and method.fits else None
    shown = step_work or timer.first_work or Work()
    fit_seconds, fit_work = (marks[-1][0] - marks[0][0], marks[-1][1] - marks[0][1]) if method.fits else (0.0, Work())
    outside_seconds, outside_work = data.spent(None)
    fixed = end - start - fit_seconds - outside_seconds
    quantized = with_layers(block, layers)
    deployed_seconds, deployed_work = 0.0, None
    if model_fit is not None:
        deployed_seconds, deployed_work = _deployed_step(quantized, model_fit, tokens, num_classes, device,
                                                         precision, steps, seed, counter)
    save_seconds, save_bytes = _save_cost(quantized)
    return BlockCost(row_flops=row_flops,
                     step_flops=shown.flops, step_bytes=shown.bytes,
                     row_seconds=row_seconds, step_seconds=step_seconds, fixed_seconds=max(fixed, 0.0),
                     train_passes=data.train_passes, heldout_passes=data.heldout_passes,
                     block_bytes=_module_bytes(block), student_bytes=timer.layer_bytes,
                     gradient_bytes=timer.gradient_bytes, optimizer_bytes=timer.optimizer_bytes,
                     saved_bytes=timer.saved_bytes, peak_bytes=peak,
                     quantized_row_seconds=0.0 if count else forward_seconds_per_row(quantized, chunk_rows, device,
                                                                                     precision),
                     deployed_step_seconds=deployed_seconds, save_seconds=save_seconds, save_bytes=save_bytes,
                     setup_work=ended - started - fit_work - outside_work if count else None,
                     step_work=step_work, deployed_step_work=deployed_work)


def _deployed_step(block: nn.Module, settings: ModelFitSettings, tokens: int, num_classes: int,
                   device: torch.device, precision: str, steps: int, seed: int,
                   counter: WorkCounter | None) -> tuple[float, Work | None]:
    """One block's share of a model-level fit step (calibration/model_fit.py): forward and backward of the block
    with its deployed layers at the model fit's batch, only their float parameters trained by RMSprop. Seconds per
    step (the mean of `steps` after a warm-up), or with a counter the work of one step."""
    block = block.requires_grad_(False)
    params = trainable_parameters(block)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.RMSprop(params, lr=settings.lr, alpha=settings.rmsprop_alpha)
    x, t, y = (r.to(device) for r in synthetic_rows(settings.batch_size, tokens, _width(block), num_classes, seed))
    target = torch.zeros_like(x)

    def step():
        with autocast(device, precision):
            out = block(x, timestep=t, class_labels=y)
        F.mse_loss(out.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad()

    if counter is not None:
        before = counter.snapshot()
        with counter:
            step()
        return 0.0, counter.snapshot() - before
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps, None


def _save_cost(block: nn.Module) -> tuple[float, int]:
    """Seconds and bytes of `block` as the checkpoint stores it: the stored form of its layers (packed codes ...),
    the tensors' digests and the safetensors bytes (made in memory: a dry run writes nothing)."""
    holder = nn.Module()
    holder.transformer_blocks = nn.ModuleList([block])  # what the stored state walks
    start = time.perf_counter()
    tensors = stored_state(holder).tensors
    tensor_digests(tensors)
    size = len(safetensors_bytes(tensors))
    return time.perf_counter() - start, size


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
