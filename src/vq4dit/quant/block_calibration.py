"""One DiT block's calibration as a LightningModule: the frozen full-precision block is the teacher, the
vector-quantized copy the student, and the loss is block-output MSE plus a regulariser driving ratios to 0/1.
The MSE is divided by the block's plain k-means MSE (the paper's lambda_d, set per block), so a loss of 1 means
"no better than k-means" in every block and one `reg_weight` fits blocks whose outputs differ in scale.

Hardening schedule: sub-vectors whose top ratio passes `freeze_threshold` are frozen to it as they get there;
at `harden_at` (a fraction of the iterations) every remaining sub-vector takes its argmax, and the remaining
iterations fine-tune codebooks and biases on those hard codes, so the block that ships is the block that was
trained. Classic VQ's students hold `VQLinear`s only: then just codebooks and biases train.
"""

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from vq4dit.quant.vq_linear import SoftVQLinear, VQLinear


class BlockCalibration(L.LightningModule):
    def __init__(self, teacher: nn.Module, student: nn.Module, method: dict, block_index: int,
                 eval_batch: tuple[torch.Tensor, ...], mse_scale: float = 1.0):
        super().__init__()
        self.teacher, self.student = teacher.requires_grad_(False), student.requires_grad_(False)
        self.m, self.block_index = method, block_index
        self.soft = [m for m in student.modules() if isinstance(m, SoftVQLinear)]
        self.quantized = [m for m in student.modules() if isinstance(m, (SoftVQLinear, VQLinear))]
        for layer in self.quantized:
            layer.requires_grad_(True)
        self.eval_batch, self.mse_scale = eval_batch, mse_scale
        self.harden_step = int(round(method["harden_at"] * method["iterations"])) if self.soft else None
        self.stats: dict[str, float] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        # Both blocks always run in eval mode: in train mode diffusers' label embedder drops labels at random.
        self.teacher.eval()
        self.student.eval()
        return self

    def forward(self, x, t, y):
        return self.student(x, timestep=t, class_labels=y)

    def regularizer(self) -> torch.Tensor:
        if not self.soft:
            return torch.zeros((), device=self.device)
        return torch.stack([layer.regularizer(self.m["regularizer"]) for layer in self.soft]).mean()

    def reg_weight(self) -> float:
        w = self.m["reg_weight"]
        if self.m["reg_schedule"] == "linear":  # ramp up: explore first, commit later
            w *= min(1.0, self.global_step / max(1, self.harden_step or self.m["iterations"]))
        return w

    def training_step(self, batch, batch_idx):
        x, t, y, target = batch
        mse = F.mse_loss(self(x, t, y), target)
        reg = self.regularizer()
        loss = mse / self.mse_scale + self.reg_weight() * reg
        self.log("mse", mse, prog_bar=True, logger=False)
        if self.global_step % self.m["log_every"] == 0:
            self._log_curves(mse, reg)
        return loss

    def on_before_optimizer_step(self, optimizer):
        if self.m["codebook_training"] == "after_freeze":  # the released code: a codebook moves once its codes froze
            for layer in self.soft:
                if not bool(layer.frozen.all()) and layer.codebook.grad is not None:
                    layer.codebook.grad.zero_()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.global_step  # optimizer steps taken so far
        if self.soft and step % self.m["freeze_every"] == 0:
            for layer in self.soft:
                layer.freeze_confident(self.m["freeze_threshold"])
        if self.soft and step == self.harden_step:
            self.stats["soft_mse"] = self.eval_mse()
            for layer in self.soft:
                layer.freeze_all()
            self.stats["hard_mse_at_harden"] = self.eval_mse()

    def on_train_end(self):
        if self.soft and "soft_mse" not in self.stats:  # harden_at = 1: harden after the last step
            self.stats["soft_mse"] = self.eval_mse()
            for layer in self.soft:
                layer.freeze_all()
            self.stats["hard_mse_at_harden"] = self.eval_mse()

    @torch.no_grad()
    def eval_mse(self) -> float:
        x, t, y, target = (v.to(self.device) for v in self.eval_batch)
        return F.mse_loss(self(x, t, y), target).item()

    def _log_curves(self, mse, reg) -> None:
        if self.logger is None:
            return
        metrics = {"calib/mse": mse.item(), "calib/loss": (mse / self.mse_scale + self.reg_weight() * reg).item(), "calib/block": self.block_index}
        if self.soft:
            frozen = sum(int(layer.frozen.sum()) for layer in self.soft) / sum(len(layer.frozen) for layer in self.soft)
            metrics.update({"calib/regularizer": reg.item(), "calib/frozen_fraction": frozen,
                            "calib/ratio_entropy": torch.stack([layer.entropy() for layer in self.soft]).mean().item()})
        self.logger.log_metrics(metrics, step=self.block_index * self.m["iterations"] + self.global_step)

    def configure_optimizers(self):
        logits = [layer.logits for layer in self.soft]
        rest = [p for layer in self.quantized for name, p in layer.named_parameters() if name != "logits"]
        groups = [{"params": rest, "lr": self.m["lr_codebook"]}]
        if logits:
            groups.append({"params": logits, "lr": self.m["lr_ratios"]})
        return torch.optim.RMSprop(groups, alpha=self.m["rmsprop_alpha"])
