"""What the benchmark commands share: composing the real configs, quantizing, and scoring like eval.py."""

import json
import math
import os
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from vq4dit.evaluate import load_model, sample_and_score  # noqa: E402
from vq4dit.quant.block_layers import block_linears  # noqa: E402
from vq4dit.quant.checkpoint import load_quantized, read_manifest  # noqa: E402
from vq4dit.quantize import quantize  # noqa: E402


def config(name: str, *overrides: str):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def fresh_dir(path: Path) -> Path:
    """A results folder that holds nothing yet (an empty one left by a crashed run is fine)."""
    if path.exists() and any(path.iterdir()):
        raise SystemExit(f"error: {path} already exists; earlier results are never overwritten (pass --out)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def score_fp(work: Path, num_samples: int, *overrides: str):
    cfg = config("eval", f"ckpt={ROOT / 'data/dit_digits'}", f"num_samples={num_samples}",
                 f"paths.output_dir={work / 'fp'}", *overrides)
    model = load_model(cfg.model, cfg.ckpt)
    images, labels, metrics = sample_and_score(cfg, model)
    params = sum(p.numel() for p in model.transformer.parameters())
    linears = [layer for block in model.blocks for layer in block_linears(block).values()]
    blocks = sum(layer.weight.numel() + layer.bias.numel() for layer in linears)
    return cfg, images, labels, {**metrics, "model_bytes": 4 * params, "blocks_bytes": 4 * blocks}


def quantize_and_score(work: Path, name: str, eval_cfg, fp_images, train_overrides: list[str]) -> tuple[dict, torch.Tensor]:
    """One setting: quantize from scratch (no block cache, so the time is real), then the eval protocol."""
    cfg = config("train", f"paths.output_dir={work / name}", f"paths.log_dir={work / 'logs'}", "resume=false",
                 "log_samples=0", "trainer.enable_progress_bar=false", *train_overrides)
    start = time.time()
    ckpt = quantize(cfg)
    wall = time.time() - start
    manifest = read_manifest(ckpt)
    model = load_quantized(ckpt, cfg.model)
    images, _, metrics = sample_and_score(eval_cfg, model, compare_to=fp_images)
    blocks = manifest["blocks"]
    mean = lambda key: sum(b[key] for b in blocks) / len(blocks) if all(key in b for b in blocks) else None  # noqa: E731
    row = {"setting": name, **metrics, **manifest["sizes"], "calibration_s": manifest["calibration_seconds"],
           "quantize_wall_s": round(wall, 1), "bits": round(math.log2(cfg.quant.k) / cfg.quant.d, 3),
           "k": cfg.quant.k, "d": cfg.quant.d, "kmeans_block_mse": mean("kmeans_mse"),
           "soft_block_mse": mean("soft_mse"), "hard_block_mse": mean("hard_mse")}
    return row, images


def labelled_rows(rows: list[tuple[str, torch.Tensor]], labels: torch.Tensor, per_class: int = 1,
                  upscale: int = 3) -> Image.Image:
    """One row per setting: the first `per_class` samples of every class (same noise in every row)."""
    picks = torch.cat([(labels == c).nonzero().squeeze(1)[:per_class] for c in labels.unique()])
    strips = []
    for _, images in rows:
        padded = torch.nn.functional.pad(images[picks][:, 0], (1, 1, 1, 1), value=0.0)  # grey frames
        strip = torch.cat(list(padded), dim=1)
        strips.append(((strip.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    grid = torch.cat(strips, dim=0).numpy()
    image = Image.fromarray(grid).resize((grid.shape[1] * upscale, grid.shape[0] * upscale), Image.NEAREST)
    margin = 110
    canvas = Image.new("L", (image.width + margin, image.height), 255)
    canvas.paste(image, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = image.height // len(rows)
    for i, (name, _) in enumerate(rows):
        draw.text((4, i * row_h + row_h // 2 - 5), name, fill=0)
    return canvas


def write_results(out: Path, rows: list[dict], table: str, extra: dict) -> None:
    (out / "results.json").write_text(json.dumps({"rows": rows, **extra}, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
