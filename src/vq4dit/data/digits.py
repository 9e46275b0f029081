"""scikit-learn's bundled handwritten digits (1797 real 8x8 images, 10 classes) as 16x16 images in [-1, 1]."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits


def digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(images N x 1 x size x size in [-1, 1], labels N); the same tensors on every call."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.tensor(data.target, dtype=torch.long)


def split(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split into (first, second) index tensors; `fraction` of each class goes to the first."""
    g = torch.Generator().manual_seed(seed)
    first, second = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = round(len(idx) * fraction)
        first.append(idx[:cut])
        second.append(idx[cut:])
    return torch.cat(first).sort().values, torch.cat(second).sort().values
