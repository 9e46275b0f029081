"""Vector-quantized linear layers.

A weight (out x in) is cut into sub-vectors of d consecutive input weights of one output row and each
sub-vector is replaced by a codeword of a per-layer codebook (k x d), so a weight costs log2(k)/d bits.

`SoftVQLinear` is VQ4DiT's calibration state: every sub-vector holds n candidate codewords (its n nearest) and a
softmax over n learnable logits mixes them; confident sub-vectors are frozen to their best candidate.
`VQLinear` is the deployment state: one hard code per sub-vector, the codebook and the bias. Only the second is
saved (codes bit-packed to ceil(log2 k) bits, the codebook in fp16, the bias in fp32), and it holds its codes packed
in memory too (a forward unpacks the tile it decodes); its `dequantize()` is the reference path the checkpoint and
tests check against.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from vq4dit.quant.decode import gather_rows, unpack_tile
from vq4dit.quant.kmeans import kmeans, nearest
from vq4dit.quant.packing import code_bits, pack_codes, unpack_codes
from vq4dit.quant.quantized_linear import QuantizedLinear, linear_bias
from vq4dit.quant.soft_mix import candidate_ratios, gather_codes, ratio_penalty, soft_mix
from vq4dit.tensor_checks import (
    check_all_finite,
    check_bias,
    check_codes_below,
    check_floating,
    check_only,
    check_packed,
    check_shape,
    record_int,
)

CODEBOOK_DTYPE = torch.float16  # how codebooks are stored
SATURATED = 1e4                 # a frozen sub-vector's logits: 0 on its codeword, -SATURATED on the others


def subvectors(weight: torch.Tensor, d: int) -> torch.Tensor:
    out_features, in_features = weight.shape
    if in_features % d:
        raise ValueError(f"d={d} does not divide the input width {in_features}")
    return weight.detach().float().reshape(-1, d)


def point_weights(input_weights: torch.Tensor | None, linear: nn.Linear, d: int) -> torch.Tensor | None:
    """Per-channel weights (in_features,) as k-means point weights: the (out x in / d, d) layout of `subvectors`."""
    if input_weights is None:
        return None
    return input_weights.float().to(linear.weight.device).expand(linear.out_features, -1).reshape(-1, d)


class VQLinear(QuantizedLinear):
    """Hard codes, bit-packed as the checkpoint stores them (`codes_packed`, ceil(log2 k) bits a code), a codebook
    and a full-precision bias."""

    layer_type = "vq"

    def __init__(self, codes: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None,
                 out_features: int, in_features: int):
        super().__init__(out_features, in_features, bias)
        self.register_buffer("codes_packed", pack_codes(codes.reshape(-1), code_bits(len(codebook))))
        self.codebook = nn.Parameter(codebook)
        self.register_buffer("held_codes", None, persistent=False)  # hold_fixed: the codes unpacked, int32

    @property
    def k(self) -> int:
        return self.codebook.shape[0]

    @property
    def d(self) -> int:
        return self.codebook.shape[1]

    @property
    def code_bits_per_weight(self) -> float:
        return math.log2(self.k) / self.d

    @property
    def codes(self) -> torch.Tensor:
        """Every sub-vector's code, unpacked (smallest integer dtype): for the reference path and tests."""
        return unpack_codes(self.codes_packed, code_bits(self.k), self.out_features * self.in_features // self.d)

    @classmethod
    def from_linear(cls, linear: nn.Linear, k: int, d: int, iters: int = 100, seed: int = 0,
                    max_points: int | None = None, input_weights: torch.Tensor | None = None) -> "VQLinear":
        """Plain k-means VQ: k-means codebook on the layer's own sub-vectors, nearest-codeword codes; with
        `input_weights` (in_features,) each coordinate's squared error is weighted by its input channel's."""
        points, weights = subvectors(linear.weight, d), point_weights(input_weights, linear, d)
        codebook = kmeans(points, k, iters=iters, seed=seed, max_points=max_points, weights=weights)
        codes, _ = nearest(points, codebook, n=1, weights=weights)
        return cls(codes[:, 0], codebook, linear_bias(linear), linear.out_features, linear.in_features)

    def hold_fixed(self, hold: bool) -> None:
        """A fit trains the codebook, never the codes: they are held unpacked (int32) while it runs."""
        self.held_codes = self.codes.to(torch.int32) if hold else None

    def dequantize(self) -> torch.Tensor:
        codes = self.held_codes if self.held_codes is not None else self.codes.long()
        if torch.is_grad_enabled() and self.codebook.requires_grad:  # a fit trains the codebook: the fast backward
            flat = gather_codes(self.codebook, codes)
        else:
            flat = F.embedding(codes, self.codebook)
        return flat.reshape(self.out_features, self.in_features)

    def decode_rows(self, start: int, stop: int, out: torch.Tensor) -> None:
        per_row = self.in_features // self.d
        index = unpack_tile(self.codes_packed, code_bits(self.k), start * per_row, (stop - start) * per_row)
        gather_rows(self.codebook, index, out.view(-1, self.d))

    @torch.no_grad()
    def rounded(self) -> "VQLinear":
        """A copy whose codebook holds exactly what the checkpoint stores (fp16 values)."""
        bias = None if self.bias is None else self.bias.detach().clone()
        return VQLinear(self.codes, self.codebook.detach().to(CODEBOOK_DTYPE).float(), bias,
                        self.out_features, self.in_features)

    def stored(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"codes_packed": self.codes_packed, "codebook": self.codebook.detach().to(CODEBOOK_DTYPE),
                   **self._stored_bias()}
        return tensors, self._record(k=self.k, d=self.d, code_bits=code_bits(self.k),
                                     num_codes=self.out_features * self.in_features // self.d)

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], record: dict) -> "VQLinear":
        (out_features, in_features), k, d = record["shape"], record_int(record, "k", 1), record_int(record, "d", 1)
        if in_features % d or record["num_codes"] != out_features * in_features // d \
                or record["code_bits"] != code_bits(k):
            raise ValueError(f"record k={k}, d={d}, code_bits={record['code_bits']}, num_codes={record['num_codes']}"
                             f" does not describe a {out_features}x{in_features} layer")
        check_packed("codes_packed", tensors["codes_packed"], record["num_codes"], record["code_bits"])
        check_shape("codebook", tensors["codebook"], (k, d))
        check_floating("codebook", tensors["codebook"])
        check_only(tensors, {"codes_packed", "codebook", "bias"})
        check_bias(tensors, out_features)
        check_all_finite(tensors)
        codes = unpack_codes(tensors["codes_packed"], record["code_bits"], record["num_codes"])
        check_codes_below("codes_packed", codes, k)  # k = 3 packs 2 bits: code 3 would index past the codebook
        return cls(codes, tensors["codebook"].float(), tensors.get("bias"), out_features, in_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, k={self.k}, d={self.d}, {self.code_bits_per_weight:g} bits"


class SoftVQLinear(nn.Module):
    """Codebook, n candidate codewords per sub-vector and their softmax ratio logits (VQ4DiT's calibration state).

    Candidates and logits are (n, S), candidate-major: a softmax over n = 2..3 values is 8x faster on a CPU along
    the leading dimension than along a trailing one of that size, and each candidate's codes are contiguous."""

    def __init__(self, codebook: torch.Tensor, candidates: torch.Tensor, logits: torch.Tensor,
                 bias: torch.Tensor | None, out_features: int, in_features: int):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.codebook = nn.Parameter(codebook)
        # int32: the gradient's bincount over them reads a third faster than over int64 (k is at most 2^31 anyway)
        self.register_buffer("candidates", candidates.to(torch.int32))
        self.logits = nn.Parameter(logits)
        self.register_buffer("frozen", torch.zeros(candidates.shape[1], dtype=torch.bool))
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.hardened = False  # set by freeze_all: codes fixed, `codes` holds them

    @classmethod
    def from_linear(cls, linear: nn.Linear, k: int, d: int, n: int, ratio_init: str = "uniform",
                    iters: int = 100, seed: int = 0, max_points: int | None = None) -> "SoftVQLinear":
        points = subvectors(linear.weight, d)
        if k > len(points):
            raise ValueError(f"k={k} is larger than the {len(points)} sub-vectors of a "
                             f"{linear.out_features}x{linear.in_features} layer at d={d}")
        codebook = kmeans(points, k, iters=iters, seed=seed, max_points=max_points)
        return cls.from_codebook(linear, codebook, n, ratio_init)

    @classmethod
    def from_codebook(cls, linear: nn.Linear, codebook: torch.Tensor, n: int, ratio_init: str = "uniform",
                      input_weights: torch.Tensor | None = None) -> "SoftVQLinear":
        """Candidates are the n codewords nearest each sub-vector of `linear`, nearest first (candidates[0]), by
        the distance weighted by `input_weights` (in_features,) if given."""
        d = codebook.shape[1]
        points = subvectors(linear.weight, d)
        codebook = codebook.detach().float().clone()
        candidates, sq_dist = nearest(points, codebook, n=n, weights=point_weights(input_weights, linear, d))
        if ratio_init == "uniform":  # the paper: every candidate starts at 1/n
            logits = torch.zeros_like(sq_dist)
        elif ratio_init == "inverse_distance":  # the released code: ratios proportional to 1/distance
            logits = -torch.log(sq_dist.sqrt() + 1e-8)
        else:
            raise ValueError(f"ratio_init={ratio_init!r}; valid: uniform, inverse_distance")
        return cls(codebook, candidates.T.contiguous(), logits.T.contiguous(), linear_bias(linear),
                   linear.out_features, linear.in_features)

    def ratios(self) -> torch.Tensor:
        """Softmax ratios (n, S); a frozen sub-vector's logits are saturated, so its ratios are exactly one-hot."""
        return candidate_ratios(self.logits)

    def weight(self) -> torch.Tensor:
        if self.hardened:  # every code is fixed: only the codebook trains
            mixed = gather_codes(self.codebook, self.codes)
        else:
            mixed, ratios = soft_mix(self.logits, self.codebook, self.candidates)
            if torch.is_grad_enabled():  # the step's regulariser reuses them (and its gradient joins this node's)
                self._step_ratios = (self.logits._version, ratios)
        return mixed.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def hard_codes(self) -> torch.Tensor:
        return self.candidates.gather(0, self._best()[None])[0]

    def _best(self) -> torch.Tensor:
        """Each sub-vector's top candidate (the first on ties): max's indices, because a CPU argmax along a short
        leading dimension is 13x slower."""
        return self.logits.detach().max(dim=0).indices

    def hard_weight(self) -> torch.Tensor:
        return F.embedding(self.hard_codes(), self.codebook).reshape(self.out_features, self.in_features)

    @torch.no_grad()
    def freeze_confident(self, threshold: float) -> None:
        self._freeze(self.ratios().amax(dim=0) > threshold)

    @torch.no_grad()
    def freeze_all(self) -> None:
        self._freeze(torch.ones_like(self.frozen))
        # a host flag, set here once: the forward then gathers fixed codes without reading device values per step
        self.hardened = True
        self.register_buffer("codes", self.hard_codes(), persistent=False)
        self._step_ratios = (None, None)  # a graph's output: nothing to keep (and deepcopy refuses it)

    def _freeze(self, rows: torch.Tensor) -> None:
        """Saturate the logits of `rows` on their argmax: their softmax is then exactly one-hot (exp(-1e4) is 0 in
        every float dtype), so they mix one codeword and their logits get exactly zero gradient, with no branch."""
        best = F.one_hot(self._best(), len(self.logits)).T.to(self.logits.dtype)
        self.logits.copy_(torch.where(rows, (best - 1) * SATURATED, self.logits))
        self.frozen |= rows

    def regularizer(self, form: str) -> torch.Tensor:
        """Pushes every ratio to 0 or 1. paper: mean(1 - |2r - 1|); code: n * mean(r (1 - r))."""
        if self.hardened:  # nothing left to push; and the logits stay out of the graph (no optimizer work)
            return self.codebook.new_zeros(())
        version, ratios = getattr(self, "_step_ratios", (None, None))
        if version != self.logits._version or not torch.is_grad_enabled():  # not this step's forward's ratios
            ratios = self.ratios()
        self._step_ratios = (None, None)  # used once: its graph is freed by the backward
        return ratio_penalty(ratios, form)

    @torch.no_grad()
    def entropy(self) -> torch.Tensor:
        r = self.ratios()
        return -(r * r.clamp_min(1e-12).log()).sum(dim=0).mean()

    @torch.no_grad()
    def to_hard(self) -> VQLinear:
        """The deployment layer: argmax codes, the codebook rounded to its storage dtype."""
        bias = None if self.bias is None else self.bias.detach().clone()
        return VQLinear(self.hard_codes(), self.codebook.detach(), bias, self.out_features, self.in_features).rounded()
