"""RTN: round-to-nearest uniform quantization, asymmetric min-max per output channel or per group along the
input (2-8 bits). No data, no fitting: the start is the result."""

from dataclasses import dataclass

from torch import nn

from vq4dit.methods.base import Method
from vq4dit.quant.presets import UniformPreset
from vq4dit.quant.uniform_linear import UniformLinear


@dataclass
class RTN(Method):
    quant: UniformPreset
    name = "rtn"
    family = "uniform"

    @property
    def seeded(self) -> bool:
        """The weights need no data; static activation scales are calibrated on the (seeded) pool."""
        return self.activation.enabled and not self.activation.dynamic

    def start(self, linears: dict[str, nn.Linear], data) -> dict[str, UniformLinear]:
        q = self.quant
        return {name: UniformLinear.from_linear(linear, q.bits, q.group_size, q.symmetric)
                for name, linear in linears.items()}
