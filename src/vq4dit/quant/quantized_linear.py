"""The deployed form of a quantized linear layer, and how it is stored.

Every deployed layer type (VQ codes + codebook, uniform integer codes + per-group scale/zero, ...) subclasses
`QuantizedLinear` with a `layer_type` name. `stored()` gives the tensors exactly as they go into the checkpoint
(codes bit-packed to their width) and a JSON-able record of the layer's type and parameters; `from_stored`
rebuilds the layer from both. Loading dispatches on the recorded type through `LAYER_TYPES`, never on tensor
names, so a new layer type is one subclass. A layer's optional activation quantizer (`input_quantizer`, see
act_quantizer.py, a forward pre-hook) is stored with it by `stored_form` and reinstalled by `from_stored`, for
every layer type.

Inference (quant/decode.py): without autograd a forward decodes the weight tile by tile (`decode_rows`) into a
reused buffer and runs the dense GEMM on each tile; `to_dense` gives the `nn.Linear` for `decode=once`, and
`decode_once` (here, above decode.py, since it looks for this class) swaps them in throughout a model. With
autograd (calibration trains codebooks, scales, biases) it goes through `dequantize()`, which is differentiable.
"""

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vq4dit.quant.act_quantizer import (
    PREFIX,
    attach_input_quantizer,
    input_quantizer_from_stored,
    input_quantizer_of,
    stored_input_quantizer,
)
from vq4dit.quant.decode import compute_dtype, decoded_linear, dense_linear

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

    def hold_fixed(self, hold: bool) -> None:
        """While a fit trains the layer's float parameters (the model-level fit), keep decoded what the fit cannot
        change, so its every step does not decode it again (`hold=False` drops it). Held as a non-persistent
        buffer: it follows the layer's device and never reaches a checkpoint. Types with nothing to hold skip it."""

    def decode_rows(self, start: int, stop: int, out: torch.Tensor) -> None:
        """Write rows [start, stop) of the dense weight into `out` ((stop - start) x in, its own dtype); layer
        types override this with a decode of only those rows."""
        out.copy_(self.dequantize()[start:stop])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            # cast once to the dtype nn.Linear's matmul runs in (autocast's, else x's): one rounding, as autocast's
            dtype = compute_dtype(x)
            return F.linear(x, self.dequantize().to(dtype), None if self.bias is None else self.bias.to(dtype))
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


def stored_form(layer: QuantizedLinear) -> tuple[dict[str, torch.Tensor], dict]:
    """What the checkpoint holds for `layer`: its type's `stored()` plus its input quantizer, if any (tensors
    under `input_quantizer.*`, settings under the record's `input_quantizer`)."""
    tensors, record = layer.stored()
    act_tensors, act_record = stored_input_quantizer(layer)
    if act_record is None:
        return tensors, record
    return {**tensors, **act_tensors}, {**record, "input_quantizer": act_record}


def is_weight_encoding(key: str) -> bool:
    """Whether a stored tensor encodes the weight (codes, codebook, scales, zeros): not the bias, not the input
    quantizer's scales."""
    return key != "bias" and not key.startswith(PREFIX)


def from_stored(tensors: dict[str, torch.Tensor], record: dict) -> QuantizedLinear:
    """The deployed layer a checkpoint record describes (its `type` picks the class), with its input quantizer."""
    kind = record.get("type")
    if kind not in LAYER_TYPES:
        raise ValueError(f"unknown quantized layer type {kind!r}; known: {', '.join(sorted(LAYER_TYPES))}")
    own = {key: t for key, t in tensors.items() if not key.startswith(PREFIX)}
    layer = LAYER_TYPES[kind].from_stored(own, record)
    acting = record.get("input_quantizer")
    if acting is None and len(own) < len(tensors):
        raise ValueError(f"it stores {next(k for k in tensors if k.startswith(PREFIX))} but its record has no "
                         "input_quantizer")
    quantizer = input_quantizer_from_stored(tensors, acting)
    if quantizer is not None and quantizer.width not in (None, layer.in_features):
        raise ValueError(f"input quantizer record width={quantizer.width}; valid: the layer's input width "
                         f"{layer.in_features}")
    return attach_input_quantizer(layer, quantizer)


def linear_bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().float().clone()


def decode_once(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized layer of `model` by its dense `nn.Linear` (default dtype: the bias's, else fp32),
    one layer at a time, so the peak is the dense model plus one layer's codes."""
    names = [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name in names:
        layer = model.get_submodule(name)
        chosen = dtype or (layer.bias.dtype if layer.bias is not None else torch.float32)
        parent, _, child = name.rpartition(".")
        # the dense layer keeps the quantized one's activation quantizer: decoding changes how, not what, it computes
        dense = attach_input_quantizer(layer.to_dense(chosen), input_quantizer_of(layer))
        setattr(model.get_submodule(parent) if parent else model, child, dense)
    return model
