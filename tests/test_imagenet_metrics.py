"""The ImageNet protocol's math on CPU, each part against an independent computation of what the ADM evaluator
computes: the Fréchet distance to stored statistics (scipy's sqrtm), the Inception Score over consecutive splits,
k-NN precision/recall (scipy distances; point sets whose answer is known by construction), the spatial features'
layout, and the whole scorer on a small stand-in for Inception."""

import numpy as np
import pytest
import torch
from scipy import linalg
from scipy.spatial.distance import cdist
from scipy.special import softmax
from stand_in_inception import POOL, SPATIAL, stand_in_features
from torch import nn

from vq4dit.errors import UserError
from vq4dit.imagenet import ImageNetScorer
from vq4dit.imagenet.adm_npz import read_reference_batch
from vq4dit.imagenet.frechet import FrechetDistanceToStatistics
from vq4dit.imagenet.inception import InceptionFeatures, load_inception
from vq4dit.imagenet.inception_score import InceptionScore
from vq4dit.imagenet.precision_recall import precision_recall


# --- independent reference computations (numpy / scipy, float64), written from the ADM evaluator's definitions ---
def frechet(mu1, s1, mu2, s2) -> float:
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, split_size: int) -> float:
    p = softmax(logits.astype(np.float64), axis=1)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def brute_precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3) -> tuple[float, float]:
    def radii(x):  # distance to the k-th nearest other point: the sorted row's entry k (entry 0 is the point)
        return np.sort(cdist(x, x, "sqeuclidean"), axis=1)[:, k]

    cross = cdist(samples, reference, "sqeuclidean")
    precision = (cross <= radii(reference)[None]).any(1).mean()
    recall = (radii(samples)[None] >= cross.T).any(1).mean()
    return float(precision), float(recall)


