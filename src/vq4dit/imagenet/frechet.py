"""Fréchet distance of streamed features to fixed statistics: FID against the reference batch's `mu`/`sigma` and
sFID against its `mu_s`/`sigma_s`, as the ADM evaluator computes them (never against a subset of its images).

torchmetrics' `FrechetInceptionDistance` does the math: it accumulates the samples' feature sums in float64 on
the device and takes the distance; its real side is set to the stored statistics instead of being accumulated.
"""

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance


class PrecomputedFeatures(nn.Module):
    """FrechetInceptionDistance's feature network when the features are already computed: they are its input."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class FrechetDistanceToStatistics:
    def __init__(self, mu: np.ndarray, sigma: np.ndarray, device: str | torch.device):
        features = PrecomputedFeatures(len(mu))
        self.metric = FrechetInceptionDistance(feature=features, reset_real_features=False).to(device)
        mu_t = torch.as_tensor(mu, dtype=torch.float64, device=self.metric.device)
        sigma_t = torch.as_tensor(sigma, dtype=torch.float64, device=self.metric.device)
        # torchmetrics keeps running sums; the sums of a nominal n = 2 real samples give back mu and sigma
        n = 2
        self.metric.real_features_sum = n * mu_t
        self.metric.real_features_cov_sum = (n - 1) * sigma_t + n * torch.outer(mu_t, mu_t)
        self.metric.real_features_num_samples = torch.tensor(n, device=self.metric.device)

    @property
    def num_features(self) -> int:
        return len(self.metric.real_features_sum)

    def update(self, features: torch.Tensor) -> None:
        self.metric.update(features.to(self.metric.device, torch.float64), real=False)

    def compute(self) -> float:
        return float(self.metric.compute())
