"""AdaRound (Nagel et al., 2020): learn whether each weight rounds down or up on a fixed uniform grid.

The calibration state of block reconstruction (BRECQ / PTQ4DiT): the grid (per-(row, group) scale and integer
zero point) comes from the start layer and stays fixed; every weight holds floor(w / s) and a learnable offset
h(alpha) in [0, 1] (a stretched, clipped sigmoid), so the soft weight is s * (clamp(floor + h + z) - z). It starts
at h = frac(w / s), i.e. at the full-precision weight. A regulariser 1 - |2h - 1|^beta pushes every h to 0 or 1;
`to_hard()` rounds h and gives the deployed `UniformLinear` on the same grid.
"""

import torch
import torch.nn.functional as F
from torch import nn

from vq4dit.quant.uniform_linear import UniformLinear

GAMMA, ZETA = -0.1, 1.1  # the rectified sigmoid's stretch (AdaRound's values)


class AdaRoundLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, grid_of: UniformLinear):
        super().__init__()
        self.out_features, self.in_features = grid_of.out_features, grid_of.in_features
        self.bits, self.group_size, self.symmetric = grid_of.bits, grid_of.group_size, grid_of.symmetric
        grid = grid_of.grid()
        self.register_buffer("scale", grid.scale.detach().clone())
        self.register_buffer("zero", grid.zero.detach().clone())
        self.register_buffer("compact_scale", grid_of.scale.detach().clone())
        self.register_buffer("compact_zero", grid_of.zero.detach().clone())
        ratio = weight.detach().float().to(self.scale.device) / self.scale
        self.register_buffer("floor", ratio.floor())
        rest = (ratio - self.floor).clamp(1e-4, 1 - 1e-4)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(alpha) = rest
        self.register_buffer("bias", None if grid_of.bias is None else grid_of.bias.detach().clone())

    @property
    def high(self) -> int:
        return (1 << self.bits) - 1 if not self.symmetric else 2 * ((1 << (self.bits - 1)) - 1)

    def offsets(self) -> torch.Tensor:
        return (torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def weight(self) -> torch.Tensor:
        q = torch.clamp(self.floor + self.offsets() + self.zero, 0, self.high)
        return (q - self.zero) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.offsets() - 1).abs().pow(beta)).mean()

    @torch.no_grad()
    def undecided(self) -> float:
        """Fraction of weights whose offset is not yet 0 or 1."""
        h = self.offsets()
        return ((h > 0) & (h < 1)).float().mean().item()

    @torch.no_grad()
    def to_hard(self) -> UniformLinear:
        codes = torch.clamp(self.floor + (self.offsets() >= 0.5).float() + self.zero, 0, self.high)
        bias = None if self.bias is None else self.bias.clone()
        return UniformLinear(codes, self.compact_scale.clone(), self.compact_zero.clone(), self.bits, self.group_size,
                             self.symmetric, bias)