def gaussian(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix * scale + shift


# --- Fréchet distance ---------------------------------------------------------------------------------------------
def test_frechet_distance_to_stored_statistics_is_the_closed_form():
    reference = gaussian(3000, 8, seed=0)
    mu, sigma = reference.mean(0), np.cov(reference, rowvar=False)
    samples = gaussian(700, 8, seed=1, shift=0.4, scale=1.3)
    metric = FrechetDistanceToStatistics(mu, sigma, "cpu")
    for part in np.array_split(samples, 6):  # streamed in uneven batches
        metric.update(torch.from_numpy(part))
    expected = frechet(samples.mean(0), np.cov(samples, rowvar=False), mu, sigma)
    assert expected > 0.5
    assert metric.compute() == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_of_samples_to_their_own_statistics_is_zero():
    samples = gaussian(500, 6, seed=2, shift=3.0)
    metric = FrechetDistanceToStatistics(samples.mean(0), np.cov(samples, rowvar=False), "cpu")
    metric.update(torch.from_numpy(samples).float())
    assert metric.compute() == pytest.approx(0.0, abs=1e-4)


# --- Inception Score ------------------------------------------------------------------------------------------------
def test_inception_score_uses_consecutive_splits_like_adm():
    logits = np.random.default_rng(3).normal(size=(23, 9)) * 3
    score = InceptionScore(split_size=7)  # splits of 7, 7, 7, 2 samples, fed in batches of 5
    for start in range(0, 23, 5):
        score.update(torch.from_numpy(logits[start:start + 5]).float())
    assert score.compute() == pytest.approx(inception_score(logits.astype(np.float32), 7), rel=1e-6)
    # a different split size gives a different number: the splits are really cut where ADM cuts them
    assert abs(score.compute() - inception_score(logits, 23)) > 1e-3


def test_inception_score_closed_forms():
    confident = torch.eye(10) * 60  # every sample certain, every class once: exp(log 10) = 10
    score = InceptionScore(split_size=10)
    score.update(torch.cat([confident, confident]))  # two splits of the same
    assert score.compute() == pytest.approx(10.0, rel=1e-6)
    same = InceptionScore()
    same.update(torch.randn(1, 7).repeat(50, 1))  # one distribution for every sample: no information, score 1
    assert same.compute() == pytest.approx(1.0, abs=1e-9)


# --- precision / recall ---------------------------------------------------------------------------------------------
def test_precision_recall_on_sets_with_a_known_answer():
    rng = np.random.default_rng(4)
    centre = lambda i: np.eye(4)[i] * 100  # noqa: E731  far-apart clusters of unit spread
    a, c, d = (rng.normal(size=(n, 4)) + centre(i) for i, n in ((0, 10), (1, 20), (2, 15)))
    reference = np.concatenate([a, c])  # clusters A and C
    samples = np.concatenate([a.copy(), d])  # A exactly, and D where the reference has nothing
    precision, recall = precision_recall(torch.from_numpy(reference), torch.from_numpy(samples))
    assert precision == pytest.approx(10 / 25)  # the A copies sit on reference points; D is outside
    assert recall == pytest.approx(10 / 30)  # the reference's A is covered, its C is not


@pytest.mark.parametrize("k,block", [(3, 7), (3, 4096), (1, 5), (5, 16)])
def test_precision_recall_equals_brute_force(k, block):
    reference, samples = gaussian(60, 5, seed=5), gaussian(45, 5, seed=6, shift=0.5, scale=1.2)
    ours = precision_recall(torch.from_numpy(reference).float(), torch.from_numpy(samples).float(), k, block)
    expected = brute_precision_recall(reference.astype(np.float32).astype(np.float64),
                                      samples.astype(np.float32).astype(np.float64), k)
    assert ours == pytest.approx(expected, abs=1e-9)
    assert 0.1 < expected[0] < 0.95 and 0.1 < expected[1] < 0.95  # neither trivially 0 nor 1


# --- the spatial features' layout -----------------------------------------------------------------------------------
class _KnownSpatial(nn.Module):
    """branch1x1's output holds 100 c + 10 h + w at channel c, row h, column w (10 channels, 3 x 3)."""

    def __init__(self):
        super().__init__()
        self.Mixed_6d = nn.Module()
        self.Mixed_6d.branch1x1 = nn.Identity()
        c, h, w = torch.meshgrid(torch.arange(10), torch.arange(3), torch.arange(3), indexing="ij")
        self.register_buffer("values", (100 * c + 10 * h + w).float())

    def forward(self, images):
        self.Mixed_6d.branch1x1(self.values.expand(len(images), -1, -1, -1))
        return torch.zeros(len(images), 4), torch.zeros(len(images), 2)


def test_spatial_features_are_the_first_7_channels_in_tensorflow_order():
    features = InceptionFeatures(_KnownSpatial())(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    # TF flattens N x H x W x C: row by row, column by column, the 7 channels of each position together
    expected = [100 * c + 10 * h + w for h in range(3) for w in range(3) for c in range(7)]
    assert features.spatial.shape == (2, 63)
    assert features.spatial[0].tolist() == expected and features.spatial[1].tolist() == expected


def test_inception_weights_must_be_a_local_file(tmp_path):
    missing = tmp_path / "pt_inception.pth"
    with pytest.raises(UserError, match=str(missing)):
        load_inception(missing)
    (tmp_path / "garbage.pth").write_bytes(b"not weights")
    with pytest.raises(UserError):  # without torch-fidelity: the extra to install; with it: not the weights
        load_inception(tmp_path / "garbage.pth")


# --- the scorer on a stand-in network -------------------------------------------------------------------------------
def _uint8(images: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.round((images.double().numpy().clip(-1, 1) + 1) * 127.5).astype(np.uint8))


def _smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Images in [-1, 1] with structure at the stand-in's 2 x 2 grid."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 2, 2, generator=g) * 2 - 1
    return (torch.nn.functional.interpolate(coarse, size=size) + 0.3 * torch.randn(n, 3, size, size, generator=g)
            ).clamp(-1, 1)


@pytest.fixture(scope="module")
def reference_npz(tmp_path_factory):
    """A reference batch of 16 px images whose stored statistics come from other images (as ImageNet's come from
    the whole training set, not from its 10k images)."""
    net = stand_in_features()
    stats_from = net(_uint8(_smooth_images(400, 16, seed=10)))
    pool, spatial = stats_from.pool.double().numpy(), stats_from.spatial.double().numpy()
    images = _uint8(_smooth_images(30, 16, seed=11)).permute(0, 2, 3, 1).numpy()
    path = tmp_path_factory.mktemp("ref") / "VIRTUAL_tiny16.npz"
    np.savez(path, arr_0=images, mu=pool.mean(0), sigma=np.cov(pool, rowvar=False),
             mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False))
    return path


def test_scorer_numbers_are_the_adm_evaluator_numbers(reference_npz):
    scorer = ImageNetScorer(stand_in_features(), read_reference_batch(reference_npz), sample_counts=None,
                            split_size=40, batch_size=16)
    samples = _smooth_images(90, 16, seed=12) * 0.6 + 0.2  # a narrower, shifted distribution than the reference
    scorer.check(90, (3, 16, 16))
    for start in range(0, 90, 25):
        scorer.update(samples[start:start + 25], torch.zeros(25, dtype=torch.long))
    out = scorer.compute()

    # what the ADM evaluator does with the 8-bit samples, computed here without the scorer
    net = stand_in_features()
    ours = net(_uint8(samples))
    pool, spatial, logits = (t.double().numpy() for t in ours)
    with np.load(reference_npz) as ref:
        stats = {k: ref[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
        ref_pool = net(torch.from_numpy(ref["arr_0"]).permute(0, 3, 1, 2)).pool.double().numpy()
    assert pool.shape == (90, POOL) and spatial.shape == (90, SPATIAL)
    fid = frechet(pool.mean(0), np.cov(pool, rowvar=False), stats["mu"], stats["sigma"])
    sfid = frechet(spatial.mean(0), np.cov(spatial, rowvar=False), stats["mu_s"], stats["sigma_s"])
    assert out["fid"] == pytest.approx(fid, rel=1e-5) and fid > 0.01
    assert out["sfid"] == pytest.approx(sfid, rel=1e-5) and sfid > 0.01
    assert out["inception_score"] == pytest.approx(inception_score(logits, 40), rel=1e-5)  # splits 40, 40, 10
    precision, recall = brute_precision_recall(ref_pool, pool)
    assert (out["precision"], out["recall"]) == pytest.approx((precision, recall), abs=1e-9)
    assert 0 < precision < 1 and 0 < recall < 1
    assert out["num_samples"] == 90 and out["num_reference"] == 30


def test_scorer_refuses_a_run_it_cannot_score_before_sampling(reference_npz, tmp_path):
    scorer = ImageNetScorer(stand_in_features(), read_reference_batch(reference_npz), sample_counts=[10000, 50000])
    with pytest.raises(UserError, match="num_samples=90: .*10000 or 50000"):
        scorer.check(90, (3, 16, 16))
    scorer.check(10000, (3, 16, 16))
    with pytest.raises(UserError, match=f"{reference_npz}.* 16 x 16 images.* 32 x 32"):
        scorer.check(10000, (3, 32, 32))
    any_count = ImageNetScorer(stand_in_features(), read_reference_batch(reference_npz))
    with pytest.raises(UserError, match="more than 3 samples"):
        any_count.check(3, (3, 16, 16))
    # statistics of another feature network (another width) are refused too
    with np.load(reference_npz) as ref:
        arrays = dict(ref)
    np.savez(tmp_path / "other.npz", **{**arrays, "mu": np.zeros(2048), "sigma": np.eye(2048)})
    other = ImageNetScorer(stand_in_features(), read_reference_batch(tmp_path / "other.npz"))
    with pytest.raises(UserError, match=f"mu has 2048 values, the feature network gives {POOL}"):
        other.check(100, (3, 16, 16))
