"""`python train.py ... dry_run=true`: what the command will cost, printed before a GPU hour is spent.

For the configured model, method, preset, pool, sampler, device(s) and precision: memory (the pool, the model, and
per block the rows, the method's layers, their gradients, the optimizer's state and the activations saved for
backward) and time (pool sampling, per block, in total). FLOPs are counted from the architecture and the method's
own layers (`calibration.block_cost`); time is FLOPs divided by the throughput a short real run of the method on
one block of random weights achieves on this machine, or, with `estimate.tflops=<T>`, by an assumed throughput
and with `estimate.tbps=<B>` a memory bandwidth, to estimate another machine: a step then takes the longer of its
device work (FLOPs / throughput + bytes moved / bandwidth) and its host side (Python, Lightning and op launches,
measured here on a narrow copy of the block: the same ops at negligible arithmetic), and a block's set-up
(k-means, GPTQ, Trainer) is what it measured here. No weights are read and nothing is written.
"""

import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from vq4dit.calibration.block_cost import (
    BlockCost,
    forward_flops,
    forward_seconds_per_row,
    measure_block,
    synthetic_rows,
)
from vq4dit.calibration.model_fit import resolved
from vq4dit.calibration.pipeline import resolve_student_inputs
from vq4dit.calibration.zero_data import covering_trajectories
from vq4dit.cli.build import build_method
from vq4dit.devices import available_devices, fits_on, resolve_device, resolve_devices
from vq4dit.errors import UserError, instantiate
from vq4dit.methods.base import FitSettings
from vq4dit.models.dit import build_transformer
from vq4dit.precision import check_precision
from vq4dit.quant.block_layers import block_linears

GiB, MiB = 2**30, 2**20


@dataclass
class Estimate:
    lines: list[str]
    pool_seconds: float
    block_seconds: float       # one block, one device
    total_seconds: float       # pool sampling + every block on the configured devices
    pool_bytes: int            # host memory of the pool while a block is quantized (inputs + targets)
    device_bytes: int          # one process's device memory at its peak (model, rows if they fit, a block's fit)
    cost: BlockCost

    def __str__(self) -> str:
        return "\n".join(self.lines)


