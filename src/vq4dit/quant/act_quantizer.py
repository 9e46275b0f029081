"""Fake quantization of activations: the input quantizer a linear layer (deployed or in calibration) may carry.

Activations are *simulated*: a quantizer rounds its input to the integer grid and maps it straight back to
floats (quantize-dequantize), so the layer's matmul still runs in floating point on values a b-bit integer
could hold. Granularity:
- `tensor`: one range for the whole input (static: one scale for every call; dynamic: one range per sample);
- `token`: one range per token (row of the last dimension); dynamic only;
- `token_group`: one range per run of `group_size` consecutive channels of a token (dynamic), or per channel
  group shared by every token (static).
Dynamic ranges are min-max of the values at hand, recomputed every call (Q-DiT); static scales and zero points
are calibrated once on the zero-data pool (`calibrate_static`) and stored (PTQ4DiT). Asymmetric grids have codes
0..2^b-1, s = (max - min) / (2^b - 1) and an integer zero point z = round(-min / s) that is *not* clamped to the
code range (a group whose values are all positive keeps its whole range; clamping z, as Q-DiT's code does,
would clip it). Symmetric grids have codes -(2^(b-1) - 1)..2^(b-1) - 1 and s = max|x| / (2^(b-1) - 1).

Rounding passes gradients straight through (STE), so a block loss can be trained through the quantized
activations; a static scale can be made learnable (block reconstruction learns it, as PTQ4DiT does).

`attach_input_quantizer` puts a quantizer on any layer as its `input_quantizer` submodule with a forward
pre-hook, so it applies whatever the layer's own forward is (deployed layers, VQ4DiT's soft layers, plain
linears); the checkpoint stores it with the layer (`stored_input_quantizer`, `input_quantizer_from_stored`).
"""

import math

import torch
from torch import nn

from vq4dit.tensor_checks import check_floating, check_integral, check_only, check_shape, record_bool, record_int

