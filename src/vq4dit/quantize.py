"""`python train.py method=<method> quant=<preset>`: quantize a DiT block by block with zero-data calibration.

A thin Hydra job around the Python API (`vq4dit.calibration.pipeline.quantize_model`): build the model, the
method with its preset, the pool and the Trainer settings from the config, check everything before any work
(the device and devices too), run the block loop with a resume cache keyed by the config, and write the
checkpoint. `dry_run=true` stops after the checks and prints what the run would need (`vq4dit.estimate`).
"""

import copy
import hashlib
import json
import logging
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from vq4dit.artifacts import image_grid
from vq4dit.calibration.block_cache import BlockCache
from vq4dit.calibration.block_parallel import check_spreadable
from vq4dit.calibration.pipeline import check_student_inputs, default_trainer, quantize_model
from vq4dit.calibration.zero_data import ZeroDataBlockInputs, check_pool_sizes
from vq4dit.devices import resolve_device, resolve_devices
from vq4dit.errors import UserError, instantiate
from vq4dit.methods.base import FitSettings, Method
from vq4dit.precision import check_precision
from vq4dit.quant.block_layers import block_linears
from vq4dit.quant.checkpoint import save_quantized
from vq4dit.sampling import balanced_labels
from vq4dit.seeds import stream_seed

log = logging.getLogger(__name__)
# The student deliberately stays in eval mode during fit (see BlockCalibration.train).
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")


def build_method(cfg: DictConfig) -> Method:
    """The configured method with its presets; a preset of another family is refused with one line."""
    make = instantiate(cfg.method, _partial_=True, _convert_="all")  # (an object passed to instantiate would
    return make(quant=instantiate(cfg.quant), act=instantiate(cfg.act))  # be turned back into a config)


def quantize(cfg: DictConfig) -> Path:
    method = build_method(cfg)
    fit = FitSettings(**cfg.fit)
    out = Path(cfg.paths.output_dir)
    if (out / "checkpoint").exists():
        raise UserError(f"{out / 'checkpoint'} already exists; earlier results are never overwritten")
    device, devices = resolve_device(cfg.device), configured_devices(cfg)
    check_precision(cfg.precision)
    pool_cfg = cfg.pool
    check_pool_sizes(**{k: v for k, v in pool_cfg.items() if k != "student_inputs"})
    check_student_inputs(pool_cfg.student_inputs)
    model = instantiate(cfg.model).to(device)
    method.check(block_linears(model.blocks[0]))
    cache = BlockCache(block_cache_folder(cfg, method, out))
    logger = instantiate(cfg.logger)
    sampler = instantiate(cfg.sampler)
    pool = ZeroDataBlockInputs(model, sampler, pool_cfg.trajectories, pool_cfg.size, cfg.seed,
                               pool_cfg.heldout_trajectories, pool_cfg.heldout_size)
    fp_model = copy.deepcopy(model) if cfg.log_samples else None
    trainer = default_trainer(device, logger, instantiate(cfg.trainer), precision=cfg.precision)
    result = quantize_model(model, method, pool, device=device, devices=devices, precision=cfg.precision,
                            seed=cfg.seed, fit=fit, student_inputs=pool_cfg.student_inputs, cache=cache,
                            trainer=trainer, logger=logger, output_dir=out, scorer=lambda: instantiate(cfg.metric))
    manifest = {"model": OmegaConf.to_container(cfg.model, resolve=True), "method": method.record(),
                "fit": asdict(fit) if method.fits else None,
                "pool": {**OmegaConf.to_container(pool_cfg), "trajectories": pool.trajectories},
                "sampler": OmegaConf.to_container(cfg.sampler, resolve=True), "seed": cfg.seed,
                "precision": cfg.precision, "calibration_seconds": round(result.seconds, 1),
                "blocks": result.blocks}
    ckpt = save_quantized(model, out / "checkpoint", manifest)
    if fp_model is not None:
        _log_sample_grids(logger, fp_model, model, sampler, cfg)
    logger.finalize("success")
    log.info("wrote %s (calibration %.1f s)", ckpt, result.seconds)
    return ckpt


def configured_devices(cfg: DictConfig) -> int | list[int]:
    """`devices` as given (N or CUDA indices), after checking that this machine has them."""
    devices = cfg.devices if isinstance(cfg.devices, int) else list(cfg.devices)
    check_spreadable(cfg.pool.student_inputs, len(resolve_devices(cfg.device, devices)))
    return devices


def block_cache_folder(cfg: DictConfig, method: Method, out: Path) -> Path:
    """Where finished blocks are kept: keyed by everything that determines them, so the same command resumes."""
    if not cfg.resume:
        return out / "blocks"
    keyed = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "pool", "sampler")}
    keyed.update(method=method.record(), fit=OmegaConf.to_container(cfg.fit) if method.fits else None, seed=cfg.seed,
                 precision=cfg.precision)
    keyed["pool"]["rows"] = "balanced labels, even per trajectory"  # blocks cached from the earlier pool differ
    digest = hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:10]
    act = f"-{cfg.act.name}" if method.activation.enabled else ""
    folder = Path(cfg.paths.log_dir) / "train" / "cache" / f"{cfg.model.name}-{cfg.quant.name}{act}-{method.name}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(keyed, indent=2, default=str) + "\n")
    return folder


def _log_sample_grids(logger, fp_model, model, sampler, cfg) -> None:
    labels = balanced_labels(cfg.log_samples, model.num_classes)
    for tag, m in (("fp", fp_model), ("quantized", model)):
        images = sampler.sample(m, labels, seed=stream_seed(cfg.seed, "preview"), progress=False)
        grid = torch.from_numpy(image_grid(images, labels, max(1, cfg.log_samples // model.num_classes)))
        logger.experiment.add_image(f"samples/{tag}", grid, 0, dataformats="HW" if grid.ndim == 2 else "HWC")
