"""Scoring: the Scorer's FID is the closed-form Fréchet distance of its features, the floor sits far below noise,
the shipped classifier's accuracy on held-out digits, and PSNR over batches against its formula."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

from vq4dit.data.digits import digits, split
from vq4dit.metrics import SamplesPSNR, Scorer, digits_scorer

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER = ROOT / "data" / "digit_classifier.safetensors"
D = 8  # feature dimension: images of 1 x 2 x 4 pixels


class Pixels(nn.Module):
    """An identity-like FID feature network: images in [0, 1], N x 1 x 2 x 4 -> their 8 pixels mapped back to
    [-1, 1] scale, so the features are exactly the values handed to `Scorer.score`."""

    num_features = D

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        assert images01.shape[1:] == (1, 2, 4)
        return images01.flatten(1) * 2 - 1


def frechet(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64."""
    covmean = linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean.real))


def empirical(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)  # unbiased, like torchmetrics


def gaussians(n: int, mu: np.ndarray, cov: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """n draws as images N x 1 x 2 x 4."""
    x = rng.multivariate_normal(mu, cov, size=n)
    return torch.from_numpy(x).float().reshape(n, 1, 2, 4)


@pytest.fixture(scope="module")
def gauss():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(D, D)), rng.normal(size=(D, D))
    mu_r, cov_r = np.zeros(D), a @ a.T / D + 0.1 * np.eye(D)
    mu_f, cov_f = np.full(D, 0.5), b @ b.T / D + 0.3 * np.eye(D)
    n = 4000
    reference, heldout = gaussians(n, mu_r, cov_r, rng), gaussians(n, mu_r, cov_r, rng)
    fake = gaussians(n, mu_f, cov_f, rng)
    scorer = Scorer(Pixels(), None, (reference + 1) / 2, (heldout + 1) / 2, batch_size=512)
    out = scorer.score(fake, torch.zeros(n, dtype=torch.long))
    return dict(out=out, reference=reference, heldout=heldout, fake=fake,
                population=frechet(mu_f, cov_f, mu_r, cov_r), population_floor=0.0)


def _features(images: torch.Tensor) -> torch.Tensor:
    return Pixels()((images + 1) / 2)  # what the Scorer feeds: [-1, 1] -> [0, 1] -> the feature network


def test_fid_is_the_closed_form_of_the_empirical_gaussians(gauss):
    out = gauss["out"]
    assert set(out) == {"fid", "num_samples", "num_reference", "fid_floor", "fid_floor_samples"}  # no classifier
    assert out["num_samples"] == out["num_reference"] == out["fid_floor_samples"] == 4000
    ref = empirical(_features(gauss["reference"]))
    expected = frechet(*empirical(_features(gauss["fake"])), *ref)
    assert out["fid"] == pytest.approx(expected, rel=1e-3)
    expected_floor = frechet(*empirical(_features(gauss["heldout"])), *ref)
    assert out["fid_floor"] == pytest.approx(expected_floor, rel=1e-3, abs=1e-4)


def test_closed_form_by_eigendecomposition_agrees_with_sqrtm(gauss):
    """The same number from a symmetric square root: Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2)."""
    (mu1, s1), (mu2, s2) = empirical(_features(gauss["fake"])), empirical(_features(gauss["reference"]))
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    eig = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
    assert gauss["out"]["fid"] == pytest.approx(eig, rel=1e-3)


def test_fid_is_near_the_population_value(gauss):
    assert gauss["population"] > 1.0
    assert gauss["out"]["fid"] == pytest.approx(gauss["population"], rel=0.1)
    # same distribution: the floor is sampling error only, far below the distance between the two
    assert gauss["out"]["fid_floor"] < 0.05 * gauss["population"]


def test_floor_uses_as_many_heldout_images_as_samples(gauss):
    scorer = Scorer(Pixels(), None, (gauss["reference"] + 1) / 2, (gauss["heldout"] + 1) / 2)
    out = scorer.score(gauss["fake"][:300], torch.zeros(300, dtype=torch.long))
    assert out["num_samples"] == out["fid_floor_samples"] == 300 and out["num_reference"] == 4000
    ref = empirical(_features(gauss["reference"]))
    assert out["fid_floor"] == pytest.approx(frechet(*empirical(_features(gauss["heldout"][:300])), *ref), rel=1e-3)


@pytest.fixture(scope="module")
def digit_scorer():
    assert CLASSIFIER.exists(), "the shipped classifier is part of the repository"
    return digits_scorer(classifier=str(CLASSIFIER))


@pytest.fixture(scope="module")
def heldout_digits():
    """The digits the shipped classifier was not trained on (reference=classifier: train_fraction 0.8, seed 0)."""
    images, labels = digits(16)
    _, test_idx = split(labels, 0.8, seed=0)
    return images[test_idx], labels[test_idx]


def test_real_vs_real_floor_is_far_below_noise(digit_scorer):
    n = 300
    noise = torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = digit_scorer.score(noise, torch.arange(n) % 10)
    assert out["fid_floor_samples"] == n and out["num_reference"] == len(digit_scorer.reference)
    assert out["fid_floor"] > 0 and out["fid"] > 20 * out["fid_floor"]
    assert out["class_accuracy"] < 0.3
    assert out["inception_score"] < 2  # noise lands in one or two classes: a score near 1


def test_scoring_the_heldout_side_gives_the_floor(digit_scorer):
    held = digit_scorer.heldout * 2 - 1  # the scorer keeps real images in [0, 1]; samples come in [-1, 1]
    out = digit_scorer.score(held, torch.zeros(len(held), dtype=torch.long))
    assert out["fid"] == pytest.approx(out["fid_floor"], rel=1e-6)


def test_shipped_classifier_accuracy_on_heldout_digits(digit_scorer, heldout_digits):
    images, labels = heldout_digits
    assert len(images) == 359
    out = digit_scorer.score(images, labels)
    assert out["class_accuracy"] >= 0.95
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    chance = digit_scorer.score(images, shuffled)["class_accuracy"]
    assert 0.03 < chance < 0.2
    # real digits are confidently and evenly classified: a high score (at most 10, the class count)
    assert 5 < out["inception_score"] <= 10


def test_psnr_of_identical_samples_is_inf():
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    psnr = SamplesPSNR()
    psnr.update(x, x.clone())
    assert psnr.compute() == math.inf


@pytest.mark.parametrize("sigma", [0.01, 0.1])
def test_psnr_over_batches_matches_its_formula(sigma):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1
    y = x + sigma * torch.randn(x.shape, generator=g)
    mse = (y.double() - x.double()).pow(2).mean().item()
    expected = 10 * math.log10(2.0 ** 2 / mse)  # data range 2: images in [-1, 1]; of all pixels, fed in batches
    forward, backward = SamplesPSNR(), SamplesPSNR()
    for start in range(0, 8, 3):
        forward.update(y[start:start + 3], x[start:start + 3])
        backward.update(x[start:start + 3], y[start:start + 3])
    value = forward.compute()
    assert math.isfinite(value) and value == pytest.approx(expected, abs=1e-3)
    assert value == pytest.approx(10 * math.log10(4 / sigma ** 2), abs=0.5)  # ~46 dB at 0.01, ~26 dB at 0.1
    assert backward.compute() == pytest.approx(value, abs=1e-6)  # symmetric
