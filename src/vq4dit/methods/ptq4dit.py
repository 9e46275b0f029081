"""PTQ4DiT (Wu et al., NeurIPS 2024): salience balancing folded into the block, static activation quantization,
block reconstruction.

Per block:
1. `transform_block`: channel-wise salience balancing (CSB) for the inputs of qkv, proj and fc1, with activation
   salience aggregated over the calibration timesteps by Spearman-guided weights (SSC), folded offline into the
   adaLN modulation (qkv, fc1) and the value projection (proj) - the re-parameterization the paper describes and
   its released code leaves as a TODO (quant/salience_balancing.py). The block's outputs do not change.
2. Static activation quantizers (per tensor by default) at the inputs of qkv, proj, fc1, fc2 and adaLN,
   calibrated on the balanced inputs of the full-precision trajectories (the pool).
3. Start: round-to-nearest weights on the preset's grid. Then block reconstruction through the Lightning block
   loop: AdaRound offsets of every weight (Adam, `lr_rounding`) and the static activation scales (`lr_act_scale`,
   the released code's effective 4e-5) trained on the block loss with the rounding regulariser, whose exponent
   anneals from beta_start to beta_end after a warm-up (BRECQ's schedule). The weights then take their rounded
   offsets; the scales are deployed as learned.
"""

from dataclasses import dataclass

import torch
from torch import nn

from vq4dit.errors import UserError
from vq4dit.methods.base import FitSettings, Method
from vq4dit.quant.act_quantizer import input_quantizer_of
from vq4dit.quant.adaround_linear import AdaRoundLinear
from vq4dit.quant.presets import UniformPreset
from vq4dit.quant.salience_balancing import (
    BALANCED,
    balancing_factors,
    check_foldable,
    fold_balancing,
    spearman_weights,
    weight_salience,
)
from vq4dit.quant.uniform_linear import UniformLinear
from vq4dit.settings import setting


@dataclass
class PTQ4DiT(Method):
    quant: UniformPreset
    balance: bool = True  # CSB + SSC folded into the block (false: ablation, reconstruction only)
    lr_rounding: float = setting(1e-3, low=0, low_open=True)     # AdaRound offsets (Adam)
    lr_act_scale: float = setting(4e-5, low=0, low_open=True)    # static activation scales (Adam; the code's rate)
    reg_weight: float = setting(0.01, low=0)  # rounding regulariser (mean over weights), block loss normalised to 1
    beta_start: float = setting(20.0, low=0, low_open=True)      # the regulariser's exponent, annealed from
    beta_end: float = setting(2.0, low=0, low_open=True)         # beta_start to beta_end after the warm-up
    warmup: float = setting(0.2, low=0, high=1, high_open=True)  # fraction of the iterations without the regulariser
    name = "ptq4dit"
    family = "uniform"
    fits = True
    input_sites = ("qkv", "proj", "fc1", "fc2", "adaln")
    act_defaults = {"granularity": "tensor", "dynamic": False}

    def __post_init__(self):
        super().__post_init__()
        if self.beta_start < self.beta_end:
            raise UserError(f"method.beta_start={self.beta_start} < method.beta_end={self.beta_end}; valid: "
                            "beta_start >= beta_end (the exponent anneals downwards)")

    def check(self, linears: dict[str, nn.Linear]) -> None:
        super().check(linears)
        reason = check_foldable(linears)
        if reason is not None:
            raise UserError(f"method=ptq4dit cannot fold its salience balancing into this model: {reason}")

    # -- 1. salience balancing, folded ----------------------------------------------------------------------
    def transform_block(self, data) -> None:
        if not self.balance:
            return
        block = data.block
        heads = {site: names[0] for site, names in BALANCED.items()}
        timesteps = data.train[1]
        per_t = {site: [] for site in BALANCED}
        for t in timesteps.unique():
            peaks = {}

            def observe(name, x):  # max |x_j| over this timestep's rows and tokens
                peak = x.detach().abs().reshape(-1, x.shape[-1]).amax(0)
                peaks[name] = peak if name not in peaks else torch.maximum(peaks[name], peak)

            data.observe_inputs(list(heads.values()), observe, rows=(timesteps == t).nonzero()[:, 0])
            for site, name in heads.items():
                per_t[site].append(peaks[name])
        factors = {}
        for site, names in BALANCED.items():
            act = torch.stack(per_t[site])  # timesteps x channels, on the block's device
            w = weight_salience([block.get_submodule(n) for n in names]).to(act.device)
            eta = spearman_weights(act, w)
            factors[site] = balancing_factors((eta[:, None] * act).sum(0), w)
        fold_balancing(block, factors)

    # -- 2./3. start, reconstruction -------------------------------------------------------------------------
    def start(self, linears: dict[str, nn.Linear], data) -> dict[str, UniformLinear]:
        q = self.quant
        return {name: UniformLinear.from_linear(linear, q.bits, q.group_size, q.symmetric)
                for name, linear in linears.items()}

    def prepare(self, linears: dict[str, nn.Linear], start: dict[str, UniformLinear],
                data) -> dict[str, AdaRoundLinear]:
        return {name: AdaRoundLinear(linear.weight, start[name]) for name, linear in linears.items()}

    def finalize(self, layer: AdaRoundLinear) -> UniformLinear:
        return layer.to_hard()

    def optimizer(self, layers: dict[str, AdaRoundLinear], fit: FitSettings) -> torch.optim.Optimizer:
        quantizers = {id(q): q for q in map(input_quantizer_of, layers.values()) if q is not None and not q.dynamic}
        groups = [{"params": [layer.alpha for layer in layers.values()], "lr": self.lr_rounding}]
        if quantizers:
            groups.append({"params": [q.learnable_scale() for q in quantizers.values()], "lr": self.lr_act_scale})
        return torch.optim.Adam(groups)

    def beta(self, step: int, fit: FitSettings) -> float | None:
        """The regulariser's exponent at `step`, None during warm-up."""
        warm = self.warmup * fit.iterations
        if step < warm:
            return None
        progress = (step - warm) / max(1.0, fit.iterations - warm)
        return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1 - progress)

    def penalty(self, layers: dict[str, AdaRoundLinear], module) -> torch.Tensor | None:
        beta = self.beta(module.global_step, module.fit_settings)
        if beta is None or self.reg_weight == 0:
            return None
        return self.reg_weight * torch.stack([layer.regularizer(beta) for layer in layers.values()]).mean()

    def curves(self, layers: dict[str, AdaRoundLinear]) -> dict[str, float]:
        return {"undecided_fraction": sum(l.undecided() for l in layers.values()) / len(layers)}  # noqa: E741

