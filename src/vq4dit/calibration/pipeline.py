"""The block loop: quantize a DiT block by block against its own full-precision blocks, with any method.

Before the loop the method may take a model-level step (`before_blocks`). For each block: the pool's inputs go
through the fp block once (its outputs are the targets and the next block's inputs); the method may
re-parameterize the fp block and gives its activation quantizers (which ride on every stage below, so start,
fit and result all see quantized activations); it starts, prepares, optionally fits (one Lightning
`Trainer.fit` on the block loss) and finalizes the block's linears; the result is kept only if it beats the
start on held-out rows; the deployed layers replace the block's linears. A `BlockCache` keeps finished blocks,
so an interrupted run resumes at the first unfinished block. The loop never asks which method it runs.

`precision` (fp32, bf16, fp16) is the autocast of every block forward: teacher targets, held-out errors and the
student's fit (Lightning's "bf16-mixed": the student's weights, optimizer and loss stay fp32). A block's rows sit
on the device during its fit when they take at most half its free memory, else in host memory, streamed batch by
batch. With several `devices` (fp student inputs: every block is independent), processes launched by Lightning
each quantize a share of the blocks into the cache, and the loop then assembles them (`block_parallel`).
"""

import copy
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import lightning as L
import torch
from diffusers import DiTTransformer2DModel
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from tqdm.auto import tqdm

from vq4dit.calibration.block_cache import BlockCache
from vq4dit.calibration.block_calibration import BlockCalibration
from vq4dit.calibration.block_parallel import quantize_blocks_in_parallel
from vq4dit.calibration.model_fit import fit_model, model_outputs, resolved
from vq4dit.calibration.settings import ModelFitSettings
from vq4dit.calibration.zero_data import ZeroDataBlockInputs
from vq4dit.devices import fits_on, lightning_accelerator, resolve_devices
from vq4dit.errors import UserError
from vq4dit.methods.base import FitSettings, Method, RunContext
from vq4dit.methods.block_data import BlockData, with_layers
from vq4dit.models import ConditionalDiT
from vq4dit.precision import LIGHTNING, autocast, check_precision
from vq4dit.quant.act_quantizer import attach_input_quantizer
from vq4dit.quant.attention_quantizer import install_attention_quantizers
from vq4dit.quant.block_layers import block_linears, replace_layer
from vq4dit.quant.checkpoint import save_quantized as save_checkpoint
from vq4dit.quant.quantized_linear import QuantizedLinear
from vq4dit.seeds import generator

log = logging.getLogger(__name__)
TrainerFactory = Callable[..., L.Trainer]  # called with max_steps; returns the Trainer for one block's fit
STUDENT_INPUTS = ("fp", "quantized")


@dataclass
class QuantizationResult:
    """A quantized model with what made it: `manifest()` is the record its checkpoint carries
    (`vq4dit.api.save_quantized`)."""

    model: ConditionalDiT
    method: Method
    fit: FitSettings | None   # the block fit's settings (None: the method does not fit)
    pool: dict                # the calibration pool: its settings, resolved, and its sampler
    seed: int
    precision: str
    blocks: list[dict] = field(default_factory=list)  # per block: start / shipped held-out MSE, which was kept
    model_fit: dict | None = None  # the model-level fit's settings, held-out output MSE before and after, kept
    student_inputs: str = "fp"     # what the blocks' students saw (pool.student_inputs, resolved)
    threads: int = 1               # torch's CPU threads during the run (results differ in the last bits across)
    seconds: float = 0.0           # wall time of the calibration (not in the manifest: it differs run to run)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase: model-level step, blocks, model fit

    def manifest(self) -> dict:
        """Method, settings, fit, pool, seed and per-block records as the checkpoint stores them. Only what the
        run computed from: two runs of the same settings write the same manifest."""
        return {"model": self.model.config_record(), "method": self.method.record(),
                "fit": asdict(self.fit) if self.fit is not None else None,
                "pool": {k: v for k, v in self.pool.items() if k != "sampler"},
                "sampler": self.pool["sampler"], "seed": self.seed, "precision": self.precision,
                "threads": self.threads, "blocks": self.blocks,
                **({"model_fit": self.model_fit} if self.model_fit else {})}

    def save(self, folder: Path | str, notes: dict | None = None) -> Path:
        """The checkpoint folder with the model and `manifest()` (plus `notes`, e.g. the CLI's debug preset);
        written under a temporary name and renamed, never over an existing folder."""
        return save_checkpoint(self.model, Path(folder), {**self.manifest(), **(notes or {})})