GRANULARITIES = ("tensor", "token", "token_group")
STATIC_GRANULARITIES = ("tensor", "token_group")
CLIP_PERCENTILES = (1.0, 0.99999, 0.9999, 0.999)  # static ranges: the candidate that quantizes with least MSE
MAX_CALIBRATION_VALUES = 1 << 24                    # torch.quantile's input limit


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (straight-through estimator)."""
    return x + (x.round() - x).detach()


class ActQuantizer(nn.Module):
    def __init__(self, bits: int, granularity: str, dynamic: bool, symmetric: bool = False,
                 group_size: int | None = None, width: int | None = None):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r}; valid: {', '.join(GRANULARITIES)}")
        if not dynamic and granularity not in STATIC_GRANULARITIES:
            raise ValueError(f"static quantization needs granularity {' or '.join(STATIC_GRANULARITIES)}")
        if granularity == "token_group" and not group_size:
            raise ValueError("granularity token_group needs a group_size")
        if not dynamic and width is None:
            raise ValueError("static quantization needs the input width")
        if width is not None and granularity == "token_group" and width % group_size:
            raise ValueError(f"group size {group_size} does not divide the input width {width}")
        self.bits, self.granularity, self.dynamic, self.symmetric = bits, granularity, dynamic, symmetric
        self.group_size = group_size if granularity == "token_group" else None
        self.width = width
        if not dynamic:
            groups = 1 if granularity == "tensor" else width // group_size
            self.register_buffer("scale", torch.ones(groups))
            self.register_buffer("zero", torch.zeros(groups))

    @property
    def levels(self) -> tuple[int, int]:
        """Smallest and largest integer code."""
        if self.symmetric:
            half = (1 << (self.bits - 1)) - 1
            return -half, half
        return 0, (1 << self.bits) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = self._grouped(x.float())
        scale, zero = self._dynamic_grid(grouped) if self.dynamic else self._static_grid()
        low, high = self.levels
        q = torch.clamp(round_ste(grouped / scale) + zero, low, high)
        return ((q - zero) * scale).reshape(x.shape).to(x.dtype)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """x viewed so that every range is taken over the last dimension: (..., groups, values per range)."""
        if self.granularity == "token":
            return x.unsqueeze(-2)
        if self.granularity == "token_group":
            return x.reshape(*x.shape[:-1], x.shape[-1] // self.group_size, self.group_size)
        if self.dynamic:  # one range per sample: every token and channel of it
            return x.reshape(x.shape[0], 1, -1)
        return x.reshape(1, -1)

    def _dynamic_grid(self, grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            if self.symmetric:
                absmax = grouped.abs().amax(-1, keepdim=True)
                return absmax.clamp(min=1e-5) / self.levels[1], torch.zeros_like(absmax)
            low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
            return grid_of(low, high, self.bits)

    def _static_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.scale.abs().clamp(min=1e-8)  # a learned scale may wander through 0
        if self.granularity == "tensor":
            return scale.reshape(()), self.zero.reshape(())
        return scale[:, None], self.zero[:, None]

    # -- learning the static scale (block reconstruction) ---------------------------------------------------
    def learnable_scale(self) -> nn.Parameter:
        """Turn the static scale into a trainable parameter (same name, so the state dict is unchanged)."""
        if self.dynamic:
            raise ValueError("a dynamic quantizer has no stored scale to learn")
        if not isinstance(self.scale, nn.Parameter):
            value = self.scale.detach().clone()
            del self.scale
            self.scale = nn.Parameter(value)
        return self.scale

    def freeze(self) -> "ActQuantizer":
        """The scale back as a buffer (positive), as deployed."""
        if not self.dynamic and isinstance(self.scale, nn.Parameter):
            value = self.scale.detach().clone().abs().clamp(min=1e-8)
            del self.scale
            self.register_buffer("scale", value)
        return self

    # -- storage -------------------------------------------------------------------------------------------
    def record(self) -> dict:
        return {"bits": self.bits, "granularity": self.granularity, "dynamic": self.dynamic,
                "symmetric": self.symmetric, "group_size": self.group_size, "width": self.width}

    def stored(self) -> dict[str, torch.Tensor]:
        if self.dynamic:
            return {}
        tensors = {"scale": self.scale.detach().float().clone()}  # clones: q, k and v share one quantizer
        if not self.symmetric:
            tensors["zero"] = self.zero.detach().float().clone()
        return tensors

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], record: dict) -> "ActQuantizer":
        """The quantizer a record describes, its tensors checked against it: a dynamic one stores none, a static
        one a scale per range and, asymmetric only, integer zero points (a symmetric grid's zero is 0)."""
        optional = lambda key: None if record[key] is None else record_int(record, key, 1)  # noqa: E731
        quantizer = cls(record_int(record, "bits", 2, 16), record["granularity"], record_bool(record, "dynamic"),
                        record_bool(record, "symmetric"), optional("group_size"), optional("width"))
        if quantizer.dynamic:
            check_only(tensors, set(), PREFIX)
            return quantizer
        if quantizer.symmetric and "zero" in tensors:
            raise ValueError("input quantizer record symmetric=true, but it stores zero points (input_quantizer.zero); "
                             "valid: symmetric=false for a quantizer with zero points")
        if not quantizer.symmetric and "zero" not in tensors:
            raise ValueError("input quantizer record symmetric=false, but it stores no zero points "
                             "(input_quantizer.zero); valid: symmetric=true for a quantizer without them")
        check_only(tensors, {"scale"} | ({"zero"} if not quantizer.symmetric else set()), PREFIX)
        for key, tensor in tensors.items():
            check_shape(f"input_quantizer.{key}", tensor, tuple(quantizer.scale.shape))
            check_floating(f"input_quantizer.{key}", tensor)
        quantizer.scale.copy_(tensors["scale"])
        if "zero" in tensors:
            check_integral("input_quantizer.zero", tensors["zero"])
            quantizer.zero.copy_(tensors["zero"])
        return quantizer

    def extra_repr(self) -> str:
        granularity = f"token groups of {self.group_size}" if self.group_size else f"per {self.granularity}"
        return (f"{self.bits} bits, {granularity}, {'dynamic' if self.dynamic else 'static'}, "
                f"{'sym' if self.symmetric else 'asym'}")


def grid_of(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (scale, zero) for ranges [low, high]; a degenerate range keeps a tiny positive scale."""
    scale = (high - low).clamp(min=1e-5) / ((1 << bits) - 1)
    return scale, torch.round(-low / scale)


# -- static calibration --------------------------------------------------------------------------------------
@torch.no_grad()
def calibrate_static(quantizer: ActQuantizer, values: torch.Tensor) -> None:
    """Set a static quantizer's scale (and zero) from observed inputs `values` (rows, width): per range, the
    clipping percentile of CLIP_PERCENTILES whose fake quantization of the values has the least MSE (PTQ4DiT's
    initialisation; percentile 1 is min-max)."""
    per_range = _static_view(quantizer, values.float())  # (ranges, values)
    best_error = None
    for pct in CLIP_PERCENTILES:
        if pct == 1.0:
            low, high = per_range.amin(1), per_range.amax(1)
        else:
            low, high = torch.quantile(per_range, 1 - pct, dim=1), torch.quantile(per_range, pct, dim=1)
        if quantizer.symmetric:
            scale = torch.maximum(low.abs(), high.abs()).clamp(min=1e-5) / quantizer.levels[1]
            zero = torch.zeros_like(scale)
        else:
            scale, zero = grid_of(low, high, quantizer.bits)
        q = torch.clamp(torch.round(per_range / scale[:, None]) + zero[:, None], *quantizer.levels)
        error = ((q - zero[:, None]) * scale[:, None] - per_range).square().mean(1)
        if best_error is None:
            best_error, best_scale, best_zero = error, scale, zero
        else:
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    quantizer.scale.copy_(best_scale)
    quantizer.zero.copy_(best_zero)


def _static_view(quantizer: ActQuantizer, values: torch.Tensor) -> torch.Tensor:
    if quantizer.granularity == "tensor":
        return values.reshape(1, -1)
    g = quantizer.group_size
    return values.reshape(-1, quantizer.width // g, g).transpose(0, 1).reshape(quantizer.width // g, -1)


class InputSample:
    """Keeps an evenly strided subset of the token rows a layer sees over `pool_rows` pool rows (calls give
    (rows, tokens, width) or (rows, width)), at most MAX_CALIBRATION_VALUES values in all."""

    def __init__(self, pool_rows: int):
        self.pool_rows, self.parts, self.stride = pool_rows, [], None

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        if self.stride is None:
            total = self.pool_rows * (len(rows) // x.shape[0]) * rows.shape[1]
            self.stride = max(1, math.ceil(total / MAX_CALIBRATION_VALUES))
        self.parts.append(rows[::self.stride].float())

    def values(self) -> torch.Tensor:
        return torch.cat(self.parts)


# -- attaching to layers ---------------------------------------------------------------------------------------
def _quantize_input(module: nn.Module, args: tuple):
    quantizer = module._modules.get("input_quantizer")
    if quantizer is None:
        return None
    return (quantizer(args[0]), *args[1:])


def attach_input_quantizer(layer: nn.Module, quantizer: ActQuantizer | None) -> nn.Module:
    """`layer` now quantizes its input with `quantizer` (None: removes it); returns the layer."""
    if quantizer is None:
        layer._modules.pop("input_quantizer", None)
        return layer
    layer.input_quantizer = quantizer
    if not getattr(layer, "_quantizes_input", False):
        layer.register_forward_pre_hook(_quantize_input)
        layer._quantizes_input = True
    return layer


def input_quantizer_of(layer: nn.Module) -> ActQuantizer | None:
    return layer._modules.get("input_quantizer")


PREFIX = "input_quantizer."


def stored_input_quantizer(layer: nn.Module) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(tensors under `input_quantizer.*`, record or None) of a layer's input quantizer."""
    quantizer = input_quantizer_of(layer)
    if quantizer is None:
        return {}, None
    return {PREFIX + key: t for key, t in quantizer.stored().items()}, quantizer.record()


def input_quantizer_from_stored(tensors: dict[str, torch.Tensor], record: dict | None) -> ActQuantizer | None:
    if record is None:
        return None
    return ActQuantizer.from_stored({k[len(PREFIX):]: t for k, t in tensors.items() if k.startswith(PREFIX)}, record)
