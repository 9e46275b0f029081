"""PTQ4DiT's channel-wise salience balancing (CSB), Spearman-guided salience calibration (SSC) and the offline
re-parameterization that folds the balancing into the block, so the deployed block runs with no extra op.

For a linear y = x W^T, input channel j has activation salience s_X[j] = max |x_j| and weight salience
s_W[j] = max_i |W[i, j]|. With b = sqrt(s_X / s_W), the block computes (x / b) (W diag(b))^T = x W^T: both sides
of channel j end at sqrt(s_X[j] s_W[j]), so neither carries an extreme channel alone.

SSC: activation salience moves over the timesteps. Per timestep t, s_X^(t) is taken over that timestep's rows,
rho_t = Spearman(s_X^(t), s_W), and s_X = sum_t eta_t s_X^(t) with eta = softmax(-rho): timesteps whose
activation and weight extremes fall on different channels (where balancing helps most) weigh most. (The
released code weights per sample instead of per timestep; the paper's per-timestep form is used here.)

Folding (the paper's promise; its released code divides x by b online instead):
- qkv and fc1 read `LN(h) * (1 + scale) + shift`, with shift and scale rows of the adaLN linear. Dividing that
  input by b is exact if shift rows are divided by b and scale rows become (1 + scale) / b - 1, i.e. weight rows
  divided by b and bias (1 + bias) / b - 1; the consuming linears' input columns are multiplied by b.
- proj reads the attention output, whose channel j is sum_t P[t] v_t[j] for its head: dividing v's output row j
  (weight and bias) by b[j] divides that channel by b[j]; proj's input column j is multiplied by b[j].
"""

import numpy as np
import torch
from torch import nn

# diffusers' AdaLayerNormZero: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
SHIFT_MSA, SCALE_MSA, SHIFT_MLP, SCALE_MLP = 0, 1, 3, 4
BALANCED = {"qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "proj": ("attn1.to_out.0",),
            "fc1": ("ff.net.0.proj",)}


def weight_salience(linears: list[nn.Linear]) -> torch.Tensor:
    """Max |W[:, j]| per input channel over the output rows of every linear reading that input."""
    return torch.cat([lin.weight.detach().float() for lin in linears]).abs().amax(0)


def spearman_weights(act_salience: torch.Tensor, w_salience: torch.Tensor) -> torch.Tensor:
    """eta = softmax(-rho) over the rows of `act_salience` (timesteps x channels), rho = Spearman's rank
    correlation of each row with `w_salience`; a row with no rank information (constant) gets rho = 0."""
    w = w_salience.cpu().double().numpy()
    rho = []
    for row in act_salience.cpu().double().numpy():
        r = _spearmanr(row, w).statistic if np.ptp(row) > 0 and np.ptp(w) > 0 else 0.0
        rho.append(0.0 if np.isnan(r) else float(r))
    return torch.softmax(-torch.tensor(rho, dtype=torch.float64), 0).to(act_salience.device, torch.float32)


def balancing_factors(act_salience: torch.Tensor, w_salience: torch.Tensor) -> torch.Tensor:
    """b = sqrt(s_X / s_W) per channel; 1 where either salience is 0 (nothing to balance)."""
    ok = (act_salience > 0) & (w_salience > 0)
    return torch.where(ok, (act_salience / w_salience.clamp(min=1e-12)).sqrt(), torch.ones_like(act_salience))


@torch.no_grad()
def fold_balancing(block: nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """Re-parameterize a diffusers DiT block in place: `factors[site]` (qkv, proj, fc1; any subset) divides the
    site's input and multiplies its linears' input columns, folded into adaLN (qkv, fc1) and v (proj)."""
    ada = block.norm1.linear
    hidden = ada.in_features
    for site, b in factors.items():
        b = b.to(ada.weight.device, ada.weight.dtype)
        for name in BALANCED[site]:
            block.get_submodule(name).weight.mul_(b)  # input columns
        if site == "proj":
            v = block.attn1.to_v
            v.weight.div_(b[:, None])
            if v.bias is not None:
                v.bias.div_(b)
            continue
        shift, scale = (SHIFT_MSA, SCALE_MSA) if site == "qkv" else (SHIFT_MLP, SCALE_MLP)
        rows = lambda k: slice(k * hidden, (k + 1) * hidden)  # noqa: E731
        ada.weight[rows(shift)] /= b[:, None]
        ada.weight[rows(scale)] /= b[:, None]
        if ada.bias is not None:
            ada.bias[rows(shift)] /= b
            ada.bias[rows(scale)] = (1 + ada.bias[rows(scale)]) / b - 1
        else:  # no bias to absorb the constant: (1 + W c) / b - 1 needs one
            raise ValueError("folding into an adaLN linear without bias is not supported")


def check_foldable(linears: dict[str, nn.Module]) -> str | None:
    """Why a block with these linears cannot take the fold (a one-line reason), or None."""
    ada = linears.get("norm1.linear")
    if ada is None or ada.out_features != 6 * ada.in_features or getattr(ada, "bias", None) is None:
        return "its blocks have no adaLN-Zero modulation (norm1.linear: hidden -> 6 x hidden, with bias)"
    missing = [name for names in BALANCED.values() for name in names if name not in linears]
    if missing:
        return f"its blocks have no {missing[0]}"
    return None


def _spearmanr(a, b):
    from scipy.stats import spearmanr  # imported on use: scipy.stats takes a second to import

    return spearmanr(a, b)
