"""`python train.py method=<method> quant=<preset>`: quantize a DiT block by block with zero-data calibration.

A thin Hydra job around the Python API (`vq4dit.calibration.pipeline.quantize_model`): build the model, the
method with its preset, the pool and the Trainer settings from the config, check everything before any work
(the device and devices too), run the block loop with a resume cache keyed by the config, and write the
checkpoint. `dry_run=true` stops after the checks and prints what the run would need (`vq4dit.cli.estimate`).
"""

import copy
import hashlib
import json
import logging
import os
import shlex
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from vq4dit.artifacts import image_grid, write_json
from vq4dit.calibration.block_cache import BlockCache, tensors_digest
from vq4dit.calibration.block_parallel import check_spreadable
from vq4dit.calibration.pipeline import default_trainer, quantize_model, resolve_student_inputs
from vq4dit.calibration.zero_data import ZeroDataBlockInputs
from vq4dit.cli.build import build_method
from vq4dit.cli.config_schema import validate
from vq4dit.cli.outputs import TRAIN_RESULTS, check_no_results
from vq4dit.devices import resolve_device, resolve_devices
from vq4dit.errors import instantiate
from vq4dit.methods.base import Method
from vq4dit.precision import check_precision
from vq4dit.quant.block_layers import block_linears
from vq4dit.quant.quantized_linear import decode_once
from vq4dit.sampling import balanced_labels
from vq4dit.seeds import stream_seed

log = logging.getLogger(__name__)
# The student deliberately stays in eval mode during fit (see BlockCalibration.train).
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")


def quantize(cfg: DictConfig) -> Path:
    validate(cfg)  # the one schema (also run by train.py before Hydra starts; here for the Python/Hydra API)
    with torch_threads(cfg.threads):
        return _quantize(cfg)


def _quantize(cfg: DictConfig) -> Path:
    """Config -> objects -> `quantize_model` -> `QuantizationResult.save`: everything the API does not own (the
    resume cache's key, the logger, sample grids) is the job's."""
    method = build_method(cfg)
    fit, model_fit, pool_settings = instantiate(cfg.fit), instantiate(cfg.model_fit), instantiate(cfg.pool)
    out = Path(cfg.paths.output_dir)
    check_no_results(out, TRAIN_RESULTS)
    device, devices = resolve_device(cfg.device), configured_devices(cfg)
    check_precision(cfg.precision)
    student_inputs = resolve_student_inputs(pool_settings.student_inputs, method,
                                            len(resolve_devices(device, devices)))
    model = instantiate(cfg.model).to(device)
    method.check(block_linears(model.blocks[0]))
    folder = block_cache_folder(cfg, method, out, weights_digest(model), student_inputs)
    cache = BlockCache(folder, key=folder.name)
    logger = instantiate(cfg.logger)
    sampler = instantiate(cfg.sampler)
    mark = time.time()
    pool = ZeroDataBlockInputs.of(model, sampler, pool_settings, cfg.seed)
    pool_seconds = time.time() - mark
    fp_model = copy.deepcopy(model) if cfg.log_samples else None
    trainer = default_trainer(device, logger, instantiate(cfg.trainer), precision=cfg.precision)
    result = quantize_model(model, method, pool, device=device, devices=devices, precision=cfg.precision,
                            seed=cfg.seed, fit=fit, student_inputs=student_inputs, cache=cache,
                            trainer=trainer, logger=logger, output_dir=out, scorer=lambda: instantiate(cfg.metric),
                            model_fit=model_fit)
    debug = debug_preset(cfg)
    mark = time.time()
    ckpt = result.save(out / "checkpoint", {"debug": debug} if debug else None)
    phases = {"pool": pool_seconds, **result.phases, "saving": time.time() - mark}
    if fp_model is not None:
        mark = time.time()
        _log_sample_grids(logger, fp_model, model, sampler, cfg)
        phases["sample grids"] = time.time() - mark
    logger.finalize("success")
    write_json(out / "phases.json", {k: round(v, 2) for k, v in phases.items()})
    log.info("phases: %s; total %.1f s", ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()),
             sum(phases.values()))
    return ckpt


