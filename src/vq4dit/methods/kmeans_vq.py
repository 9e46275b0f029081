"""Plain k-means VQ: per layer a k-means codebook (k x d) on its own sub-vectors, every sub-vector on its nearest
codeword. No fitting; it is also the starting point of classic VQ and VQ4DiT."""

from dataclasses import dataclass

from torch import nn

from vq4dit.errors import UserError
from vq4dit.methods.base import Method
from vq4dit.quant.presets import VQPreset
from vq4dit.quant.vq_linear import VQLinear


@dataclass
class KMeansVQ(Method):
    quant: VQPreset
    kmeans_iters: int = 100                # Lloyd iterations (greedy k-means++ start); stops early once converged
    kmeans_points_per_codeword: int = 256  # Lloyd runs on at most this many sub-vectors per codeword (faiss's cap)
    name = "kmeans"
    family = "vq"

    def __post_init__(self):
        super().__post_init__()
        for key in ("kmeans_iters", "kmeans_points_per_codeword"):
            if getattr(self, key) < 1:
                raise UserError(f"method.{key}={getattr(self, key)}; valid: a positive integer")

    def start(self, linears: dict[str, nn.Linear], data) -> dict[str, VQLinear]:
        k, d = self.quant.k, self.quant.d
        return {name: VQLinear.from_linear(linear, k, d, iters=self.kmeans_iters, seed=data.layer_seed(j),
                                           max_points=self.kmeans_points_per_codeword * k).rounded()
                for j, (name, linear) in enumerate(linears.items())}
