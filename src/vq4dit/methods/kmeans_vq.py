"""Plain k-means VQ: per layer a k-means codebook (k x d) on its own sub-vectors, every sub-vector on its nearest
codeword. No fitting; it is also the starting point of classic VQ and VQ4DiT.

`kmeans_weighting: input_moment` makes the codebooks data-aware (GPTVQ's idea for LLMs): what a layer's error
costs is its output error, and a weight's share of it grows with its input channel's second moment E[x^2], so
k-means and the assignment weigh each coordinate of a sub-vector by that moment, measured on the block's
training rows of the zero-data pool.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vq4dit.methods.base import Method
from vq4dit.quant.presets import VQPreset
from vq4dit.quant.vq_linear import VQLinear
from vq4dit.settings import setting


@dataclass
class KMeansVQ(Method):
    quant: VQPreset
    kmeans_iters: int = setting(100, low=1)  # Lloyd iterations (greedy k-means++ start); stops early once converged
    # Lloyd runs on at most this many sub-vectors per codeword (faiss's cap), then every sub-vector is assigned
    kmeans_points_per_codeword: int = setting(256, low=1)
    # none | input_moment: k-means and assignment weigh each coordinate by its input channel's E[x^2] on the pool
    # (data-aware codebooks, GPTVQ-style)
    kmeans_weighting: Literal["none", "input_moment"] = "none"
    moment_damp: float = setting(0.01, low=0)  # + this x the layer's mean moment, as GPTQ damps its Hessian
    name = "kmeans"
    family = "vq"

    def start(self, linears: dict[str, nn.Linear], data) -> dict[str, VQLinear]:
        k, d = self.quant.k, self.quant.d
        moments = self.input_weights(linears, data)
        return {name: VQLinear.from_linear(linear, k, d, iters=self.kmeans_iters, seed=data.layer_seed(j),
                                           max_points=self.kmeans_points_per_codeword * k,
                                           input_weights=moments.get(name)).rounded()
                for j, (name, linear) in enumerate(linears.items())}

    def input_weights(self, linears: dict[str, nn.Linear], data) -> dict[str, torch.Tensor]:
        """Layer name -> per-input-channel weights of its k-means ({} unweighted); one pass over the training rows,
        kept on `data` for the method's later steps."""
        if self.kmeans_weighting == "none":
            return {}
        if "input_moments" not in data.memo:
            sums = {name: torch.zeros(linear.in_features, dtype=torch.float64, device=data.device)
                    for name, linear in linears.items()}
            counts = dict.fromkeys(linears, 0)

            def observe(name: str, x: torch.Tensor) -> None:
                x = x.detach().reshape(-1, x.shape[-1])
                sums[name] += x.double().square().sum(0)
                counts[name] += len(x)

            data.observe_inputs(list(linears), observe)
            data.memo["input_moments"] = {name: (sums[name] / max(counts[name], 1)).float() for name in linears}
        moments = data.memo["input_moments"]
        return {name: m + self.moment_damp * m.mean() for name, m in moments.items()}
