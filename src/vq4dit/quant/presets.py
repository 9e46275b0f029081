"""Quantization presets: what a quantized weight looks like, independent of the method that produces it.

A preset belongs to a family. VQ presets give a codebook of k codewords of d weights (log2(k)/d bits per
weight); uniform presets give bits, a group size along the input dimension (None: one group per output
channel) and symmetry. A method names the family it accepts and refuses presets of another one.

Activation presets (`ActPreset`, configs/act/) are a family of their own that every method takes: bits, and
the granularity / group size / dynamic-or-static choice, each of which may be left to the method (None).
"""

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

from vq4dit.errors import UserError
from vq4dit.settings import check_settings, setting


@dataclass(frozen=True)
class VQPreset:
    k: int = setting(low=2)  # codewords per layer
    d: int = setting(low=1)  # weights per codeword
    name: str = ""
    family = "vq"

    def __post_init__(self):
        check_settings(self, "quant")

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
    bits: int = setting(low=2, high=8)
    group_size: int | None = setting(None, low=1)  # None: per output channel (one group spanning the input)
    symmetric: bool = False
    name: str = ""
    family = "uniform"

    def __post_init__(self):
        check_settings(self, "quant")

    def describe(self) -> str:
        groups = "per channel" if self.group_size is None else f"group {self.group_size}"
        return f"{self.bits} bits, {groups}, {'symmetric' if self.symmetric else 'asymmetric'}"

    def values_name(self) -> str:
        return (f"w{self.bits}{'pc' if self.group_size is None else f'g{self.group_size}'}"
                f"{'-sym' if self.symmetric else ''}")

    def check(self, linears: dict) -> None:
        if self.group_size is None:
            return
        for name, layer in linears.items():
            if layer.in_features % self.group_size:
                widths = math.gcd(*[lin.in_features for lin in linears.values()])
                raise UserError(f"quant.group_size={self.group_size} does not divide the input width "
                                f"{layer.in_features} of {name}; use a divisor of {widths} or null (per channel)")


FAMILIES = {"vq": VQPreset, "uniform": UniformPreset}


@dataclass(frozen=True)
class ActPreset:
    """How the inputs of a method's quantized linears are fake-quantized; bits None: not at all (act=none).
    granularity, group_size and dynamic left None are the method's choice (`Method.act_defaults`)."""

    bits: int | None = setting(None, low=2, high=16)  # None: activations stay in full precision
    granularity: Literal["tensor", "token", "token_group"] | None = None
    group_size: int | None = setting(None, low=1)     # channels per range for token_group
    dynamic: bool | None = None      # True: min-max of every call; False: static scales calibrated on the pool
    symmetric: bool = False
    attention: bool = False          # also the attention matmul inputs (q, k, v, softmax), dynamically per token
    name: str = ""
    family = "act"

    def __post_init__(self):
        check_settings(self, "act")
        if self.granularity == "token" and self.dynamic is False:
            raise UserError("act.granularity=token with act.dynamic=false; valid: static ranges are per tensor or "
                            "per channel group (token_group)")
        if self.bits is None and self.attention:
            raise UserError("act.attention=true with act.bits=null; valid: attention quantization needs bits")

    @property
    def enabled(self) -> bool:
        return self.bits is not None

    def values_name(self) -> str:
        if not self.enabled:
            return "a-none"
        parts = [f"a{self.bits}", self.granularity, None if self.group_size is None else f"g{self.group_size}",
                 {None: None, True: "dynamic", False: "static"}[self.dynamic], "sym" if self.symmetric else None,
                 "attn" if self.attention else None]
        return "-".join(p for p in parts if p)

    def resolved(self, defaults: dict) -> "ActPreset":
        """This preset with the settings it leaves open taken from `defaults` (a method's)."""
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def record_attention(self) -> dict | None:
        """The attention quantizers' settings, or None when the attention matmuls stay in full precision."""
        return {"bits": self.bits, "symmetric": self.symmetric} if self.enabled and self.attention else None


def preset_record(preset) -> dict:
    """The preset as the manifest stores it; an unnamed one (the Python API's) is named by its values."""
    return {"family": preset.family, **asdict(preset), "name": preset.name or preset.values_name()}
