"""Training the digits feature network (the classifier that scores samples) with Lightning."""

import lightning as L
import torch
import torch.nn.functional as F

from vq4dit.models.classifier import DigitClassifier


def jitter(x: torch.Tensor, pixels: int = 1) -> torch.Tensor:
    """Random translation by up to `pixels`, so the classifier does not key on exact stroke positions."""
    dx, dy = torch.randint(-pixels, pixels + 1, (2,)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


class ClassifierTraining(L.LightningModule):
    def __init__(self, classifier: DigitClassifier, lr: float):
        super().__init__()
        self.classifier, self.lr = classifier, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.classifier(jitter(x)), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self.classifier(x).argmax(1) == y).float().mean()
        self.log("val/acc", acc, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.classifier.parameters(), lr=self.lr, weight_decay=1e-4)
