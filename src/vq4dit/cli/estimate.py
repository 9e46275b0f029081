"""`python train.py ... dry_run=true`: what the command will cost, printed before a GPU hour is spent.

For the configured model, method, preset, pool, sampler, device(s) and precision: memory (the pool, the model, and
per block the rows, the method's layers, their gradients, the optimizer's state and the activations saved for
backward) and the time of every phase the run writes to its `phases.json` (pool, model-level step, blocks, model
fit, saving, sample grids), under the same names. FLOPs are counted from the architecture and the method's own
layers (`calibration.block_cost`); time is measured by a short real run of the method on one block of random
weights on this machine (its set-up, its fit steps, the quantized block's forward and a step of the model fit's
share of the block) and scaled to the pool, the blocks and the steps. With `estimate.tflops=<T>` (and
`estimate.tbps=<B>`) it is for another machine: that run is counted instead (FLOPs, bytes moved, ops), and every
piece of work takes the longer of its device time (FLOPs / T + bytes / B) and its host side (its ops times the host
time per op measured here on a narrow copy of the block: a Lightning fit step's for the steps, a plain step's for
the set-up and the model fit); saving, host work, is taken as measured here; the pool's and the sample grids'
forwards are FLOPs / T. No weights are read and nothing is written.
"""

import math
from dataclasses import dataclass
from functools import partial

from omegaconf import DictConfig, OmegaConf

from vq4dit.calibration.block_cost import (
    BlockCost,
    Work,
    forward_flops,
    forward_seconds_per_row,
    measure_block,
    synthetic_rows,
)
from vq4dit.calibration.model_fit import resolved
from vq4dit.calibration.pipeline import resolve_student_inputs
from vq4dit.calibration.settings import ModelFitSettings
from vq4dit.calibration.zero_data import covering_trajectories
from vq4dit.cli.build import build_method
from vq4dit.cli.quantize import torch_threads
from vq4dit.devices import available_devices, fits_on, resolve_device, resolve_devices
from vq4dit.errors import UserError, instantiate
from vq4dit.methods.base import Method
from vq4dit.models.dit import build_transformer
from vq4dit.precision import check_precision
from vq4dit.quant.block_layers import block_linears

GiB, MiB = 2**30, 2**20


@dataclass
class Estimate:
    lines: list[str]
    phases: dict[str, float | None]  # seconds per phase, named as the run's phases.json names them; None: not estimated
    block: dict[str, float]    # one block on one device, seconds per part: fp targets, set-up, row passes, fit steps
    pool_bytes: int            # host memory of the pool while a block is quantized (inputs + targets)
    device_bytes: int          # one process's device memory at its peak (model, rows if they fit, a block's fit)
    cost: BlockCost
    host_op_seconds: tuple[float, float] | None  # for an assumed machine: host time per op in a fit step, elsewhere

    @property
    def block_seconds(self) -> float:
        return sum(self.block.values())

    @property
    def total_seconds(self) -> float:
        return sum(seconds for seconds in self.phases.values() if seconds is not None)

    def __str__(self) -> str:
        return "\n".join(self.lines)


def estimate(cfg: DictConfig) -> Estimate:
    with torch_threads(cfg.threads):  # measured at the run's CPU threads
        return _estimate(cfg)


