"""Scoring samples with torchmetrics on the digits protocol: FID, Inception-style score, class-conditional accuracy
and the real-vs-real FID floor for the same sample count; and PSNR against another run's samples. (The ImageNet
protocol is `vq4dit.imagenet`.)

A scorer owns a feature network (FID), a classifier (score and accuracy; may be None) and the real images:
`reference` (FID's real side) and a disjoint `heldout` set (the floor: real images scored like samples). The real
images' features are computed once per scorer, in batches, and come from a `ReferenceCache` (computed there once
per content key, when it has a folder); FID is fed features in the same batches, so the numbers are the same either
way.
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
from vq4dit.imagenet.frechet import PrecomputedFeatures
from vq4dit.models.classifier import DigitClassifier, Features, Logits
from vq4dit.reference_cache import ReferenceCache, extraction_key, tensors_digest


class Scorer:
    def __init__(self, features: nn.Module, logits: nn.Module | None, reference: torch.Tensor,
                 heldout: torch.Tensor, batch_size: int = 256, device: str = "cpu",
                 cache: ReferenceCache | None = None):
        self.device = torch.device(device)
        self.features, self.logits = features.to(self.device).eval(), logits
        if logits is not None:
            self.logits = logits.to(self.device).eval()
        self.reference, self.heldout, self.batch_size = reference, heldout, batch_size
        self.cache = cache if cache is not None else ReferenceCache(None)
        self._real: dict[str, torch.Tensor] | None = None  # the real images' features, once per scorer
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
        real = self.real_features()
        width = real["reference"].shape[1]
        fid = FrechetInceptionDistance(feature=PrecomputedFeatures(width), reset_real_features=False).to(self.device)
        self._feed(lambda b: fid.update(b, real=True), real["reference"])
        self._feed(lambda b: fid.update(b, real=False), self._embed(images01))
        out = {"fid": fid.compute().item(), "num_samples": len(images), "num_reference": len(self.reference)}
        fid.reset()  # keeps the real side
        floor_n = min(len(images), len(self.heldout))
        self._feed(lambda b: fid.update(b, real=False), real["heldout"][:floor_n])
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

    @torch.no_grad()
    def per_sample(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """What FID and class accuracy are made of, sample by sample (images in [-1, 1]), on the CPU: FID's
        `features` and, with a classifier, whether its top class is the asked-for label (`correct`). Runs from the
        same noise are compared by resampling these together (benchmarks/paired_bootstrap.py)."""
        images01 = (images + 1) / 2
        out = {"features": self._embed(images01).cpu()}
        if self.logits is not None:
            logits = []
            self._feed(lambda b: logits.append(self.logits(b).float().cpu()), images01)
            out["correct"] = torch.cat(logits).argmax(1) == labels.cpu()
        return out

    def real_features(self) -> dict[str, torch.Tensor]:
        """The feature network's features of `reference` and `heldout`, on the scorer's device."""
        if self._real is None:
            real = self.cache.features("digits-real-features", self._real_key, lambda: {
                "reference": self._embed(self.reference), "heldout": self._embed(self.heldout)})
            self._real = {name: t.to(self.device) for name, t in real.items()}
        return self._real

    def _real_key(self) -> dict:
        """What determines the real features: the images' bytes and how they are embedded."""
        return {"images": tensors_digest({"reference": self.reference, "heldout": self.heldout}),
                **extraction_key(self.features, self.batch_size, self.device, [Scorer._embed, Scorer._feed])}

    @torch.no_grad()
    def _embed(self, images01: torch.Tensor) -> torch.Tensor:
        """FID's features of images in [0, 1], batch by batch on the scorer's device."""
        features = []
        self._feed(lambda b: features.append(self.features(b)), images01)
        return torch.cat(features)

    def _feed(self, update, images: torch.Tensor) -> None:
        for start in range(0, len(images), self.batch_size):
            update(images[start:start + self.batch_size].to(self.device))


def digits_scorer(classifier: str, reference_fraction: float = 0.5, batch_size: int = 512,
                  device: str = "cpu", seed: int = 0, cache: ReferenceCache | None = None) -> Scorer:
    """The digits protocol: the shipped classifier's 128-d features for FID, its logits for the score."""
    net = load_classifier(Path(classifier))
    images, labels = digits(16)
    ref_idx, held_idx = split(labels, reference_fraction, seed=seed)
    to01 = lambda x: (x + 1) / 2  # noqa: E731
    return Scorer(Features(net), Logits(net), to01(images[ref_idx]), to01(images[held_idx]), batch_size, device,
                  cache)


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


def squared_errors(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each sample's mean squared error against the reference sample from the same noise (both in [-1, 1]), in
    float64 on the CPU: the PSNR of any set of samples is 10 log10(4 / the mean of theirs), as `SamplesPSNR`'s."""
    return (images.double().cpu() - reference.double().cpu()).square().flatten(1).mean(1)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR (dB) of images against reference images from the same noise, both in [-1, 1], in one batch."""
    metric = SamplesPSNR()
    metric.update(images, reference)
    return metric.compute()
