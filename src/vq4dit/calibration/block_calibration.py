"""One DiT block's calibration as a LightningModule: the student is a copy of the block whose linears are the
method's prepared layers; the teacher is the frozen full-precision block, whose outputs on the pool are computed
once (they arrive in every batch as the target). The loss is block-output MSE divided by the block's MSE at the
method's starting point (the paper's lambda_d, set per block: a loss of 1 means "no better than the start" in
every block, so one regulariser weight fits blocks whose outputs differ in scale), plus the method's regulariser.

Everything method-specific (optimizer groups, regulariser, freezing, hardening, extra curves) is a hook of the
method (`vq4dit.methods.base.Method`); this module never asks which method it runs.
"""

import lightning as L
import torch.nn.functional as F
from torch import nn

from vq4dit.methods.base import FitSettings, Method
from vq4dit.methods.block_data import BlockData


class BlockCalibration(L.LightningModule):
    def __init__(self, student: nn.Module, layers: dict[str, nn.Module], method: Method, fit: FitSettings,
                 data: BlockData, mse_scale: float = 1.0):
        super().__init__()
        self.student = student.requires_grad_(False)
        self.layers, self.method, self.fit_settings = layers, method, fit
        for layer in layers.values():
            layer.requires_grad_(True)
        self.data, self.mse_scale = data, mse_scale
        self.stats: dict[str, float] = {}

    @property
    def block_index(self) -> int:
        return self.data.index

    def train(self, mode: bool = True):
        super().train(mode)
        # The student always runs in eval mode: in train mode diffusers' label embedder drops labels at random.
        self.student.eval()
        return self

    def forward(self, x, t, y):
        return self.student(x, timestep=t, class_labels=y)

    def heldout_mse(self) -> float:
        """The student's block MSE on the held-out rows, on whatever device the student is on right now."""
        return self.data.heldout_mse(self.student, next(self.student.parameters()).device).item()

    def training_step(self, batch, batch_idx):
        x, t, y, target = batch
        mse = F.mse_loss(self(x, t, y), target)
        loss = mse / self.mse_scale
        penalty = self.method.penalty(self.layers, self)
        if penalty is not None:
            loss = loss + penalty
        self.log("mse", mse, prog_bar=True, logger=False)
        if self.global_step % self.fit_settings.log_every == 0 and self.logger is not None:
            curves = {"calib/mse": mse.item(), "calib/loss": loss.item(), "calib/block": self.block_index}
            curves.update({f"calib/{k}": v for k, v in self.method.curves(self.layers).items()})
            self.logger.log_metrics(curves, step=self.block_index * self.fit_settings.iterations + self.global_step)
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.method.before_optimizer_step(self.layers)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.method.after_step(self.layers, self)

    def on_train_end(self):
        self.method.after_fit(self.layers, self)

    def configure_optimizers(self):
        return self.method.optimizer(self.layers, self.fit_settings)
