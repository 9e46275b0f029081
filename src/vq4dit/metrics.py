"""Scoring samples with torchmetrics: FID, Inception-style score, class-conditional accuracy, the real-vs-real
FID floor for the same sample count, and PSNR against the full-precision model's samples.

A scorer owns a feature network (FID), a classifier (score and accuracy; may be None) and the real images:
`reference` (FID's real side) and a disjoint `heldout` set (the floor: real images scored like samples).
"""

import math
from pathlib import Path

import numpy as np
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


def inception_scorer(inception_weights: str, reference: str, batch_size: int = 64, device: str = "cpu") -> Scorer:
    """The ImageNet protocol: torch-fidelity's Inception (local weights, `antialias=False` like ADM/torch-fidelity)
    and real images from an `.npz` (uint8 N x H x W x 3 under `arr_0`, e.g. VIRTUAL_imagenet256_labeled.npz),
    split in two halves: the reference side and the floor's held-out side."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise UserError("metric=imagenet needs the optional extra: pip install -e '.[inception]' "
                        "(torch-fidelity; on a GPU machine with a matching torchvision)") from None
    for name, p in (("metric.inception_weights", inception_weights), ("metric.reference", reference)):
        if not Path(p).exists():
            raise UserError(f"{name}={p} not found; give a local path")
    features = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                  feature_extractor_weights_path=inception_weights, antialias=False)
    features.num_features = 2048
    logits = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"],
                                feature_extractor_weights_path=inception_weights, antialias=False)
    real = torch.from_numpy(np.load(reference)["arr_0"]).permute(0, 3, 1, 2)
    half = len(real) // 2
    # torch-fidelity's Inception wants uint8 images: wrap so the Scorer can feed [0, 1] floats
    return Scorer(_Uint8(features), _Uint8(logits), real[:half].float() / 255, real[half:].float() / 255,
                  batch_size, device)


class _Uint8(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_features = getattr(net, "num_features", None)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.net((images01 * 255).round().to(torch.uint8))


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR (dB) of images against reference images from the same noise, both in [-1, 1]."""
    value = PeakSignalNoiseRatio(data_range=2.0)(images.float(), reference.float()).item()
    return value if math.isfinite(value) else float("inf")
