"""The deployed form of a quantized linear layer, and how it is stored.

Every deployed layer type (VQ codes + codebook, uniform integer codes + per-group scale/zero, ...) subclasses
`QuantizedLinear` with a `layer_type` name. `stored()` gives the tensors exactly as they go into the checkpoint
(codes bit-packed to their width) and a JSON-able record of the layer's type and parameters; `from_stored`
rebuilds the layer from both. Loading dispatches on the recorded type through `LAYER_TYPES`, never on tensor
names, so a new layer type is one subclass.

Inference (quant/decode.py): without autograd a forward decodes the weight tile by tile (`decode_rows`) into a
reused buffer and runs the dense GEMM on each tile; `to_dense` gives the `nn.Linear` for `decode=once`. With
autograd (calibration trains codebooks, scales, biases) it goes through `dequantize()`, which is differentiable.
"""

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vq4dit.quant.decode import decoded_linear, dense_linear

LAYER_TYPES: dict[str, type["QuantizedLinear"]] = {}


class QuantizedLinear(nn.Module):
    layer_type: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        LAYER_TYPES[cls.layer_type] = cls

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bias = nn.Parameter(bias) if bias is not None else None

    def dequantize(self) -> torch.Tensor:
        """The dense (out, in) weight this layer stands for: the reference path for tests and decoding."""
        raise NotImplementedError

    def decode_rows(self, start: int, stop: int, out: torch.Tensor) -> None:
        """Write rows [start, stop) of the dense weight into `out` ((stop - start) x in, its own dtype); layer
        types override this with a decode of only those rows."""
        out.copy_(self.dequantize()[start:stop])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return decoded_linear(self, x)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The dense layer this one stands for (`decode=once`)."""
        return dense_linear(self, dtype)

    @property
    def num_weights(self) -> int:
        return self.out_features * self.in_features

    def stored(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors as written to the checkpoint, record of type and parameters) of this layer; every tensor but
        `bias` is part of the weight's encoding (codes, codebook, scales, zeros)."""
        raise NotImplementedError

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], record: dict) -> "QuantizedLinear":
        raise NotImplementedError

    def _record(self, **params) -> dict:
        return {"type": self.layer_type, "shape": [self.out_features, self.in_features], **params}

    def _stored_bias(self) -> dict[str, torch.Tensor]:
        return {} if self.bias is None else {"bias": self.bias.detach().float()}


def from_stored(tensors: dict[str, torch.Tensor], record: dict) -> QuantizedLinear:
    """The deployed layer a checkpoint record describes (its `type` picks the class)."""
    kind = record.get("type")
    if kind not in LAYER_TYPES:
        raise ValueError(f"unknown quantized layer type {kind!r}; known: {', '.join(sorted(LAYER_TYPES))}")
    return LAYER_TYPES[kind].from_stored(tensors, record)


def linear_bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().float().clone()
