"""What the benchmark commands share: composing the real configs, fresh result folders, figures, result files."""

import json
import os
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


def config(name: str, *overrides: str):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def fresh_dir(path: Path) -> Path:
    """A results folder that holds nothing yet (an empty one left by a crashed run is fine)."""
    if path.exists() and any(path.iterdir()):
        raise SystemExit(f"error: {path} already exists; earlier results are never overwritten (pass --out)")
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    margin = 8 + max(110, *(int(measure.textlength(name)) for name, _ in rows))  # the longest label fits
    canvas = Image.new("L", (image.width + margin, image.height), 255)
    canvas.paste(image, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = image.height // len(rows)
    for i, (name, _) in enumerate(rows):
        draw.text((4, i * row_h + row_h // 2 - 5), name, fill=0)
    return canvas


def fp_blocks(cfg):
    """Every block of `cfg`'s model in turn as BlockData on its zero-data pool: fp inputs, training and held-out
    rows, the fp block's outputs as targets (one forward of the pool per block)."""
    import copy

    from vq4dit.calibration.zero_data import ZeroDataBlockInputs
    from vq4dit.errors import instantiate
    from vq4dit.methods.block_data import BlockData

    device = torch.device(cfg.device)
    model = instantiate(cfg.model)
    pool = ZeroDataBlockInputs.of(model, instantiate(cfg.sampler), instantiate(cfg.pool), cfg.seed, progress=False)
    hidden = pool.hidden
    for i, block in enumerate(model.blocks):
        targets = pool.block_outputs(block, device, hidden)
        rows = lambda part: (hidden[part], pool.timesteps[part], pool.labels[part], targets[part])  # noqa: E731
        yield BlockData(copy.deepcopy(block), i, rows(pool.train_rows), rows(pool.heldout_rows), device, cfg.seed)
        hidden = targets


def write_results(out: Path, rows: list[dict], table: str, extra: dict) -> None:
    (out / "results.json").write_text(json.dumps({"rows": rows, **extra}, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
