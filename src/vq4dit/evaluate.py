"""`python eval.py ckpt=...`: sample from a full-precision or quantized DiT and score it."""

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file

from vq4dit.artifacts import fresh, image_grid, save_png, save_tensors, write_json
from vq4dit.errors import UserError, instantiate
from vq4dit.metrics import psnr
from vq4dit.models import ConditionalDiT
from vq4dit.quant.checkpoint import is_quantized_checkpoint, load_quantized
from vq4dit.sampling import balanced_labels
from vq4dit.seeds import stream_seed

log = logging.getLogger(__name__)
OUTPUTS = ("metrics.json", "samples.png", "samples.safetensors")


def load_model(model_cfg: DictConfig, ckpt: str, decode: str = "per_forward") -> ConditionalDiT:
    """A quantized checkpoint folder (manifest.json) or full-precision weights for the configured model;
    `decode` says how a quantized one runs (per_forward: codes decoded in each forward; once: dense)."""
    path = Path(ckpt)
    if is_quantized_checkpoint(path):
        return load_quantized(path, model_cfg, decode=decode)
    return instantiate(model_cfg, weights=str(path))


def eval_samples(cfg: DictConfig, model: ConditionalDiT) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [-1, 1], labels): `num_samples` balanced over classes, from the "eval" noise stream."""
    labels = balanced_labels(cfg.num_samples, model.num_classes)
    images = instantiate(cfg.sampler).sample(model.to(cfg.device), labels, seed=stream_seed(cfg.seed, "eval"))
    return images, labels


def sample_and_score(cfg: DictConfig, model: ConditionalDiT, compare_to: torch.Tensor | None = None):
    """(images in [-1, 1], labels, metrics): the eval protocol, shared by eval.py and the benchmarks."""
    scorer = instantiate(cfg.metric)
    images, labels = eval_samples(cfg, model)
    metrics = {"model": model.name, **scorer.score(images, labels, seed=cfg.seed)}
    if compare_to is not None:
        if compare_to.shape != images.shape:
            raise UserError(f"compare_to holds samples of shape {tuple(compare_to.shape)}, these are "
                            f"{tuple(images.shape)}: compare runs with the same num_samples and model")
        metrics["psnr_vs_reference"] = psnr(images, compare_to)
    return images, labels, metrics


def evaluate(cfg: DictConfig) -> dict:
    out = Path(cfg.paths.output_dir)
    for name in OUTPUTS:  # refuse before minutes of sampling, not after
        fresh(out / name)
    reference = _reference_samples(cfg.get("compare_to"))
    model = load_model(cfg.model, cfg.ckpt, cfg.get("decode", "per_forward"))
    images, labels, metrics = sample_and_score(cfg, model, reference)
    metrics = {"ckpt": str(cfg.ckpt), **metrics}
    write_json(out / "metrics.json", metrics)
    grid = image_grid(images, labels, cfg.grid_columns)
    save_png(out / "samples.png", grid, upscale=cfg.grid_upscale)
    save_tensors(out / "samples.safetensors", {"images": images.half(), "labels": labels})
    logger = instantiate(cfg.logger)
    for k, v in metrics.items():
        if isinstance(v, float):
            logger.experiment.add_scalar(f"eval/{k}", v, 0)
    logger.experiment.add_image("eval/samples", torch.from_numpy(grid), 0, dataformats="HW" if grid.ndim == 2 else "HWC")
    logger.finalize("success")
    log.info("metrics: %s", metrics)
    print("\n".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items()))
    return metrics


def _reference_samples(path: str | None) -> torch.Tensor | None:
    """Another run's samples.safetensors (e.g. the full-precision model's, same seed): PSNR is measured to it."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise UserError(f"compare_to={path} not found; give the samples.safetensors of an earlier eval run")
    return load_file(path)["images"].float()