def quantize_model(model: ConditionalDiT | DiTTransformer2DModel, method: Method, pool: ZeroDataBlockInputs, *,
                   device: str | torch.device | None = None, devices: int | list[int] = 1, precision: str = "fp32",
                   seed: int = 0, fit: FitSettings | None = None, student_inputs: str | None = None,
                   cache: BlockCache | None = None, trainer: TrainerFactory | None = None, logger=None,
                   progress: bool = True, output_dir: Path | None = None, scorer: Callable | None = None,
                   blocks: Collection[int] | None = None, model_fit: ModelFitSettings | None = None
                   ) -> QuantizationResult:
    """Quantize every block of `model` in place with `method`, calibrating on `pool`; returns the model and
    per-block statistics. `device` defaults to the model's; `devices` (N, or CUDA indices) spreads the blocks over
    several devices; `precision` is the autocast of block forwards; `trainer` builds the Lightning Trainer of a
    block's fit (default: `default_trainer(device, logger, precision=precision)`), `logger` receives the curves.
    A model-level step of the method keeps its resume state in the cache's folder and its results in
    `output_dir`; `scorer` builds the sample scorer it may use. `blocks`: quantize only these (the others only
    advance the pool), as a process of a parallel run does (its method arrives after the model-level step).
    `student_inputs` None is the method's choice (`resolve_student_inputs`). `model_fit` with iterations (None:
    the method's choice): after the blocks, the whole model is fitted to the fp model's outputs (model_fit.py)."""
    check_precision(precision)
    model = ConditionalDiT.of(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    fit = fit or FitSettings()
    method.check(block_linears(model.blocks[0]))
    make_trainer = trainer or default_trainer(device, logger, precision=precision)
    start = time.time()
    run = RunContext(pool, device, seed, logger, cache.folder if cache is not None else None,
                     Path(output_dir) if output_dir is not None else None, scorer, progress)
    if blocks is None:
        method.before_blocks(model, run)
    phases = {"model-level step": time.time() - start}
    spread = resolve_devices(device, devices) if devices != 1 else [device]
    student_inputs = resolve_student_inputs(student_inputs, method, len(spread))
    if len(spread) > 1:
        mark = time.time()
        cache = quantize_blocks_in_parallel(quantize_model, model, method, pool, spread, precision=precision, seed=seed,
                                            fit=fit,
                                            student_inputs=student_inputs, cache=cache, trainer=make_trainer,
                                            progress=progress)
        phases["parallel blocks"] = time.time() - mark
    model_fit = resolved(model_fit, method)
    fits_model = model_fit.iterations > 0 and blocks is None
    if fits_model:  # the fp model's outputs on every pool row, before any block is quantized
        mark = time.time()
        fp_outputs = model_outputs(model, (pool.inputs, pool.timesteps, pool.labels), device, precision)
        phases["model fit"] = time.time() - mark
    fp_hidden = pool.hidden  # the pool itself is never changed: a second call starts from the same block-0 inputs
    student_hidden = fp_hidden.clone() if student_inputs == "quantized" else None
    result = QuantizationResult(model, method, fit if method.fits else None, pool.record(student_inputs), seed,
                                precision, student_inputs=student_inputs, threads=torch.get_num_threads())
    mark = time.time()
    for i in tqdm(range(len(model.blocks)), desc="blocks", disable=not progress):
        block = model.blocks[i]
        with autocast(device, precision):
            targets = pool.block_outputs(block, device, fp_hidden)
        if blocks is not None and i not in blocks:  # another process quantizes it
            fp_hidden = targets
            continue
        if method.activation.attention:  # after the fp targets: from here on the block attends quantized
            install_attention_quantizers([block], method.activation.record_attention())
        inputs = fp_hidden if student_hidden is None else student_hidden
        home = rows_home(device, inputs, targets)
        rows = lambda part: tuple(r.to(home) for r in (inputs[part], pool.timesteps[part], pool.labels[part],  # noqa: E731
                                                        targets[part]))
        data = BlockData(block, i, rows(pool.train_rows), rows(pool.heldout_rows), device, seed, precision=precision)
        cached = cache.load(i, block_linears(block), method) if cache is not None else None
        if cached is not None:
            layers, stats = cached
            log.info("block %d: resumed from %s", i, cache.folder)
        else:
            layers, stats = quantize_block(method, data, fit, make_trainer)
            if cache is not None:
                cache.save(i, layers, stats, method)
        for name, layer in layers.items():
            replace_layer(block, name, layer.to(device))
        result.blocks.append(stats)
        if logger is not None:
            for key in ("start_mse", "soft_mse", "hard_mse_at_harden", "method_mse", "shipped_mse"):
                if key in stats:
                    logger.experiment.add_scalar(f"block_mse/{key}", stats[key], i)
        if student_hidden is not None:
            with autocast(device, precision):
                student_hidden = pool.block_outputs(block, device, student_hidden)
        fp_hidden = targets
    phases["blocks"] = time.time() - mark + phases.pop("parallel blocks", 0.0)
    if fits_model:
        mark = time.time()
        part = lambda rows: (pool.inputs[rows], pool.timesteps[rows], pool.labels[rows], fp_outputs[rows])  # noqa: E731
        stats = fit_model(model, part(pool.train_rows), part(pool.heldout_rows), model_fit, make_trainer, device,
                          precision, seed)
        result.model_fit = {**asdict(model_fit), **stats}
        log.info("model fit: held-out output MSE %.3g -> %.3g, kept %s", result.model_fit["start_mse"],
                 result.model_fit["fitted_mse"], result.model_fit["kept"])
        phases["model fit"] += time.time() - mark
    result.seconds, result.phases = time.time() - start, phases
    return result


def rows_home(device: torch.device, *rows: torch.Tensor) -> torch.device:
    """Where a block's rows live during its quantization: on a CUDA device when they take at most half of its
    free memory (no host-to-device copy per batch), else in host memory, streamed batch by batch."""
    return device if fits_on(device, sum(r.numel() * r.element_size() for r in rows)) else torch.device("cpu")


def resolve_student_inputs(configured: str | None, method: Method, devices: int = 1) -> str:
    """`pool.student_inputs`, or if null the method's choice; fp where blocks run on several devices at once."""
    if configured is not None:
        check_student_inputs(configured)
        return configured
    return "fp" if devices > 1 else method.student_inputs


def check_student_inputs(student_inputs: str) -> None:
    if student_inputs not in STUDENT_INPUTS:
        raise UserError(f"pool.student_inputs={student_inputs}; valid: {', '.join(STUDENT_INPUTS)}")


def quantize_block(method: Method, data: BlockData, fit: FitSettings,
                   make_trainer: TrainerFactory) -> tuple[dict[str, QuantizedLinear], dict]:
    """One block: start, prepare, fit (if the method fits), finalize; the better of start and result on the
    held-out rows is returned with the block's statistics."""
    L.seed_everything(data.seed + data.index, workers=True, verbose=False)
    method.transform_block(data)
    linears = block_linears(data.block)
    quantizers = method.input_quantizers(linears, data)
    data.input_quantizers = quantizers
    start = with_input_quantizers(method.start(linears, data), copy.deepcopy(quantizers))  # its own copies
    start_mse = data.heldout_mse(with_layers(data.block, start)).item()
    stats = {"block": data.index, "start_mse": start_mse}
    layers = method.prepare(linears, start, data)
    layers = {name: layer if layer is start[name] else attach_input_quantizer(layer, quantizers.get(name))
              for name, layer in layers.items()}
    if method.fits:
        student = with_layers(data.block, layers)
        module = BlockCalibration(student, layers, method, fit, data, mse_scale=max(start_mse, 1e-12))
        loader = DataLoader(TensorDataset(*data.train), batch_size=fit.batch_size, sampler=RandomSampler(
            range(len(data.train[0])), replacement=True, num_samples=fit.iterations * fit.batch_size,
            generator=generator(data.seed + data.index, "calibration-batches")))
        make_trainer(max_steps=fit.iterations).fit(module, loader)
        stats.update(module.stats)
        # Lightning's teardown leaves the fitted module on the CPU: bring the layers back to the block's device
        layers = {name: layer.to(data.device) for name, layer in layers.items()}
    for quantizer in quantizers.values():
        quantizer.freeze()  # a learned static scale is deployed as a plain tensor
    final = {name: method.finalize(layer).to(data.device) for name, layer in layers.items()}
    final = {name: layer if layer is start[name] else attach_input_quantizer(layer, quantizers.get(name))
             for name, layer in final.items()}
    if all(final[name] is start[name] for name in final):  # the method is its own start (RTN, k-means)
        stats.update(shipped_mse=start_mse, kept="start")
        return final, stats
    method_mse = data.heldout_mse(with_layers(data.block, final)).item()
    kept = "method" if method_mse <= start_mse else "start"
    stats.update(method_mse=method_mse, shipped_mse=min(method_mse, start_mse), kept=kept)
    if kept == "start":
        log.warning("block %d: %s result (held-out MSE %.3g) is worse than its start (%.3g); shipping the start",
                    data.index, method.name, method_mse, start_mse)
    return (final if kept == "method" else start), stats


def with_input_quantizers(layers: dict[str, nn.Module], quantizers: dict) -> dict[str, nn.Module]:
    return {name: attach_input_quantizer(layer, quantizers.get(name)) for name, layer in layers.items()}


@dataclass
class BlockTrainers:
    """Trainers for block fits on `device` (cuda:1 included), in `precision`: no checkpoints, no validation.
    `base` is a partial of `lightning.Trainer` with further settings (configs/trainer/). Picklable, and `on(device)`
    gives the same Trainers on another device (a process of a parallel run)."""

    device: torch.device
    logger: object = None
    base: Callable[..., L.Trainer] | None = None
    precision: str = "fp32"

    def __call__(self, **kwargs) -> L.Trainer:
        base = self.base or partial(L.Trainer, enable_model_summary=False, log_every_n_steps=50)
        accelerator, devices = lightning_accelerator(self.device)
        return base(accelerator=accelerator, devices=devices, precision=LIGHTNING[self.precision],
                    logger=self.logger if self.logger is not None else False, enable_checkpointing=False,
                    limit_val_batches=0, num_sanity_val_steps=0, **kwargs)

    def on(self, device: torch.device) -> "BlockTrainers":
        return BlockTrainers(device, self.logger, self.base, self.precision)


def default_trainer(device: torch.device, logger=None, trainer: TrainerFactory | None = None,
                    precision: str = "fp32") -> BlockTrainers:
    """Trainers for block fits on `device` in `precision`; `trainer` is a partial of `lightning.Trainer` with
    further settings (configs/trainer/)."""
    return BlockTrainers(torch.device(device), logger, trainer, check_precision(precision))
