"""VQ4DiT: every sub-vector keeps its n nearest codewords of the layer's k-means codebook and learns a softmax
mixture over them with the block loss; a regulariser drives the ratios to 0/1, confident sub-vectors freeze to
their best candidate, and the rest are hardened to their argmax before the end.

Hardening so that soft and hard agree: the regulariser's weight ramps up (`reg_schedule: linear`) so ratios
explore first and commit later; a sub-vector whose top ratio passes `freeze_threshold` freezes as it gets there;
at `harden_at` (a fraction of the iterations) every remaining sub-vector takes its argmax, and the remaining
iterations fine-tune codebooks and biases on those hard codes, so the block that ships is the block that was
trained. Where the paper and its released code differ, each choice is a switch (README, "Switches").
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vq4dit.errors import UserError
from vq4dit.methods.base import FitSettings
from vq4dit.methods.kmeans_vq import KMeansVQ
from vq4dit.quant.vq_linear import SoftVQLinear, VQLinear
from vq4dit.settings import setting


@dataclass
class VQ4DiT(KMeansVQ):
    candidates: int = setting(2, low=1)  # n (at most k); the released code uses 2, the paper's ablation finds 3 best
    # inverse_distance (released code; measured better) | uniform (paper)
    ratio_init: Literal["uniform", "inverse_distance"] = "inverse_distance"
    # joint (paper) | after_freeze (released code: a layer's codebook moves once its codes froze)
    codebook_training: Literal["joint", "after_freeze"] = "joint"
    regularizer: Literal["paper", "code"] = "paper"  # paper: mean(1 - |2r - 1|) | code: n * mean(r (1 - r))
    reg_weight: float = setting(0.1, low=0)
    reg_schedule: Literal["constant", "linear"] = "linear"  # linear: a ramp from 0 to reg_weight at harden_at
    # a sub-vector whose top ratio passes this is frozen to that codeword
    freeze_threshold: float = setting(0.99, low=0, high=1, low_open=True)
    freeze_every: int = setting(10, low=1)
    # fraction of the iterations after which every sub-vector takes its argmax; the rest fine-tune codebooks and
    # biases on the hard codes (1.0: harden after the last step)
    harden_at: float = setting(0.8, low=0, high=1, low_open=True)
    lr_ratios: float = setting(5e-2, low=0, low_open=True)  # ratio logits (codebooks and biases use fit.lr)
    # data-aware codebooks (measured better); none: the paper's k-means
    kmeans_weighting: Literal["none", "input_moment"] = "input_moment"
    name = "vq4dit"
    fits = True
    student_inputs = "quantized"  # measured end to end: docs/vq4dit.md, "VQ4DiT beyond the paper"
    model_fit_iterations = 500    # the model-level fit after the blocks: measured end to end, same section

    def __post_init__(self):
        super().__post_init__()
        if self.candidates > self.quant.k:
            raise UserError(f"method.candidates={self.candidates}; valid: 1..k ({self.quant.k})")

    def prepare(self, linears: dict[str, nn.Linear], start: dict[str, VQLinear], data) -> dict[str, SoftVQLinear]:
        moments = self.input_weights(linears, data)
        return {name: SoftVQLinear.from_codebook(linears[name], start[name].codebook, self.candidates, self.ratio_init,
                                                 moments.get(name))
                for name in linears}

    def finalize(self, layer: SoftVQLinear) -> VQLinear:
        return layer.to_hard()

    # -- fitting hooks ---------------------------------------------------------------------------------------
    def optimizer(self, layers: dict[str, SoftVQLinear], fit: FitSettings) -> torch.optim.Optimizer:
        logits = [layer.logits for layer in layers.values()]
        rest = [p for layer in layers.values() for name, p in layer.named_parameters() if name != "logits"]
        return torch.optim.RMSprop([{"params": rest, "lr": fit.lr}, {"params": logits, "lr": self.lr_ratios}],
                                   alpha=fit.rmsprop_alpha)

    def harden_step(self, fit: FitSettings) -> int:
        return int(round(self.harden_at * fit.iterations))

    def penalty(self, layers: dict[str, SoftVQLinear], module) -> torch.Tensor:
        weight = self.reg_weight
        if self.reg_schedule == "linear":  # ramp up: explore first, commit later
            weight *= min(1.0, module.global_step / max(1, self.harden_step(module.fit_settings)))
        return weight * torch.stack([layer.regularizer(self.regularizer) for layer in layers.values()]).mean()

    def before_optimizer_step(self, layers: dict[str, SoftVQLinear]) -> None:
        if self.codebook_training == "after_freeze":  # the released code: a codebook moves once its codes froze
            for layer in layers.values():
                if layer.codebook.grad is not None:  # multiplied, not tested: no device-to-host read per step
                    layer.codebook.grad.mul_(layer.frozen.all().to(layer.codebook.grad.dtype))

    def after_step(self, layers: dict[str, SoftVQLinear], module) -> None:
        step = module.global_step  # optimizer steps taken so far
        if step % self.freeze_every == 0:
            for layer in layers.values():
                layer.freeze_confident(self.freeze_threshold)
        if step == self.harden_step(module.fit_settings):
            self._harden(layers, module)

    def after_fit(self, layers: dict[str, SoftVQLinear], module) -> None:
        if "soft_mse" not in module.stats:  # harden_at = 1: harden after the last step
            self._harden(layers, module)

    def _harden(self, layers: dict[str, SoftVQLinear], module) -> None:
        module.stats["soft_mse"] = module.heldout_mse()
        for layer in layers.values():
            layer.freeze_all()
        module.stats["hard_mse_at_harden"] = module.heldout_mse()

    def curves(self, layers: dict[str, SoftVQLinear]) -> dict[str, float]:
        soft = list(layers.values())
        with torch.no_grad():
            reg = torch.stack([layer.regularizer(self.regularizer) for layer in soft]).mean().item()
        frozen = sum(int(layer.frozen.sum()) for layer in soft) / sum(len(layer.frozen) for layer in soft)
        return {"regularizer": reg, "frozen_fraction": frozen,
                "ratio_entropy": torch.stack([layer.entropy() for layer in soft]).mean().item()}
