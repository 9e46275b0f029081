"""Per-layer group sizes as Q-DiT searches them: the genome, the search space scaled to the model, the budget.

Genome: one group size per (block, site) for the sites qkv, proj, fc1, fc2 (block-major); a site's group size
is the group width of its linears' weights (along the input) and of their input activations. adaLN's weights
use the base group size and its input is not quantized (as in Q-DiT).

Space: Q-DiT searches {32, 64, 128, 192, 288} on DiT-XL/2, whose hidden width is 1152 (36, 18, 9, 6 and 4 groups
per 1152-wide row). On a model of hidden width H every size g becomes the divisor of H nearest to g * H / 1152
(nearest in log2; ties to the smaller), duplicates dropped: H = 1152 gives the paper's space, H = 256 (the
digits DiT) gives {8, 16, 32, 64} with base 128 -> 32, H = 64 (the tiny test model) {2, 4, 8, 16} with base 8. A
divisor of H divides every block input width (H, and 4H for fc2).

Budget: a candidate may not cost more than the base group size everywhere, where cost is either
- `mean_group_size` (the released code's constraint): the mean of the genes must be at least the base, or
- `bitops` (the paper's constraint, with this project's count): per token, sum over the searched linears of
  out * in * (w_bits * a_bits + 256 / g): every output sums in / g integer partial dot products of g
  w_bits x a_bits MACs, each rescaled by its weight and activation scales (one fp16 x fp16 multiply, counted as
  16 * 16 = 256 bit operations).
"""

import math
from dataclasses import dataclass

from vq4dit.errors import UserError
from vq4dit.quant.block_layers import INPUT_SITES

SITES = ("qkv", "proj", "fc1", "fc2")
BUDGETS = ("bitops", "mean_group_size")
RESCALE_BITOPS = 16 * 16


def scale_group_size(size: int, hidden: int, reference_width: int) -> int:
    """The divisor of `hidden` nearest (log2) to size * hidden / reference_width."""
    target = math.log2(size * hidden / reference_width)
    divisors = [d for d in range(1, hidden + 1) if hidden % d == 0]
    return min(divisors, key=lambda d: (abs(math.log2(d) - target), d))


@dataclass(frozen=True)
class GroupSizeSpace:
    choices: tuple[int, ...]   # scaled, sorted, distinct
    base: int                  # scaled base group size
    budget: str
    site_shapes: tuple[tuple[int, int, int], ...]  # per site: (linears, out, in) of one linear
    bits: int
    act_bits: int | None
    blocks: int

    @classmethod
    def of(cls, linears: dict, blocks: int, space: list[int], base: int, reference_width: int, budget: str,
           bits: int, act_bits: int | None) -> "GroupSizeSpace":
        if budget not in BUDGETS:
            raise UserError(f"method.budget={budget}; valid: {', '.join(BUDGETS)}")
        if not space or any(int(g) < 1 for g in space) or base < 1 or reference_width < 1:
            raise UserError(f"method.space={list(space)}, method.base_group_size={base}, method.reference_width="
                            f"{reference_width}; valid: positive group sizes and width")
        hidden = linears["norm1.linear"].in_features
        choices = tuple(sorted({scale_group_size(int(g), hidden, reference_width) for g in space}))
        shapes = tuple((len(INPUT_SITES[s]), linears[INPUT_SITES[s][0]].out_features,
                        linears[INPUT_SITES[s][0]].in_features) for s in SITES)
        return cls(choices, scale_group_size(base, hidden, reference_width), budget, shapes, bits, act_bits, blocks)

    @property
    def genes(self) -> int:
        return self.blocks * len(SITES)

    def cost(self, genome: tuple[int, ...]) -> float:
        if self.budget == "mean_group_size":
            return -sum(genome) / len(genome)  # larger groups are cheaper
        a_bits = self.act_bits or 16
        total = 0.0
        for j, g in enumerate(genome):
            count, out_f, in_f = self.site_shapes[j % len(SITES)]
            total += count * out_f * in_f * (self.bits * a_bits + RESCALE_BITOPS / g)
        return total

    @property
    def limit(self) -> float:
        return self.cost((self.base,) * self.genes)

    def legal(self, genome: tuple[int, ...]) -> bool:
        return self.cost(genome) <= self.limit + 1e-9 * abs(self.limit)

    def per_block(self, genome: tuple[int, ...]) -> list[dict[str, int]]:
        return [dict(zip(SITES, genome[i * len(SITES):(i + 1) * len(SITES)])) for i in range(self.blocks)]

    def flat(self, per_block: list[dict[str, int]]) -> tuple[int, ...]:
        return tuple(block[site] for block in per_block for site in SITES)
