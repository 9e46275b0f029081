"""Scoring samples with torchmetrics on the digits protocol: FID, Inception-style score, class-conditional accuracy
and the real-vs-real FID floor for the same sample count; and PSNR against another run's samples. (The ImageNet
protocol is `vq4dit.imagenet`.)

A scorer owns a feature network (FID), a classifier (score and accuracy; may be None) and the real images:
`reference` (FID's real side) and a disjoint `heldout` set (the floor: real images scored like samples).
"""

import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.image import PeakSignalNoiseRatio
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from vq4dit.data.digits import digits, split
from vq4dit.errors import UserError
from vq4dit.models.classifier import DigitClassifier, Features, Logits


class Scorer:
    def __init__(self, features: nn.Module, logits: nn.Module | None, reference: torch.Tensor,
                 heldout: torch.Tensor, batch_size: int = 256, device: str = "cpu"):
        self.device = torch.device(device)
        self.features, self.logits = features.to(self.device).eval(), logits
        if logits is not None:
            self.logits = logits.to(self.device).eval()
        self.reference, self.heldout, self.batch_size = reference, heldout, batch_size
        self._images, self._labels = [], []

    def check(self, num_samples: int, image_shape: tuple[int, int, int]) -> None:
        if tuple(image_shape) != tuple(self.reference.shape[1:]):
            raise UserError(f"this model makes {' x '.join(map(str, image_shape))} images, the metric's real "
                            f"images are {' x '.join(map(str, self.reference.shape[1:]))}: choose the metric "
                            "for this model")

    def update(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """A batch of samples (images in [-1, 1]); the digits are small enough to score all at once."""
        self._images.append(images.float().cpu())
        self._labels.append(labels.cpu())

    def compute(self, seed: int = 0) -> dict:
        return self.score(torch.cat(self._images), torch.cat(self._labels), seed)

    @torch.no_grad()
    def score(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict:
        """images in [-1, 1] (N, C, H, W), labels (N,) -> a flat dict of floats."""
        images01 = (images + 1) / 2
        fid = FrechetInceptionDistance(feature=self.features, normalize=True, reset_real_features=False)
        fid = fid.to(self.device)
        self._feed(lambda b: fid.update(b, real=True), self.reference)
        self._feed(lambda b: fid.update(b, real=False), images01)
        out = {"fid": fid.compute().item(), "num_samples": len(images), "num_reference": len(self.reference)}
        fid.reset()  # keeps the real side
        floor_n = min(len(images), len(self.heldout))
        self._feed(lambda b: fid.update(b, real=False), self.heldout[:floor_n])
        out.update(fid_floor=fid.compute().item(), fid_floor_samples=floor_n)
        if self.logits is not None:
            out.update(self._classifier_scores(images01, labels, seed))
        return out

    def _classifier_scores(self, images01, labels, seed) -> dict:
        logits = []
        self._feed(lambda b: logits.append(self.logits(b).float().cpu()), images01)
        logits = torch.cat(logits)
        inception = InceptionScore(feature=nn.Identity(), splits=10)  # fed the logits computed once above
        inception.update(logits)
        with torch.random.fork_rng(devices=[]):  # the score shuffles its splits: keep it reproducible
            torch.manual_seed(seed)
            is_mean, is_std = inception.compute()
        num_classes = logits.shape[1]
        accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")(logits, labels.cpu())
        return {"inception_score": is_mean.item(), "inception_score_std": is_std.item(),
                "class_accuracy": accuracy.item()}

    def _feed(self, update, images: torch.Tensor) -> None:
        for start in range(0, len(images), self.batch_size):
            update(images[start:start + self.batch_size].to(self.device))


def digits_scorer(classifier: str, reference_fraction: float = 0.5, batch_size: int = 512,
                  device: str = "cpu", seed: int = 0) -> Scorer:
    """The digits protocol: the shipped classifier's 128-d features for FID, its logits for the score."""
    net = load_classifier(Path(classifier))
    images, labels = digits(16)
    ref_idx, held_idx = split(labels, reference_fraction, seed=seed)
    to01 = lambda x: (x + 1) / 2  # noqa: E731
    return Scorer(Features(net), Logits(net), to01(images[ref_idx]), to01(images[held_idx]), batch_size, device)


def load_classifier(path: Path) -> DigitClassifier:
    if not path.exists():
        raise UserError(f"metric.classifier={path} not found; train it with "
                        "`python data/train_reference.py reference=classifier`")
    net = DigitClassifier()
    net.load_state_dict(load_file(path))
    return net.eval().requires_grad_(False)


class SamplesPSNR:
    """PSNR (dB) of samples against another run's samples from the same noise, both in [-1, 1] (data range 2),
    accumulated over batches (torchmetrics sums the squared error): what `compare_to` reports."""

    def __init__(self):
        self.metric = PeakSignalNoiseRatio(data_range=2.0)

    def update(self, images: torch.Tensor, reference: torch.Tensor) -> None:
        self.metric.update(images.float().cpu(), reference.float().cpu())

    def compute(self) -> float:
        value = self.metric.compute().item()
        return value if math.isfinite(value) else float("inf")


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR (dB) of images against reference images from the same noise, both in [-1, 1], in one batch."""
    metric = SamplesPSNR()
    metric.update(images, reference)
    return metric.compute()