def estimate(cfg: DictConfig) -> Estimate:

    method, fit = build_method(cfg), instantiate(cfg.fit)
    assumed = cfg.estimate.tflops
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

    cost = measure_block(block, tokens, classes, method, fit, device, measured_precision,
                         steps=cfg.estimate.steps if assumed is None else 1, seed=cfg.seed,
                         trainer=instantiate(cfg.trainer))
    model_row_flops = forward_flops(one, tokens, blocks_input=False) + (depth - 1) * cost.row_flops
    if assumed is None:
        row_seconds, step_seconds, fixed = cost.row_seconds, cost.step_seconds, cost.fixed_seconds
        sample_row_seconds = row_seconds if sampler.precision == precision else forward_seconds_per_row(
            block.to(device), synthetic_rows(fit.batch_size, tokens, width, classes, cfg.seed), device,
            sampler.precision)
        throughput = (f"measured on {device}: {cost.forward_tflops:.3g} TFLOP/s forward, "
                      f"{cost.step_tflops:.3g} TFLOP/s per fit step")
    else:  # device work from the counts; the host's share of a step (Python, Lightning, op launches) measured
        tbps = cfg.estimate.tbps
        moved = cost.step_bytes / tbps / 1e12 if tbps else 0.0
        host = host_step_seconds(arch, tokens=16, classes=classes, method=method, fit=fit, device=device,
                                 seed=cfg.seed, trainer=instantiate(cfg.trainer)) if method.fits else 0.0
        row_seconds, fixed = cost.row_flops / assumed / 1e12, cost.fixed_seconds
        step_seconds = max(host, cost.step_flops / assumed / 1e12 + moved)
        sample_row_seconds = row_seconds
        throughput = (f"assumed {assumed:g} TFLOP/s (estimate.tflops)"
                      + (f" and {tbps:g} TB/s (estimate.tbps)" if tbps else "")
                      + f"; a step's host side measured here on {device}: {host * 1e3:.3g} ms (a narrow copy of the "
                      f"block, same ops); set-up (k-means, Trainer) measured here on the real block")
    sampled_rows = (trajectories + pool.heldout_trajectories) * steps * halves
    pool_seconds = sampled_rows * sample_row_seconds * model_row_flops / cost.row_flops
    teacher = (train + heldout) * row_seconds * (copies - 1)  # targets (and the quantized students' inputs)
    passes = (cost.train_passes * train + cost.heldout_passes * heldout) * row_seconds
    fit_seconds = fit.iterations * step_seconds if method.fits else 0.0
    block_seconds = teacher + fixed + passes + fit_seconds
    if processes == 1:
        blocks_seconds = depth * block_seconds
    else:  # every process walks every fp block; the assembly walks them once more
        blocks_seconds = 2 * depth * teacher + math.ceil(depth / processes) * (block_seconds - teacher)
    # the model-level fit: a step runs every block forward and backward once; one block's fit step (whose soft
    # weights cost more than the fixed codes the model fit trains) times the depth bounds it from above
    model_fit_steps = resolved(instantiate(cfg.model_fit), method).iterations
    model_fit_seconds = model_fit_steps * depth * max(step_seconds, 3 * fit.batch_size * row_seconds)
    total = pool_seconds + blocks_seconds + model_fit_seconds

    model_bytes = (sum(p.numel() * p.element_size() for p in one.parameters())
                   + (depth - 1) * cost.block_bytes)
    fit_bytes = cost.student_bytes + cost.gradient_bytes + cost.optimizer_bytes + cost.saved_bytes
    rows_on_device = (train + heldout) * row_bytes * 2
    fits = fits_on(device, rows_on_device) if assumed is None else None
    device_bytes = model_bytes + fit_bytes + (rows_on_device if fits is not False else 0)

    quant = cfg.quant
    lines = [
        f"dry run: {cfg.model.name} ({depth} blocks, {tokens} tokens x {width}), {method.name} "
        f"{quant.name} ({method.quant.describe()}), {fit.iterations if method.fits else 0} fit steps at batch "
        f"{fit.batch_size}; device {cfg.device} x {processes}, calibration {precision}, sampling {sampler.precision}",
        f"throughput {throughput}",
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
        "time",
        f"  counted: block forward {cost.row_flops / 1e9:.4g} GFLOP per row; fit step {cost.step_flops / 1e9:.4g} "
        f"GFLOP, {cost.step_bytes / 1e9:.3g} GB moved; model forward {model_row_flops / 1e9:.4g} GFLOP per sampled row",
        f"  pool sampling        {_duration(pool_seconds)}  ({trajectories} + {pool.heldout_trajectories} "
        f"trajectories x {steps} steps x {halves} = {sampled_rows} rows)",
        f"  per block            {_duration(block_seconds)}  = teacher {_duration(teacher)} + set-up {_duration(fixed)}"
        f" + row passes {_duration(passes)} + {fit.iterations if method.fits else 0} steps x "
        f"{step_seconds * 1e3:.3g} ms",
        f"  blocks               {_duration(blocks_seconds)}  ({depth} blocks on {processes} device"
        f"{'s' if processes > 1 else ''})",
        *([f"  model fit            {_duration(model_fit_seconds)}  ({model_fit_steps} steps x {depth} blocks x "
            f"a block's step, an upper bound)"] if model_fit_steps else []),
        f"  total                {_duration(total)}",
    ]
    return Estimate(lines, pool_seconds, block_seconds, total, pool_bytes, device_bytes, cost)


def host_step_seconds(arch: dict, tokens: int, classes: int, method, fit: FitSettings, device: torch.device,
                      seed: int, trainer) -> float:
    """Seconds of a fit step that do not grow with the layers' width (Python, Lightning, the op sequence): a step
    of a block with the same heads and layers at the narrowest width the method accepts (64 or more), where the
    arithmetic is negligible."""
    heads = arch["num_attention_heads"]
    for head_dim in (-(-width // heads) for width in (64, 128, 256, 512, 1024)):
        block = build_transformer({**arch, "num_layers": 1, "attention_head_dim": head_dim},
                                  seed=seed).transformer_blocks[0]
        try:
            method.check(block_linears(block))
        except UserError:
            continue
        return measure_block(block, tokens, classes, method, fit, device, "fp32", steps=3, seed=seed,
                             trainer=trainer).step_seconds
    return 0.0


def _size(nbytes: int) -> str:
    return f"{nbytes / GiB:7.2f} GiB" if nbytes >= GiB else f"{nbytes / MiB:7.1f} MiB"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.3g} s"
