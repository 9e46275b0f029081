"""Files a run writes: always to a temporary name first, then renamed, and never over an existing file."""

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vq4dit.errors import UserError
from vq4dit.files import save_safetensors


def fresh(path: Path) -> Path:
    if path.exists():
        raise UserError(f"{path} already exists; earlier results are never overwritten (choose another folder)")
    return path


def write_json(path: Path, obj) -> None:
    fresh(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 [0, 255], rounded to nearest (as DiT's sample_ddp.py: 127.5 x + 128, truncated)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_indices(labels: torch.Tensor, columns: int, max_rows: int = 10) -> torch.Tensor:
    """Which samples `image_grid` shows: the first `columns` of each of the first `max_rows` classes."""
    picks = [(labels == c).nonzero().squeeze(1)[:columns] for c in labels.unique()[:max_rows]]
    return torch.cat(picks).sort().values


def image_grid(images: torch.Tensor, labels: torch.Tensor, columns: int, max_rows: int = 10) -> np.ndarray:
    """A row per class (the first `max_rows` classes), `columns` framed samples each; images in [-1, 1] -> uint8."""
    rows = []
    for c in labels.unique()[:max_rows]:
        picked = images[labels == c][:columns]
        if len(picked) < columns:  # pad short rows with black
            picked = torch.cat([picked, -torch.ones(columns - len(picked), *images.shape[1:])])
        picked = F.pad(picked, (1, 1, 1, 1), value=0.0)  # a grey frame keeps neighbouring samples apart
        rows.append(torch.cat(list(picked), dim=2))
    grid = torch.cat(rows, dim=1)
    grid = to_uint8(grid).permute(1, 2, 0).numpy()
    return grid if grid.shape[2] == 3 else grid[:, :, 0]


def save_png(path: Path, array: np.ndarray, upscale: int = 1) -> None:
    fresh(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    image = Image.fromarray(array)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    image.save(tmp)
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    fresh(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_safetensors({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)
