"""Blocks in parallel: with full-precision inputs every block's calibration depends only on the fp blocks before
it, its own seed (block fits are seeded by block index) and the pool, so blocks can be quantized in any order, in
any process. Lightning's launcher starts one process per device (`Fabric(strategy="ddp_spawn")`: gloo on CPU, NCCL
on GPUs); process r walks the fp blocks (one forward pass of the pool per block) and quantizes blocks r, r + N,
r + 2N ... into the block cache. The caller's ordinary block loop then finds every block cached and assembles the
model, so the result is the one-device result.

The model's transformer (without its VAE) and the pool reach the processes through shared memory (about the
model's fp32 size plus the pool's: 5.4 GB at DiT-XL/2; in a container give it `--ipc=host` or a large
`--shm-size`). TensorBoard's fit curves (`calib/*`) come from the first process's blocks; every block's errors
(`block_mse/*`) are logged when the blocks are assembled.
"""

import copy
import tempfile
from collections.abc import Callable

import lightning as L
import torch

from vq4dit.calibration.block_cache import BlockCache
from vq4dit.calibration.zero_data import ZeroDataBlockInputs
from vq4dit.devices import lightning_accelerator
from vq4dit.errors import UserError
from vq4dit.methods.base import FitSettings, Method
from vq4dit.models import ConditionalDiT


def quantize_blocks_in_parallel(quantize: Callable, model: ConditionalDiT, method: Method, pool: ZeroDataBlockInputs,
                                devices: list[torch.device], *, precision: str, seed: int, fit: FitSettings,
                                student_inputs: str, cache: BlockCache | None, trainer, progress: bool) -> BlockCache:
    """Fill `cache` (a temporary one if None) with every block of `model`, quantized by one process per device;
    each process calls `quantize` (the pipeline's `quantize_model`, a module-level function: it is pickled) on
    its share of the blocks."""
    check_spreadable(student_inputs, len(devices))
    if cache is None:
        cache = BlockCache(tempfile.mkdtemp(prefix="vq4dit-blocks-"))
    accelerator, _ = lightning_accelerator(devices[0])
    indices = [d.index for d in devices] if accelerator == "gpu" else len(devices)
    fabric = L.Fabric(accelerator=accelerator, devices=indices, strategy="ddp_spawn")
    # the processes need the blocks, not the VAE; they arrive in host memory and each moves them to its device
    home = next(model.transformer.parameters()).device
    blocks_only = ConditionalDiT(model.transformer.cpu(), model.name, model.guided_channels, None,
                                 model.latent_scale)
    job = _Share(quantize, blocks_only, method, pool, dict(precision=precision, seed=seed, fit=fit, cache=cache,
                                                           trainer=trainer, progress=progress))
    try:
        fabric.launch(_quantize_share, job)
    finally:
        model.transformer.to(home)
    return cache


def check_spreadable(student_inputs: str | None, devices: int) -> None:
    """Several devices need independent blocks: fp student inputs (null resolves to fp there)."""
    if devices > 1 and student_inputs not in ("fp", None):
        raise UserError(f"pool.student_inputs={student_inputs} with {devices} devices: a block that sees its "
                        "quantized predecessor's outputs waits for it; use pool.student_inputs=fp or devices=1")


class _Share:
    """What every process receives. A plain object, not a dataclass: Lightning's launcher walks dataclasses
    (and refuses frozen ones) to unshare modules; each process takes its own copy of the model instead."""

    def __init__(self, quantize: Callable, model: ConditionalDiT, method: Method, pool: ZeroDataBlockInputs,
                 settings: dict):
        self.quantize, self.model, self.method, self.pool, self.settings = quantize, model, method, pool, settings


def _quantize_share(fabric: L.Fabric, job: _Share) -> None:
    """One process: blocks rank, rank + world, ... of the model on this process's device, into the cache."""
    device, settings = fabric.device, dict(job.settings)
    # its own copy: the shared-memory weights must not change under the other processes (methods may edit the
    # fp block, e.g. folding scales into it)
    model = copy.deepcopy(job.model).to(device)
    mine = range(fabric.global_rank, len(model.blocks), fabric.world_size)
    trainer = settings.pop("trainer")
    trainer = trainer.on(device) if hasattr(trainer, "on") else trainer
    progress = settings.pop("progress") and fabric.global_rank == 0
    job.quantize(model, job.method, job.pool, device=device, trainer=trainer, progress=progress,
                   blocks=set(mine), **settings)
    fabric.barrier()
