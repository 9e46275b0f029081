"""After the block loop: one fit of the whole quantized model against the full-precision model's own outputs.

Block-wise calibration matches every block to its fp twin on fp inputs, so errors that add up across blocks are
never seen. This pass runs the quantized model end to end on the pool's rows (x_t, t, y) and fits its output
(the noise prediction, and the variance channels of a model that learns them) to the fp model's, with the codes
fixed: only the deployed layers' float parameters train (VQ codebooks, biases; whatever float parameters a
layer type has), everything else stays frozen. It is one LightningModule and one `Trainer.fit`, like a block's,
and like a block it ships only if it beats what it started from on the pool's held-out rows.
"""

from dataclasses import replace

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from vq4dit.calibration.settings import ModelFitSettings
from vq4dit.models import ConditionalDiT
from vq4dit.precision import autocast
from vq4dit.quant.quantized_linear import QuantizedLinear
from vq4dit.seeds import generator


def resolved(settings: "ModelFitSettings | None", method) -> "ModelFitSettings":
    """The settings with iterations None replaced by the method's choice."""
    settings = settings or ModelFitSettings()
    if settings.iterations is None:
        settings = replace(settings, iterations=method.model_fit_iterations)
    return settings


@torch.no_grad()
def as_stored(model: ConditionalDiT) -> None:
    """Every deployed layer's trained parameters rounded, in place, to what its checkpoint stores (fp16 codebooks;
    biases stay fp32): the model that is scored is the model that ships. Shared input quantizers stay shared."""
    for layer in (m for m in model.modules() if isinstance(m, QuantizedLinear)):
        stored, _ = layer.stored()
        for name, p in layer.named_parameters(recurse=False):
            if name in stored:
                p.copy_(stored[name].to(p.dtype))


def trainable_parameters(model: ConditionalDiT) -> list[torch.nn.Parameter]:
    """The float parameters of every deployed quantized layer (codes are buffers: they never train)."""
    return [p for m in model.modules() if isinstance(m, QuantizedLinear) for p in m.parameters()
            if p.is_floating_point()]


class ModelCalibration(L.LightningModule):
    def __init__(self, model: ConditionalDiT, settings: ModelFitSettings):
        super().__init__()
        self.model, self.settings = model.requires_grad_(False), settings
        self.trainable = trainable_parameters(model)
        for p in self.trainable:
            p.requires_grad_(True)

    def on_train_start(self):  # after Lightning placed the model: what is held sits on its device
        self._hold_fixed(True)

    def on_train_end(self):
        self._hold_fixed(False)

    def _hold_fixed(self, hold: bool) -> None:
        for layer in self.model.modules():
            if isinstance(layer, QuantizedLinear):
                layer.hold_fixed(hold)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # diffusers' label embedder drops labels in train mode
        return self

    def training_step(self, batch, batch_idx):
        x, t, y, target = batch
        mse = F.mse_loss(self.model(x, t, y).float(), target)
        self.log("mse", mse, prog_bar=True, logger=False)
        if self.global_step % self.settings.log_every == 0 and self.logger is not None:
            self.logger.log_metrics({"model_fit/mse": mse.item()}, step=self.global_step)
        return mse

    def configure_optimizers(self):
        return torch.optim.RMSprop(self.trainable, lr=self.settings.lr, alpha=self.settings.rmsprop_alpha)


@torch.no_grad()
def model_outputs(model: ConditionalDiT, rows: tuple[torch.Tensor, ...], device: torch.device, precision: str,
                  chunk: int = 256) -> torch.Tensor:
    """`model`'s fp32 outputs on (x, t, y), chunk by chunk on `device`, in host memory."""
    x, t, y = rows
    outs = []
    for i in range(0, len(x), chunk):
        with autocast(device, precision):
            out = model(x[i:i + chunk].to(device), t[i:i + chunk].to(device), y[i:i + chunk].to(device))
        outs.append(out.float().cpu())
    return torch.cat(outs)


def heldout_mse(model: ConditionalDiT, rows: tuple[torch.Tensor, ...], target: torch.Tensor, device: torch.device,
                precision: str) -> float:
    return F.mse_loss(model_outputs(model, rows, device, precision), target).item()


def fit_model(model: ConditionalDiT, train: tuple[torch.Tensor, ...], heldout: tuple[torch.Tensor, ...],
              settings: ModelFitSettings, make_trainer, device: torch.device, precision: str, seed: int) -> dict:
    """Fit the quantized `model` in place; train and heldout are (x, t, y, fp output). Returns its statistics:
    output MSE on the held-out rows before and after, and which was kept."""
    before = heldout_mse(model, heldout[:3], heldout[3], device, precision)
    saved = [p.detach().clone() for p in trainable_parameters(model)]  # the blocks' layers: already as stored
    module = ModelCalibration(model, settings)
    loader = DataLoader(TensorDataset(*train), batch_size=settings.batch_size, sampler=RandomSampler(
        range(len(train[0])), replacement=True, num_samples=settings.iterations * settings.batch_size,
        generator=generator(seed, "model-fit-batches")))
    make_trainer(max_steps=settings.iterations).fit(module, loader)
    model.to(device).requires_grad_(False)  # Lightning's teardown may leave the module on the CPU
    as_stored(model)  # what ships is what the checkpoint holds (fp16 codebooks ...): that is what is scored
    after = heldout_mse(model, heldout[:3], heldout[3], device, precision)
    kept = "fit" if after <= before else "blocks"
    if kept == "blocks":
        with torch.no_grad():
            for p, value in zip(trainable_parameters(model), saved):
                p.copy_(value)
    return {"start_mse": before, "fitted_mse": after, "kept": kept, "iterations": settings.iterations}
