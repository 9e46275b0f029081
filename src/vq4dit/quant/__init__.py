"""Quantized layers and what they are made of (k-means, packing, presets, the checkpoint).

Importing this package registers every deployed layer type, so a checkpoint can be loaded by any caller.
"""

from vq4dit.quant import uniform_linear, vq_linear  # noqa: F401  (registers the deployed layer types)
