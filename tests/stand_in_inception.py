"""A small stand-in for torch-fidelity's Inception (which needs torchvision, absent on CPU machines), shaped like
it so that `vq4dit.imagenet.inception.InceptionFeatures` wraps it as it wraps the real network: forward takes
uint8 images N x 3 x H x W at any resolution and returns (pool, logits); the spatial features come from its
`Mixed_6d.branch1x1` submodule (8 channels on a 2 x 2 grid: 7 x 2 x 2 = 28 spatial features).
"""

import torch
import torch.nn.functional as F
from torch import nn

from vq4dit.imagenet.inception import InceptionFeatures

POOL, CLASSES, GRID = 6, 5, 2
SPATIAL = 7 * GRID * GRID


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch1x1 = nn.Conv2d(3, 8, 1)


class StandInInception(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.Mixed_6d = _Block()
            self.stem = nn.Conv2d(3, POOL, 1)
            self.fc = nn.Linear(POOL, CLASSES, bias=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert images.dtype == torch.uint8 and images.shape[1] == 3, (images.dtype, images.shape)
        x = F.adaptive_avg_pool2d(images.float() / 128 - 1, GRID)
        torch.relu(self.Mixed_6d.branch1x1(x))  # read by InceptionFeatures' hook, like Mixed_6d's 1x1 branch
        pool = torch.tanh(self.stem(x)).mean((2, 3)) * 3
        return pool, self.fc(pool) * 4


def stand_in_features(seed: int = 0) -> InceptionFeatures:
    """The Hydra target the tests give as metric.feature_network."""
    return InceptionFeatures(StandInInception(seed))
