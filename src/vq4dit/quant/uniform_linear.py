"""Uniform (scalar) integer quantization of a linear layer's weight, per output channel or in groups along the
input dimension, and the deployed layer that holds it.

Asymmetric min-max: a group's range [min(w, 0), max(w, 0)] is cut into 2^b - 1 steps, scale s = range / (2^b - 1),
integer zero point z = round(-min / s), codes q = clamp(round(w / s) + z, 0, 2^b - 1), weight (q - z) * s. The
range includes 0, so z is an integer in [0, 2^b - 1] and exact zeros stay exact (as in GPTQ's reference
quantizer). Symmetric: s = max|w| / (2^(b-1) - 1), q in [-(2^(b-1) - 1), 2^(b-1) - 1] (stored shifted to
unsigned), no zero point. Scales are rounded to fp16, the dtype they are stored in, before any code is chosen,
so the deployed layer computes exactly what the quantizer measured.

A group is normally a run of `group_size` consecutive input columns. GPTQ with act-order and dynamic groups forms
its groups in its own column order, so such a layer carries `group_index`, each input column's group (AutoGPTQ's
g_idx; int32 in memory, bit-packed to ceil(log2 groups) bits on disk), and looks every column's scale and zero up
through it.
"""

from dataclasses import dataclass

import torch
from torch import nn

from vq4dit.quant.decode import unpack_tile, workspace
from vq4dit.quant.packing import code_bits, pack_codes, unpack_codes
from vq4dit.quant.quantized_linear import QuantizedLinear, linear_bias
from vq4dit.tensor_checks import (
    check_all_finite,
    check_bias,
    check_codes_at_most,
    check_floating,
    check_only,
    check_packed,
    check_positive,
    check_shape,
    record_bool,
    record_int,
)

SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class UniformGrid:
    """Scale and zero point of each (row, group) of a weight, for `bits`-bit codes."""

    scale: torch.Tensor  # (out, groups) float32 holding fp16 values
    zero: torch.Tensor   # (out, groups) float32 holding integers
    bits: int
    symmetric: bool

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1


def fit_grid(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype = SCALE_DTYPE) -> UniformGrid:
    """The grid of every row of `w` (out, width) taken as one group: (out, 1) scales and zeros. Scales hold
    values of `scale_dtype` (the storage dtype; float32 only to compare with simulation-only references)."""
    w = w.float()
    if symmetric:
        half = (1 << (bits - 1)) - 1
        scale = _representable(w.abs().amax(dim=1, keepdim=True) / half, scale_dtype)
        return UniformGrid(scale, torch.full_like(scale, half), bits, True)
    low = w.amin(dim=1, keepdim=True).clamp(max=0)
    high = w.amax(dim=1, keepdim=True).clamp(min=0)
    qmax = (1 << bits) - 1
    scale = _representable((high - low) / qmax, scale_dtype)
    zero = torch.round(-low / scale).clamp(0, qmax)
    return UniformGrid(scale, zero, bits, False)


