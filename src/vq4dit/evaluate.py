"""`python eval.py ckpt=...`: sample from a full-precision or quantized DiT and score it."""

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from vq4dit.artifacts import fresh, image_grid, save_png, write_json
from vq4dit.errors import instantiate
from vq4dit.models import ConditionalDiT
from vq4dit.quant.checkpoint import is_quantized_checkpoint, load_quantized
from vq4dit.sampling import balanced_labels

log = logging.getLogger(__name__)


def load_model(model_cfg: DictConfig, ckpt: str) -> ConditionalDiT:
    """A quantized checkpoint folder (manifest.json) or full-precision weights for the configured model."""
    path = Path(ckpt)
    if is_quantized_checkpoint(path):
        return load_quantized(path, model_cfg)
    return instantiate(model_cfg, weights=str(path))


def evaluate(cfg: DictConfig) -> dict:
    out = Path(cfg.paths.output_dir)
    for name in ("metrics.json", "samples.png"):  # refuse before minutes of sampling, not after
        fresh(out / name)
    model = load_model(cfg.model, cfg.ckpt).to(cfg.device)
    sampler = instantiate(cfg.sampler)
    scorer = instantiate(cfg.metric)
    labels = balanced_labels(cfg.num_samples, model.num_classes)
    images = sampler.sample(model, labels, seed=cfg.seed)
    metrics = {"ckpt": str(cfg.ckpt), "model": model.name, **scorer.score(images, labels, seed=cfg.seed)}
    write_json(out / "metrics.json", metrics)
    grid = image_grid(images, labels, cfg.grid_columns)
    save_png(out / "samples.png", grid, upscale=cfg.grid_upscale)
    logger = instantiate(cfg.logger)
    for k, v in metrics.items():
        if isinstance(v, float):
            logger.experiment.add_scalar(f"eval/{k}", v, 0)
    logger.experiment.add_image("eval/samples", torch.from_numpy(grid), 0, dataformats="HW" if grid.ndim == 2 else "HWC")
    logger.finalize("success")
    log.info("metrics: %s", metrics)
    print("\n".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items()))
    return metrics
