"""Quantization presets: what a quantized weight looks like, independent of the method that produces it.

A preset belongs to a family. VQ presets give a codebook of k codewords of d weights (log2(k)/d bits per
weight); uniform presets give bits, a group size along the input dimension (None: one group per output
channel) and symmetry. A method names the family it accepts and refuses presets of another one.
"""

import math
from dataclasses import asdict, dataclass

from vq4dit.errors import UserError


@dataclass(frozen=True)
class VQPreset:
    k: int
    d: int
    name: str = ""
    family = "vq"

    def __post_init__(self):
        if self.k < 2 or self.d < 1:
            raise UserError(f"quant.k={self.k}, quant.d={self.d}: need k >= 2 and d >= 1")

    @property
    def bits(self) -> float:
        """Bits per weight of the codes alone as stored (ceil(log2 k) bits a code; the codebook comes on top)."""
        return math.ceil(math.log2(self.k)) / self.d

    def describe(self) -> str:
        return f"k={self.k}, d={self.d}"

    def values_name(self) -> str:
        return f"k{self.k}-d{self.d}"

    def check(self, linears: dict) -> None:
        for name, layer in linears.items():
            if layer.in_features % self.d:
                widths = math.gcd(*[lin.in_features for lin in linears.values()])
                raise UserError(f"quant.d={self.d} does not divide the input width {layer.in_features} of {name}; "
                                f"use a divisor of {widths}")
            if self.k > layer.weight.numel() // self.d:
                raise UserError(f"quant.k={self.k} is larger than the {layer.weight.numel() // self.d} sub-vectors of "
                                f"{name} at d={self.d}; use k <= {layer.weight.numel() // self.d}")


@dataclass(frozen=True)
class UniformPreset:
    bits: int
    group_size: int | None = None  # None: per output channel (one group spanning the input)
    symmetric: bool = False
    name: str = ""
    family = "uniform"

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise UserError(f"quant.bits={self.bits}; valid: 2..8")
        if self.group_size is not None and self.group_size < 1:
            raise UserError(f"quant.group_size={self.group_size}; valid: a positive width, or null (per channel)")

    def describe(self) -> str:
        groups = "per channel" if self.group_size is None else f"group {self.group_size}"
        return f"{self.bits} bits, {groups}, {'symmetric' if self.symmetric else 'asymmetric'}"

    def values_name(self) -> str:
        return f"w{self.bits}{'pc' if self.group_size is None else f'g{self.group_size}'}{'-sym' if self.symmetric else ''}"

    def check(self, linears: dict) -> None:
        if self.group_size is None:
            return
        for name, layer in linears.items():
            if layer.in_features % self.group_size:
                widths = math.gcd(*[lin.in_features for lin in linears.values()])
                raise UserError(f"quant.group_size={self.group_size} does not divide the input width "
                                f"{layer.in_features} of {name}; use a divisor of {widths} or null (per channel)")


FAMILIES = {"vq": VQPreset, "uniform": UniformPreset}


def preset_record(preset) -> dict:
    """The preset as the manifest stores it."""
    return {"family": preset.family, **asdict(preset)}
