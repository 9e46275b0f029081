"""GPTQ (Frantar et al., 2023): uniform quantization column by column, each column's rounding error fed back
into the columns not yet quantized through the inverse Hessian of the layer's inputs, H = 2/N sum x x^T.

The Hessians come from the zero-data pool: forward hooks on the full-precision block collect every linear's
inputs over the training rows (block by block, fp inputs, as for VQ4DiT). Lazy batches of `block_size` columns
apply the error feedback inside the batch at once and to the rest of the matrix once per batch; `damp` adds
that fraction of the mean diagonal to H; `act_order` quantizes columns by decreasing H_ii (on by default, as
the reference recommends; measured on salient-channel layers in docs/methods.md).

Groups, in the reference implementation's two modes (IST-DASLab/gptq, `fasterquant`):
- dynamic (its default): a group's scale and zero are fitted when the loop reaches the group's first column, on
  the group's columns as they stood at the start of the current lazy batch (fitting on the columns with the
  in-batch feedback applied was measured 31 % worse at 2 bits on the reference test problem). With act-order the
  loop runs in permuted order, so a group is the columns at permuted positions [g G, (g+1) G), scattered over the
  input; the deployed layer then carries each input column's group (`group_index`, AutoGPTQ's g_idx).
- static (`static_groups`): every group fitted up front on the original weight's consecutive columns; act-order
  then only changes the order of rounding and feedback, and groups stay runs of consecutive columns.
Per-channel grids are fitted on the original weight in both modes.
"""

from dataclasses import dataclass

import torch
from torch import nn

from vq4dit.methods.base import Method
from vq4dit.quant.presets import UniformPreset
from vq4dit.quant.quantized_linear import linear_bias
from vq4dit.quant.uniform_linear import SCALE_DTYPE, UniformGrid, UniformLinear, decode, encode, fit_grid, group_width
from vq4dit.settings import setting


@dataclass
class GPTQ(Method):
    quant: UniformPreset
    damp: float = setting(0.01, low=0, high=1, high_open=True)  # fraction of mean(diag H) added to the diagonal
    block_size: int = setting(128, low=1)  # columns per lazy batch
    act_order: bool = True  # quantize columns by decreasing H_ii
    static_groups: bool = False  # fit every group up front on consecutive columns (else when the loop reaches it)
    name = "gptq"
    family = "uniform"

    def group_size(self, name: str, block: int) -> int | None:
        """Input columns per weight group of linear `name` of block `block` (None: per output channel)."""
        return self.quant.group_size

    def start(self, linears: dict[str, nn.Linear], data) -> dict[str, UniformLinear]:
        q = self.quant
        return {name: UniformLinear.from_linear(linear, q.bits, self.group_size(name, data.index), q.symmetric)
                for name, linear in linears.items()}

    def prepare(self, linears: dict[str, nn.Linear], start, data) -> dict[str, UniformLinear]:
        hessians = {name: Hessian(linear.in_features, data.device) for name, linear in linears.items()}
        data.observe_inputs(list(linears), lambda name, x: hessians[name].add(x))
        return {name: self.quantize(linear, hessians[name].value(), self.group_size(name, data.index))
                for name, linear in linears.items()}

    def quantize(self, linear: nn.Linear, hessian: torch.Tensor,
                 group_size: int | None | str = "preset") -> UniformLinear:
        q = self.quant
        group = q.group_size if group_size == "preset" else group_size
        codes, grid, group_index = gptq(linear.weight, hessian, q.bits, group, q.symmetric, self.damp,
                                        self.block_size, self.act_order, self.static_groups)
        return UniformLinear(codes, grid.scale, grid.zero, q.bits, group, q.symmetric, linear_bias(linear),
                             group_index)


class Hessian:
    """H = 2/N sum over input rows x of x x^T, accumulated on `device` in float32."""

    def __init__(self, width: int, device: torch.device):
        self.sum = torch.zeros(width, width, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(x.T, x)
        self.rows += len(x)

    def value(self) -> torch.Tensor:
        return self.sum * (2 / max(self.rows, 1))


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
         damp: float = 0.01, block_size: int = 128, act_order: bool = False, static_groups: bool = False,
         scale_dtype: torch.dtype = SCALE_DTYPE) -> tuple[torch.Tensor, UniformGrid, torch.Tensor | None]:
    """(integer codes (out, in) as float, grid with (out, groups) scales and zeros, the group of every input column
    or None where group g is columns [g G, (g+1) G)) of `weight`."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    rows, columns = w.shape
    width = group_width(columns, group_size)
    dead = h.diagonal() == 0  # inputs that are always 0: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    scale = torch.zeros(rows, columns // width, device=w.device)
    zero = torch.zeros_like(scale)
    static = group_size is None or static_groups
    if static:
        for g in range(columns // width):
            grid = fit_grid(w[:, g * width:(g + 1) * width], bits, symmetric, scale_dtype)
            scale[:, g:g + 1], zero[:, g:g + 1] = grid.scale, grid.zero
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(columns, device=w.device)
    w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(damp * h.diagonal().mean())
    # the upper Cholesky factor of H^-1: row i holds the feedback from column i onto the columns after it
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    for b0 in range(0, columns, block_size):
        b1 = min(b0 + block_size, columns)
        wb, errors = w[:, b0:b1].clone(), torch.zeros(rows, b1 - b0, device=w.device)
        for i in range(b1 - b0):
            column = b0 + i
            # static: the original column's group; dynamic: the group of loop positions, fitted at its first
            g = int(order[column]) // width if static else column // width
            if not static and column % width == 0:
                grid = fit_grid(w[:, column:column + width], bits, symmetric, scale_dtype)
                scale[:, g:g + 1], zero[:, g:g + 1] = grid.scale, grid.zero
            grid = UniformGrid(scale[:, g:g + 1], zero[:, g:g + 1], bits, symmetric)
            q = encode(wb[:, i:i + 1], grid)
            codes[:, column] = q[:, 0]
            err = (wb[:, i] - decode(q, grid)[:, 0]) / u[column, column]
            wb[:, i:] -= err[:, None] * u[column, b0 + i:b1][None, :]
            errors[:, i] = err
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    position = torch.argsort(order)  # where each input column stood in the loop
    scattered = act_order and not static and width < columns
    return codes[:, position], UniformGrid(scale, zero, bits, symmetric), position // width if scattered else None