def _estimate(cfg: DictConfig) -> Estimate:
    method, fit = build_method(cfg), instantiate(cfg.fit)
    assumed, tbps = cfg.estimate.tflops, cfg.estimate.tbps
    if assumed is not None and not assumed > 0:
        raise UserError(f"estimate.tflops={assumed}; valid: a positive throughput in TFLOP/s, or null to measure")
    if cfg.estimate.steps < 1:
        raise UserError(f"estimate.steps={cfg.estimate.steps}; valid: a positive number of timed fit steps")
    if assumed is None:
        device = resolve_device(cfg.device)
        processes = len(resolve_devices(cfg.device, cfg.devices if isinstance(cfg.devices, int) else list(cfg.devices)))
    else:  # counting needs no GPU: run it here if the configured device is not
        device = resolve_device(cfg.device if str(cfg.device) in available_devices() else "cpu")
        processes = cfg.devices if isinstance(cfg.devices, int) else len(cfg.devices)
    precision, sampler = check_precision(cfg.precision), instantiate(cfg.sampler)
    here = assumed is None or str(device) == str(cfg.device)
    measured_precision = precision if here else "fp32"  # FLOPs and bytes do not depend on it; CPU bf16 is slow
    arch = OmegaConf.to_container(cfg.model.arch, resolve=True)
    one = build_transformer({**arch, "num_layers": 1}, cfg.model.get("timestep_shift", 0.0), seed=cfg.seed)
    block, depth = one.transformer_blocks[0], arch["num_layers"]
    method.check(block_linears(block))
    tokens = (arch["sample_size"] // arch["patch_size"]) ** 2
    width = arch["num_attention_heads"] * arch["attention_head_dim"]
    classes = arch["num_embeds_ada_norm"]

    scheduler = sampler.scheduler.__class__.from_config(sampler.scheduler.config)
    scheduler.set_timesteps(sampler.steps)
    steps, halves = len(scheduler.timesteps), 1 if sampler.guidance_scale == 1.0 else 2
    pool = cfg.pool
    trajectories = covering_trajectories(pool.trajectories, classes)
    train = min(pool.size, trajectories * steps * halves)
    heldout = min(pool.heldout_size, pool.heldout_trajectories * steps * halves)
    row_bytes = tokens * width * 4
    quantized_inputs = resolve_student_inputs(pool.student_inputs, method, processes) == "quantized"
    copies = 3 if quantized_inputs else 2  # inputs, targets (and the quantized students' inputs)
    pool_bytes = (train + heldout) * row_bytes * copies
    model_fit = resolved(instantiate(cfg.model_fit), method)

    measure = partial(measure_block, tokens=tokens, num_classes=classes, method=method, fit=fit, device=device,
                      steps=cfg.estimate.steps, seed=cfg.seed, trainer=instantiate(cfg.trainer),
                      model_fit=model_fit if model_fit.iterations else None)
    cost = measure(block, precision=measured_precision, count=assumed is not None)
    model_row_flops = forward_flops(one, tokens, blocks_input=False) + (depth - 1) * cost.row_flops
    model_rows = model_row_flops / cost.row_flops  # a model row (embedders, every block, final layer) in block rows
    if assumed is None:
        row_seconds, quantized_row_seconds = cost.row_seconds, cost.quantized_row_seconds
        step_seconds, setup_seconds = cost.step_seconds, cost.fixed_seconds
        model_step_seconds = depth * cost.deployed_step_seconds
        sample_row_seconds = row_seconds if sampler.precision == precision else forward_seconds_per_row(
            block.to(device), synthetic_rows(fit.batch_size, tokens, width, classes, cfg.seed), device,
            sampler.precision)
        host_ops = None
        rules = [f"throughput measured on {device}: {cost.forward_tflops:.3g} TFLOP/s forward, "
                 f"{cost.step_tflops:.3g} TFLOP/s per fit step"]
    else:
        host_ops = fit_op, plain_op = host_op_seconds(arch, measure)
        row_seconds = quantized_row_seconds = sample_row_seconds = cost.row_flops / assumed / 1e12
        step_seconds = cost.step_work.seconds(assumed, tbps, fit_op) if method.fits else 0.0
        setup_seconds = cost.setup_work.seconds(assumed, tbps, plain_op)
        model_step = cost.deployed_step_work * depth if model_fit.iterations else Work()
        model_step_seconds = model_step.seconds(assumed, tbps, plain_op)
        split = ", ".join(f"{name} {work.device_seconds(assumed, tbps) * scale:.3g} / {work.ops * op * scale:.3g} "
                          f"{unit}" for name, work, op, scale, unit in (
                              ("fit step", cost.step_work or Work(), fit_op, 1e3, "ms"),
                              ("set-up", cost.setup_work, plain_op, 1, "s"),
                              ("model fit step", model_step, plain_op, 1e3, "ms")))
        rules = [f"throughput assumed: every counted FLOP at {assumed:g} TFLOP/s (estimate.tflops: what the machine "
                 "sustains, its peak x an efficiency, taken alike for the GEMMs and k-means' distance products)"
                 + (f", every counted byte at {tbps:g} TB/s (estimate.tbps)" if tbps else
                    "; bytes moved left out (no estimate.tbps)"),
                 "  each piece of work (counted on the real block) takes the longer of that device time and its host "
                 f"side, its ops x the host time per op measured here on {device} on a narrow copy of the block "
                 f"(same ops, negligible arithmetic): {fit_op * 1e6:.3g} us in a Lightning fit step, "
                 f"{plain_op * 1e6:.3g} us in a plain step (set-up, model fit); saving as measured here"]

    phases: dict[str, float | None] = {}
    sampled_rows = (trajectories + pool.heldout_trajectories) * steps * halves
    phases["pool"] = sampled_rows * sample_row_seconds * model_rows
    # a method's own model-level step (Q-DiT's group-size search) is not estimated
    phases["model-level step"] = 0.0 if type(method).before_blocks is Method.before_blocks else None
    # the fp block's targets (and the quantized students' inputs through the quantized block)
    teacher = (train + heldout) * (row_seconds + (quantized_row_seconds if quantized_inputs else 0.0))
    passes = cost.train_passes * train * row_seconds + cost.heldout_passes * heldout * quantized_row_seconds
    fit_seconds = fit.iterations * step_seconds if method.fits else 0.0
    parts = {"fp targets": teacher, "set-up": setup_seconds, "row passes": passes, "fit steps": fit_seconds}
    block_seconds = sum(parts.values())
    if processes == 1:
        phases["blocks"] = depth * block_seconds
    else:  # every process walks every fp block; the assembly walks them once more
        phases["blocks"] = 2 * depth * teacher + math.ceil(depth / processes) * (block_seconds - teacher)
    if model_fit.iterations:  # the fp model's outputs on the pool, held-out errors before and after, the steps
        fp_outputs = (train + heldout) * row_seconds * model_rows
        checks = 2 * heldout * quantized_row_seconds * model_rows
        phases["model fit"] = fp_outputs + checks + model_fit.iterations * model_step_seconds
    phases["saving"] = depth * cost.save_seconds
    grid_rows = cfg.log_samples * steps * halves
    if cfg.log_samples:  # the fp and the quantized model sample the TensorBoard grids
        phases["sample grids"] = grid_rows * sample_row_seconds * (1 + quantized_row_seconds / row_seconds) * model_rows
    total = sum(seconds for seconds in phases.values() if seconds is not None)

    model_bytes = (sum(p.numel() * p.element_size() for p in one.parameters())
                   + (depth - 1) * cost.block_bytes)
    fit_bytes = cost.student_bytes + cost.gradient_bytes + cost.optimizer_bytes + cost.saved_bytes
    rows_on_device = (train + heldout) * row_bytes * 2
    fits = fits_on(device, rows_on_device) if assumed is None else None
    device_bytes = model_bytes + fit_bytes + (rows_on_device if fits is not False else 0)

    quant = cfg.quant
    counted = (f"; set-up {cost.setup_work.flops / 1e9:.4g} GFLOP, {cost.setup_work.bytes / 1e9:.3g} GB moved, "
               f"{cost.setup_work.ops:,.0f} ops" if cost.setup_work else "")
    lines = [
        f"dry run: {cfg.model.name} ({depth} blocks, {tokens} tokens x {width}), {method.name} "
        f"{quant.name} ({method.quant.describe()}), {fit.iterations if method.fits else 0} fit steps at batch "
        f"{fit.batch_size}; device {cfg.device} x {processes}, calibration {precision}, sampling {sampler.precision}",
        *rules,
        "memory",
        f"  pool (host)          {_size(pool_bytes)}  {train} training + {heldout} held-out rows x {tokens} tokens x "
        f"{width} x fp32, x{copies} ({'inputs, targets, quantized inputs' if copies == 3 else 'inputs and targets'})",
        f"  model (device)       {_size(model_bytes)}  fp32, every block (block l is its own teacher)",
        f"  per block:  rows     {_size(rows_on_device)}  "
        + ("on the device during its fit" if fits else "in host memory, streamed per batch" if fits is False
           else "host memory" if device.type == "cpu" and assumed is None
           else "on the device if they take at most half of its free memory"),
        f"              method   {_size(cost.student_bytes)}  the layers it trains or builds",
        f"              grads    {_size(cost.gradient_bytes)}",
        f"              optim    {_size(cost.optimizer_bytes)}  optimizer state",
        f"              saved    {_size(cost.saved_bytes)}  saved for backward at batch {fit.batch_size} "
        "(fp32 count; bf16/fp16 autocast saves about half)",
        f"  device, per process  {_size(device_bytes)}"
        + (f" (measured peak of the short run: {_size(cost.peak_bytes)})" if cost.peak_bytes else ""),
        "time (the phases a run writes to phases.json)",
        f"  counted: block forward {cost.row_flops / 1e9:.4g} GFLOP per row; fit step {cost.step_flops / 1e9:.4g} "
        f"GFLOP, {cost.step_bytes / 1e9:.3g} GB moved{counted}; model forward {model_row_flops / 1e9:.4g} GFLOP per "
        "sampled row",
        f"  pool                 {_duration(phases['pool'])}  ({trajectories} + {pool.heldout_trajectories} "
        f"trajectories x {steps} steps x {halves} = {sampled_rows} model rows)",
        "  model-level step     " + ("0 s  (none for this method)" if phases["model-level step"] is not None else
                                     "not estimated  (the method's own step before the blocks; not in the total)"),
        f"  blocks               {_duration(phases['blocks'])}  ({depth} blocks on {processes} device"
        f"{'s' if processes > 1 else ''})",
        f"    per block          {_duration(block_seconds)}  = fp targets{' and quantized inputs' * quantized_inputs} "
        f"{_duration(teacher)} + set-up {_duration(setup_seconds)} + row passes {_duration(passes)} + "
        f"{fit.iterations if method.fits else 0} steps x {step_seconds * 1e3:.3g} ms",
        *([f"    device / host      {split} (the longer counts)"] if assumed is not None else []),
        *([f"  model fit            {_duration(phases['model fit'])}  ({model_fit.iterations} steps x "
           f"{model_step_seconds * 1e3:.3g} ms, {depth} blocks' deployed layers; fp outputs {_duration(fp_outputs)}, "
           f"held-out errors {_duration(checks)})"] if model_fit.iterations else []),
        f"  saving               {_duration(phases['saving'])}  ({depth} blocks x {_size(cost.save_bytes).strip()})",
        *([f"  sample grids         {_duration(phases['sample grids'])}  ({cfg.log_samples} samples x "
           f"{steps} steps x {halves}, fp and quantized model)"] if cfg.log_samples else []),
        f"  total                {_duration(total)}",
    ]
    return Estimate(lines, phases, parts, pool_bytes, device_bytes, cost, host_ops)


def host_op_seconds(arch: dict, measure: partial) -> tuple[float, float]:
    """Host seconds per op (Python, dispatch, and in a fit step Lightning's hooks): a block with the same heads and
    layers at the narrowest width the method accepts (64 or more), on rows of one token, where the arithmetic is
    negligible, quantized timed and then counted: (a fit step's seconds over its ops, a plain step's of its deployed
    layers over its ops)."""
    heads = arch["num_attention_heads"]
    for head_dim in (-(-width // heads) for width in (64, 128, 256, 512, 1024)):
        block = build_transformer({**arch, "num_layers": 1, "attention_head_dim": head_dim},
                                  seed=measure.keywords["seed"]).transformer_blocks[0]
        try:
            measure.keywords["method"].check(block_linears(block))
        except UserError:
            continue
        narrow = partial(measure, block, tokens=1, precision="fp32", model_fit=ModelFitSettings())
        timed, counted = narrow(), narrow(count=True)
        plain = timed.deployed_step_seconds / counted.deployed_step_work.ops
        return (timed.step_seconds / counted.step_work.ops if counted.step_work else plain), plain
    return 0.0, 0.0


def _size(nbytes: int) -> str:
    return f"{nbytes / GiB:7.2f} GiB" if nbytes >= GiB else f"{nbytes / MiB:7.1f} MiB"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.3g} s"
