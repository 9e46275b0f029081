"""Vector-quantized linear layers.

A weight (out x in) is cut into sub-vectors of d consecutive input weights of one output row and each
sub-vector is replaced by a codeword of a per-layer codebook (k x d), so a weight costs log2(k)/d bits.

`SoftVQLinear` is VQ4DiT's calibration state: every sub-vector holds n candidate codewords (its n nearest) and a
softmax over n learnable logits mixes them; confident sub-vectors are frozen to their best candidate.
`VQLinear` is the deployment state: one hard code per sub-vector, the codebook and the bias. Only the second is
saved (codes bit-packed to ceil(log2 k) bits, the codebook in fp16, the bias in fp32); its `dequantize()` is the
reference path the checkpoint and tests check against.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from vq4dit.quant.decode import gather_rows
from vq4dit.quant.kmeans import kmeans, nearest
from vq4dit.quant.packing import code_bits, pack_codes, smallest_code_dtype, unpack_codes
from vq4dit.quant.quantized_linear import QuantizedLinear, linear_bias
from vq4dit.quant.stored_checks import (check_all_finite, check_bias, check_codes_below, check_packed,
                                        check_shape)

CODEBOOK_DTYPE = torch.float16  # how codebooks are stored


def subvectors(weight: torch.Tensor, d: int) -> torch.Tensor:
    out_features, in_features = weight.shape
    if in_features % d:
        raise ValueError(f"d={d} does not divide the input width {in_features}")
    return weight.detach().float().reshape(-1, d)


class VQLinear(QuantizedLinear):
    """Hard codes (smallest integer dtype), a codebook and a full-precision bias."""

    layer_type = "vq"

    def __init__(self, codes: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None,
                 out_features: int, in_features: int):
        super().__init__(out_features, in_features, bias)
        self.register_buffer("codes", codes.to(smallest_code_dtype(len(codebook))))
        self.codebook = nn.Parameter(codebook)

    @property
    def k(self) -> int:
        return self.codebook.shape[0]

    @property
    def d(self) -> int:
        return self.codebook.shape[1]

    @property
    def code_bits_per_weight(self) -> float:
        return math.log2(self.k) / self.d

    @classmethod
    def from_linear(cls, linear: nn.Linear, k: int, d: int, iters: int = 100, seed: int = 0,
                    max_points: int | None = None) -> "VQLinear":
        """Plain k-means VQ: k-means codebook on the layer's own sub-vectors, nearest-codeword codes."""
        points = subvectors(linear.weight, d)
        codebook = kmeans(points, k, iters=iters, seed=seed, max_points=max_points)
        codes, _ = nearest(points, codebook, n=1)
        return cls(codes[:, 0], codebook, linear_bias(linear), linear.out_features, linear.in_features)

    def dequantize(self) -> torch.Tensor:
        return F.embedding(self.codes.long(), self.codebook).reshape(self.out_features, self.in_features)

    def decode_rows(self, start: int, stop: int, out: torch.Tensor) -> None:
        per_row = self.in_features // self.d
        gather_rows(self.codebook, self.codes[start * per_row:stop * per_row], out.view(-1, self.d))

    @torch.no_grad()
    def rounded(self) -> "VQLinear":
        """A copy whose codebook holds exactly what the checkpoint stores (fp16 values)."""
        bias = None if self.bias is None else self.bias.detach().clone()
        return VQLinear(self.codes.clone(), self.codebook.detach().to(CODEBOOK_DTYPE).float(), bias,
                        self.out_features, self.in_features)

    def stored(self) -> tuple[dict[str, torch.Tensor], dict]:
        bits = code_bits(self.k)
        tensors = {"codes_packed": pack_codes(self.codes.reshape(-1), bits),
                   "codebook": self.codebook.detach().to(CODEBOOK_DTYPE), **self._stored_bias()}
        return tensors, self._record(k=self.k, d=self.d, code_bits=bits, num_codes=self.codes.numel())

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], record: dict) -> "VQLinear":
        (out_features, in_features), k, d = record["shape"], record["k"], record["d"]
        if d < 1 or in_features % d or record["num_codes"] != out_features * in_features // d \
                or record["code_bits"] != code_bits(k):
            raise ValueError(f"record k={k}, d={d}, code_bits={record['code_bits']}, num_codes={record['num_codes']}"
                             f" does not describe a {out_features}x{in_features} layer")
        check_packed("codes_packed", tensors["codes_packed"], record["num_codes"], record["code_bits"])
        check_shape("codebook", tensors["codebook"], (k, d))
        check_bias(tensors, out_features)
        check_all_finite(tensors)
        codes = unpack_codes(tensors["codes_packed"], record["code_bits"], record["num_codes"])
        check_codes_below("codes_packed", codes, k)  # k = 3 packs 2 bits: code 3 would index past the codebook
        return cls(codes, tensors["codebook"].float(), tensors.get("bias"), out_features, in_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, k={self.k}, d={self.d}, {self.code_bits_per_weight:g} bits"


class SoftVQLinear(nn.Module):
    """Codebook, n candidate codewords per sub-vector and their softmax ratio logits (VQ4DiT's calibration state)."""

    def __init__(self, codebook: torch.Tensor, candidates: torch.Tensor, logits: torch.Tensor,
                 bias: torch.Tensor | None, out_features: int, in_features: int):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.codebook = nn.Parameter(codebook)
        self.register_buffer("candidates", candidates)
        self.logits = nn.Parameter(logits)
        self.register_buffer("frozen", torch.zeros(len(candidates), dtype=torch.bool))
        self.bias = nn.Parameter(bias) if bias is not None else None

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
    def from_codebook(cls, linear: nn.Linear, codebook: torch.Tensor, n: int,
                      ratio_init: str = "uniform") -> "SoftVQLinear":
        """Candidates are the n codewords nearest each sub-vector of `linear`, nearest first."""
        points = subvectors(linear.weight, codebook.shape[1])
        codebook = codebook.detach().float().clone()
        candidates, sq_dist = nearest(points, codebook, n=n)
        if ratio_init == "uniform":  # the paper: every candidate starts at 1/n
            logits = torch.zeros_like(sq_dist)
        elif ratio_init == "inverse_distance":  # the released code: ratios proportional to 1/distance
            logits = -torch.log(sq_dist.sqrt() + 1e-8)
        else:
            raise ValueError(f"ratio_init={ratio_init!r}; valid: uniform, inverse_distance")
        return cls(codebook, candidates, logits, linear_bias(linear), linear.out_features, linear.in_features)

    def ratios(self) -> torch.Tensor:
        """Softmax ratios; frozen sub-vectors are one-hot on their best candidate."""
        soft = self.logits.softmax(dim=1)
        # no `if frozen.any()` shortcut: it would read a device value back to the host every forward
        hard = F.one_hot(self.logits.argmax(dim=1), soft.shape[1]).to(soft.dtype)
        return torch.where(self.frozen[:, None], hard, soft)

    def weight(self) -> torch.Tensor:
        mixed = torch.einsum("sn,snd->sd", self.ratios(), self.codebook[self.candidates])
        return mixed.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def hard_codes(self) -> torch.Tensor:
        return self.candidates.gather(1, self.logits.argmax(dim=1, keepdim=True)).squeeze(1)

    def hard_weight(self) -> torch.Tensor:
        return F.embedding(self.hard_codes(), self.codebook).reshape(self.out_features, self.in_features)

    @torch.no_grad()
    def freeze_confident(self, threshold: float) -> None:
        self.frozen |= self.logits.softmax(dim=1).max(dim=1).values > threshold

    @torch.no_grad()
    def freeze_all(self) -> None:
        self.frozen.fill_(True)

    def regularizer(self, form: str) -> torch.Tensor:
        """Pushes every ratio to 0 or 1. paper: mean(1 - |2r - 1|); code: n * mean(r (1 - r))."""
        r = self.ratios()
        if form == "paper":
            return (1 - (2 * r - 1).abs()).mean()
        if form == "code":
            return r.shape[1] * (r * (1 - r)).mean()
        raise ValueError(f"regularizer={form!r}; valid: paper, code")

    @torch.no_grad()
    def entropy(self) -> torch.Tensor:
        r = self.ratios()
        return -(r * r.clamp_min(1e-12).log()).sum(dim=1).mean()

    @torch.no_grad()
    def to_hard(self) -> VQLinear:
        """The deployment layer: argmax codes, the codebook rounded to its storage dtype."""
        bias = None if self.bias is None else self.bias.detach().clone()
        return VQLinear(self.hard_codes(), self.codebook.detach(), bias, self.out_features, self.in_features).rounded()