def _representable(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scales as stored, never 0 (an all-zero group keeps scale 1 and codes at the zero point)."""
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.clamp(min=torch.finfo(dtype).smallest_normal).to(dtype).float()


def encode(w: torch.Tensor, grid: UniformGrid) -> torch.Tensor:
    """Integer codes (as float) of `w` (out, width) on a grid with (out, 1) or (out, width) scales."""
    high = grid.qmax if not grid.symmetric else 2 * ((1 << (grid.bits - 1)) - 1)
    return torch.clamp(torch.round(w / grid.scale) + grid.zero, 0, high)


def decode(q: torch.Tensor, grid: UniformGrid) -> torch.Tensor:
    return (q - grid.zero) * grid.scale


def group_width(in_features: int, group_size: int | None) -> int:
    return in_features if group_size is None else group_size


def round_to_nearest(w: torch.Tensor, bits: int, group_size: int | None,
                     symmetric: bool) -> tuple[torch.Tensor, UniformGrid]:
    """RTN: (codes (out, in), grid with (out, groups) scales/zeros), every group fitted to its own min and max."""
    out_features, in_features = w.shape
    g = group_width(in_features, group_size)
    groups = w.float().reshape(out_features * (in_features // g), g)
    grid = fit_grid(groups, bits, symmetric)
    q = encode(groups, grid).reshape(out_features, in_features)
    return q, UniformGrid(grid.scale.reshape(out_features, -1), grid.zero.reshape(out_features, -1), bits, symmetric)


class UniformLinear(QuantizedLinear):
    """Integer codes, per-(row, group) fp16 scales and integer zeros, held as the checkpoint stores them (codes and
    zeros bit-packed: `codes_packed`, `zero_packed`), and optionally each input column's group (`group_index`;
    None: column j is in group j // group_size)."""

    layer_type = "uniform"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int | None,
                 symmetric: bool, bias: torch.Tensor | None, group_index: torch.Tensor | None = None):
        out_features, in_features = codes.shape
        super().__init__(out_features, in_features, bias)
        if in_features % group_width(in_features, group_size):
            raise ValueError(f"group size {group_size} does not divide the input width {in_features}")
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.register_buffer("codes_packed", pack_codes(codes.reshape(-1).to(torch.uint8), bits))
        self.register_buffer("scale", scale.to(SCALE_DTYPE))
        if symmetric:  # the zero point is 2^(b-1) - 1, not stored
            if (zero != (1 << (bits - 1)) - 1).any():
                raise ValueError(f"a symmetric {bits}-bit grid has zero point {(1 << (bits - 1)) - 1}")
        else:
            self.register_buffer("zero_packed", pack_codes(zero.reshape(-1).to(torch.uint8), bits))
        if group_index is not None and tuple(group_index.shape) != (in_features,):
            raise ValueError(f"group_index of shape {tuple(group_index.shape)}; valid: ({in_features},)")
        self.register_buffer("group_index", None if group_index is None else group_index.to(torch.int32))
        self.register_buffer("held_weight", None, persistent=False)  # hold_fixed: the decoded weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None, symmetric: bool) -> "UniformLinear":
        q, grid = round_to_nearest(linear.weight.detach(), bits, group_size, symmetric)
        return cls(q, grid.scale, grid.zero, bits, group_size, symmetric, linear_bias(linear))

    @property
    def codes(self) -> torch.Tensor:
        """The integer codes (out, in), unpacked (uint8): for the reference path and tests."""
        return unpack_codes(self.codes_packed, self.bits, self.num_weights).view(self.out_features, self.in_features)

    @property
    def zero(self) -> torch.Tensor:
        """The zero points (out, groups), unpacked, as float32."""
        if self.symmetric:
            return torch.full_like(self.scale, (1 << (self.bits - 1)) - 1, dtype=torch.float32)
        return unpack_codes(self.zero_packed, self.bits, self.scale.numel()).view(self.scale.shape).float()

    def grid(self) -> UniformGrid:
        """Scales and zeros expanded to every input column."""
        return UniformGrid(self.per_column(self.scale.float()), self.per_column(self.zero), self.bits,
                           self.symmetric)

    def per_column(self, per_group: torch.Tensor) -> torch.Tensor:
        """(rows, groups) -> (rows, in): every input column's value of its group."""
        if self.group_index is not None:
            return per_group.index_select(1, self.group_index)
        return per_group.repeat_interleave(group_width(self.in_features, self.group_size), dim=1)

    def hold_fixed(self, hold: bool) -> None:
        """Codes, scales and zeros are buffers, so a fit trains only the bias: the whole weight is held decoded
        (fp32, the dense layer's size) while it runs."""
        self.held_weight = None
        self.held_weight = self.dequantize() if hold else None

    def dequantize(self) -> torch.Tensor:
        if self.held_weight is not None:
            return self.held_weight
        return decode(self.codes.float(), self.grid())

    def decode_rows(self, start: int, stop: int, out: torch.Tensor) -> None:
        rows, groups = stop - start, self.scale.shape[1]
        # in fp32, as dequantize(), then one rounding; in place, in `out` itself when it is fp32, else in one shared
        # fp32 scratch tile: a whole-layer tile (decode.TILE_WEIGHTS) makes no temporaries of its size
        fp32 = out.dtype == torch.float32 and out.is_contiguous()
        w = out if fp32 else workspace((rows, self.in_features), torch.float32, out.device, "uniform")
        codes = unpack_tile(self.codes_packed, self.bits, start * self.in_features, rows * self.in_features)
        scale = self.scale if rows == len(self.scale) else self.scale[start:stop]
        zero = (1 << (self.bits - 1)) - 1 if self.symmetric else unpack_tile(
            self.zero_packed, self.bits, start * groups, rows * groups, slot="zero").view(rows, groups).float()
        if self.group_index is not None:  # scattered groups: scales and zeros gathered per column (tile-sized)
            q, scale = w.view(rows, self.in_features), self.per_column(scale)
            zero = zero if self.symmetric else self.per_column(zero)
        else:
            q, scale = w.view(rows, groups, -1), scale[:, :, None]
            zero = zero if self.symmetric else zero[:, :, None]
        q.copy_(codes.view(q.shape))
        q.sub_(zero).mul_(scale)
        if not fp32:
            out.copy_(w)

    def stored(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"codes_packed": self.codes_packed, "scale": self.scale, **self._stored_bias()}
        if not self.symmetric:
            tensors["zero_packed"] = self.zero_packed
        if self.group_index is not None:
            tensors["group_index_packed"] = pack_codes(self.group_index, code_bits(self.scale.shape[1]))
        return tensors, self._record(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                                     groups=self.scale.shape[1])

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], record: dict) -> "UniformLinear":
        (out_features, in_features), bits = record["shape"], record_int(record, "bits", 2, 8)
        groups, symmetric = record_int(record, "groups", 1), record_bool(record, "symmetric")
        group_size = None if record["group_size"] is None else record_int(record, "group_size", 1)
        if groups != (1 if group_size is None else in_features // group_size) \
                or (group_size is not None and in_features % group_size):
            raise ValueError(f"record bits={bits}, group_size={group_size}, groups={groups} does not describe a "
                             f"{out_features}x{in_features} layer")
        # the grid's kind is in the tensors too: asymmetric layers store their zero points, symmetric ones none
        # (their zero is 2^(b-1) - 1): a record whose flag disagrees would decode every weight off its grid
        if symmetric and "zero_packed" in tensors:
            raise ValueError("record symmetric=true, but the layer stores zero points (zero_packed); valid: "
                             "symmetric=false for a layer with zero points")
        if not symmetric and "zero_packed" not in tensors:
            raise ValueError("record symmetric=false, but the layer stores no zero points (zero_packed); valid: "
                             "symmetric=true for a layer without them")
        check_only(tensors, {"codes_packed", "scale", "bias", "group_index_packed"}
                   | ({"zero_packed"} if not symmetric else set()))
        check_packed("codes_packed", tensors["codes_packed"], out_features * in_features, bits)
        check_shape("scale", tensors["scale"], (out_features, groups))
        check_floating("scale", tensors["scale"])
        if not symmetric:
            check_packed("zero_packed", tensors["zero_packed"], out_features * groups, bits)
        check_bias(tensors, out_features)
        group_index = None
        if "group_index_packed" in tensors:
            group_index = stored_group_index(tensors["group_index_packed"], in_features, groups,
                                             group_width(in_features, group_size))
        check_all_finite(tensors)
        check_positive("scale", tensors["scale"])
        codes = unpack_codes(tensors["codes_packed"], bits,
                             out_features * in_features).reshape(out_features, in_features)
        half = (1 << (bits - 1)) - 1
        if symmetric:  # codes -half..half, stored shifted by half: 2^b - 1 is off the grid
            check_codes_at_most("codes_packed", codes, 2 * half)
            zero = torch.full_like(tensors["scale"], half, dtype=torch.float32)
        else:
            zero = unpack_codes(tensors["zero_packed"], bits, out_features * groups).reshape(out_features, groups)
        return cls(codes, tensors["scale"], zero, bits, group_size, symmetric, tensors.get("bias"), group_index)

    def extra_repr(self) -> str:
        groups = "per channel" if self.group_size is None else f"group {self.group_size}"
        groups += ", indexed groups" if self.group_index is not None else ""
        return (f"{self.in_features}->{self.out_features}, {self.bits} bits, {groups}, "
                f"{'sym' if self.symmetric else 'asym'}")


def stored_group_index(packed: torch.Tensor, in_features: int, groups: int, width: int) -> torch.Tensor:
    """The group of every input column from its packed form, checked: each names a group of the record, and each
    group holds `width` columns."""
    check_packed("group_index_packed", packed, in_features, code_bits(groups))
    group_index = unpack_codes(packed, code_bits(groups), in_features).to(torch.int32)
    if int(group_index.max()) >= groups:
        raise ValueError(f"tensor group_index_packed holds group {int(group_index.max())}, its record allows "
                         f"0..{groups - 1}")
    sizes = torch.bincount(group_index, minlength=groups)
    if (sizes != width).any():
        g = int((sizes != width).nonzero()[0])
        raise ValueError(f"tensor group_index_packed puts {int(sizes[g])} columns in group {g}; its record needs "
                         f"{width} in every group")
    return group_index
