"""Classic VQ: the k-means codebook and nearest assignment of plain k-means VQ, then only the codebooks (and
biases) fine-tuned with the block loss; the codes never change. What VQ4DiT improves on."""

import copy
from dataclasses import dataclass

from torch import nn

from vq4dit.methods.kmeans_vq import KMeansVQ
from vq4dit.quant.vq_linear import VQLinear


@dataclass
class ClassicVQ(KMeansVQ):
    name = "classic_vq"
    fits = True

    def prepare(self, linears, start: dict[str, VQLinear], data) -> dict[str, nn.Module]:
        return {name: copy.deepcopy(layer) for name, layer in start.items()}  # the start stays as it was

    def finalize(self, layer: VQLinear) -> VQLinear:
        return layer.rounded()