def configured_devices(cfg: DictConfig) -> int | list[int]:
    """`devices` as given (N or CUDA indices), after checking that this machine has them."""
    devices = cfg.devices if isinstance(cfg.devices, int) else list(cfg.devices)
    check_spreadable(cfg.pool.get("student_inputs"), len(resolve_devices(cfg.device, devices)))
    return devices


def block_cache_folder(cfg: DictConfig, method: Method, out: Path, weights: str, student_inputs: str) -> Path:
    """Where finished blocks are kept: keyed by the content of everything that determines them (the weights'
    digest, not their path; the method, preset, fit, pool, sampler, seed, precision and CPU threads), so the same
    command resumes and anything else starts afresh."""
    if not cfg.resume:
        return out / "blocks"
    keyed = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "pool", "sampler")}
    keyed["model"]["weights"] = weights  # overwritten weights at the same path are other weights
    keyed["pool"]["student_inputs"] = student_inputs  # resolved: null means the method's choice
    keyed["sampler"].pop("batch_size", None)  # how many trajectories are sampled at once changes no row
    keyed["pool"].pop("_target_", None)
    fit = OmegaConf.to_container(cfg.fit) if method.fits else None
    if fit is not None:
        fit.pop("_target_", None)
    keyed.update(method=method.record(), fit=fit, seed=cfg.seed,
                 precision=cfg.precision, threads=cfg.threads, deterministic=cfg.trainer.get("deterministic"),
                 cache_format=BlockCache.FORMAT)
    keyed["pool"]["rows"] = "balanced labels, even per trajectory"  # blocks cached from the earlier pool differ
    digest = hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:10]
    act = f"-{method.act.name}" if method.activation.enabled else ""
    folder = (Path(cfg.paths.log_dir) / "train" / "cache"
              / f"{cfg.model.name}-{method.quant.name}{act}-{method.name}-{digest}")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(keyed, indent=2, default=str) + "\n")
    os.replace(tmp, folder / "config.json")
    return folder


def weights_digest(model) -> str:
    """sha256 of the transformer's tensors (names, dtypes, shapes and bytes)."""
    return tensors_digest(model.transformer.state_dict())


def debug_preset(cfg: DictConfig) -> str | None:
    """The debug preset this run used (recorded in the manifest: its results are not for comparison)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("debug")
    except ValueError:  # composed without Hydra's runtime (tests, the Python API)
        return None


@contextmanager
def torch_threads(threads: int | None):
    """torch's CPU threads for the job (`threads`; null: torch's default), restored afterwards."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def expected_bytes(cfg: DictConfig) -> int:
    """An upper bound on what a run writes: the checkpoint and the cached blocks take at most the model's fp32
    bytes each (counted on an empty, meta-device copy of the architecture)."""
    if cfg.dry_run:
        return 0
    from vq4dit.models.dit import build_transformer

    transformer = build_transformer(dict(cfg.model.arch), empty=True)
    return 2 * 4 * sum(p.numel() for p in transformer.parameters())


def eval_command(cfg: DictConfig, ckpt: Path) -> str:
    """The eval.py command that scores `ckpt`: this run's model and its overrides (model.arch... included)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        given = list(HydraConfig.get().overrides.task)
    except ValueError:
        given = []
    keys = [o.lstrip("+~").split("=")[0] for o in given]
    model = [o for o, key in zip(given, keys) if key.startswith("model.") and key != "model.weights"]
    return " ".join(["python eval.py", f"model={cfg.model.name}", *map(shlex.quote, model),
                     shlex.quote(f"ckpt={ckpt}")])


def _log_sample_grids(logger, fp_model, model, sampler, cfg) -> None:
    labels = balanced_labels(cfg.log_samples, model.num_classes)
    # the quantized preview from a copy decoded once: the same weights, without a decode in every one of its forwards
    for tag, make in (("fp", lambda: fp_model), ("quantized", lambda: decode_once(copy.deepcopy(model)))):
        images = sampler.sample(make(), labels, seed=stream_seed(cfg.seed, "preview"), progress=False)
        grid = torch.from_numpy(image_grid(images, labels, max(1, cfg.log_samples // model.num_classes)))
        logger.experiment.add_image(f"samples/{tag}", grid, 0, dataformats="HW" if grid.ndim == 2 else "HWC")
