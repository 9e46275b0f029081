import pytest
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

import vq4dit.quant.kmeans as kmeans_module
from vq4dit.quant.kmeans import inertia, kmeans, nearest


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are small; on a loaded 2-core machine extra threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def gaussian_mixture(components: int = 16, per_component: int = 500, d: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(components, d, generator=gen) * 4
    stds = 0.2 + 0.8 * torch.rand(components, 1, generator=gen)
    labels = torch.arange(components).repeat_interleave(per_component)
    return means[labels] + stds[labels] * torch.randn(len(labels), d, generator=gen)


def weight_subvectors(d: int) -> torch.Tensor:
    """Sub-vectors of a heavy-tailed (Student-t, 3 dof) 256x256 matrix scaled like a trained layer's weights."""
    gen = torch.Generator().manual_seed(0)
    normal = torch.randn(256, 256, generator=gen)
    chi2 = torch.randn(3, 256, 256, generator=gen).square().sum(0)
    return (0.02 * normal / (chi2 / 3).sqrt()).reshape(-1, d)


def sklearn_inertia(points: torch.Tensor, k: int) -> float:
    fitted = KMeans(n_clusters=k, n_init=1, random_state=0).fit(points.double().numpy())
    return inertia(points, torch.from_numpy(fitted.cluster_centers_))


def test_same_seed_same_codebook_other_seed_differs():
    points = weight_subvectors(4)[:4000].double()
    codebook = kmeans(points, 32, seed=3)
    assert codebook.dtype == torch.float32 and codebook.shape == (32, 4)
    assert torch.equal(codebook, kmeans(points, 32, seed=3))
    assert not torch.equal(codebook, kmeans(points, 32, seed=4))


def test_chunk_size_does_not_change_the_codebook():
    points = weight_subvectors(2)[:10000]
    assert torch.equal(kmeans(points, 64, chunk=1000), kmeans(points, 64, chunk=1 << 20))


def test_gaussian_mixture_inertia_matches_sklearn():
    points = gaussian_mixture()
    ratio = inertia(points, kmeans(points, 16)) / sklearn_inertia(points, 16)
    assert ratio <= 1.01, f"inertia ratio ours/sklearn = {ratio:.4f}"


@pytest.mark.parametrize("d,k", [(2, 64), (2, 256), (4, 64), (4, 256)])
def test_weight_like_inertia_matches_sklearn(d, k):
    points = weight_subvectors(d)
    # cache-sized chunks run faster on a CPU; the codebook does not depend on them
    ratio = inertia(points, kmeans(points, k, chunk=4096)) / sklearn_inertia(points, k)
    assert ratio <= 1.01, f"inertia ratio ours/sklearn = {ratio:.4f} at d={d}, k={k}"


def test_k_equal_to_n_gives_every_point():
    points = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    codebook = kmeans(points, 50)
    assert inertia(points, codebook) < 1e-4  # zero but for float32 rounding in |x|^2 - 2 x.c + |c|^2
    assert torch.allclose(codebook[nearest(points, codebook)[0][:, 0]], points, atol=1e-6)


def test_empty_cluster_is_reseeded_at_the_farthest_point(monkeypatch):
    points = gaussian_mixture(components=4, per_component=100, d=2)
    far_init = torch.cat([points[:3] - points.mean(0), torch.full((1, 2), 1e3)])  # the last center wins no point
    monkeypatch.setattr(kmeans_module, "_greedy_kmeanspp", lambda x, k, gen, chunk, w=None: far_init.clone())
    codebook = kmeans(points, 4, iters=1)
    farthest = nearest(points, far_init[:3] + points.mean(0))[1][:, 0].argmax()
    assert torch.allclose(codebook[3], points[farthest])
    converged = kmeans(points, 4)
    assert torch.isfinite(converged).all() and len(converged.unique(dim=0)) == 4


def test_rejects_bad_shapes_and_k():
    with pytest.raises(ValueError, match=r"k=11 .* N=10"):
        kmeans(torch.randn(10, 2), 11)
    with pytest.raises(ValueError, match="2-D"):
        kmeans(torch.randn(10), 2)


def test_nearest_three_matches_brute_force_cdist():
    gen = torch.Generator().manual_seed(0)
    points, codebook = torch.randn(3000, 4, generator=gen), torch.randn(40, 4, generator=gen)
    indices, sq_dists = nearest(points, codebook, n=3, chunk=700)
    exact = torch.cdist(points.double(), codebook.double()).square()
    assert indices.dtype == torch.long and indices.shape == sq_dists.shape == (3000, 3)
    assert (sq_dists[:, 1:] >= sq_dists[:, :-1]).all()
    assert torch.allclose(sq_dists.double(), exact.sort(dim=1).values[:, :3], rtol=1e-5, atol=1e-5)
    # the indices point at codewords that really are that far (robust to exact ties)
    assert torch.allclose(exact.gather(1, indices), sq_dists.double(), rtol=1e-5, atol=1e-5)


def brute_force_weighted_sq_dists(points: torch.Tensor, codebook: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, k) float64 sum_c w_c (x_c - c_c)^2 from an explicit (N, k, d) difference."""
    diff = points.double()[:, None, :] - codebook.double()[None, :, :]
    return (weights.double()[:, None, :] * diff.square()).sum(2)


def test_per_point_weights_match_sklearn_sample_weight():
    points = gaussian_mixture(components=16, per_component=300, d=4)
    # weights constant over a point's dims are exactly sklearn's sample_weight objective
    sample_weight = 0.1 + torch.rand(len(points), generator=torch.Generator().manual_seed(1)).double() * 10
    weights = sample_weight[:, None].expand_as(points).float()
    # overlapping components leave local optima that either side's single run can land in: best of 4 on both
    codebooks = [kmeans(points, 16, seed=seed, tol=0, weights=weights) for seed in range(4)]
    codebook = min(codebooks, key=lambda codebook: inertia(points, codebook, weights=weights))
    fitted = KMeans(n_clusters=16, n_init=4, random_state=0).fit(points.double().numpy(),
                                                                 sample_weight=sample_weight.numpy())
    exact = brute_force_weighted_sq_dists(points, codebook, weights)
    ours = exact.min(1).values.sum().item()
    assert ours / fitted.inertia_ <= 1.01, f"weighted inertia ratio ours/sklearn = {ours / fitted.inertia_:.4f}"
    assert inertia(points, codebook, weights=weights) == pytest.approx(ours, rel=1e-5)
    labels = nearest(points, codebook, weights=weights)[0][:, 0]
    assert torch.equal(labels, exact.argmin(1))
    # converged (tol=0 runs until no label changes), so every center is the weighted mean of its points
    one_hot = torch.nn.functional.one_hot(labels, 16).double()
    means = (one_hot.T @ (sample_weight[:, None] * points.double())) / (one_hot.T @ sample_weight)[:, None]
    assert torch.allclose(codebook.double(), means, atol=1e-4)


def test_weighted_nearest_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    points, codebook = torch.randn(3000, 4, generator=gen), torch.randn(40, 4, generator=gen)
    weights = torch.rand(3000, 4, generator=gen) * torch.tensor([0.01, 1.0, 10.0, 100.0])
    indices, sq_dists = nearest(points, codebook, n=3, chunk=700, weights=weights)
    exact = brute_force_weighted_sq_dists(points, codebook, weights)
    assert indices.shape == sq_dists.shape == (3000, 3)
    assert torch.equal(indices[:, 0], exact.argmin(1))
    assert torch.allclose(sq_dists.double(), exact.sort(dim=1).values[:, :3], rtol=1e-4, atol=1e-4)
    assert torch.allclose(exact.gather(1, indices), sq_dists.double(), rtol=1e-4, atol=1e-4)
    assert inertia(points, codebook, weights=weights) == pytest.approx(exact.min(1).values.sum().item(), rel=1e-5)


def test_weighting_makes_the_codebook_fit_the_weighted_dimension():
    gen = torch.Generator().manual_seed(0)
    # dimension 0 is wide noise that plain k-means spends its centers on; dimension 1 has 4 tight levels
    levels = torch.arange(4.0).repeat_interleave(500)
    points = torch.stack([100 * torch.randn(2000, generator=gen), levels + 0.02 * torch.randn(2000, generator=gen)], 1)
    weights = torch.tensor([1e-6, 1.0]).expand_as(points)
    weighted, plain = kmeans(points, 4, weights=weights), kmeans(points, 4)
    assert torch.allclose(weighted[:, 1].sort().values, torch.arange(4.0), atol=0.01)
    fit, unfit = inertia(points, weighted, weights=weights), inertia(points, plain, weights=weights)
    assert fit < 0.01 * unfit, f"weighted inertia {fit:.3g} vs the unweighted codebook's {unfit:.3g}"


def test_all_ones_weights_give_the_unweighted_codebook():
    points = weight_subvectors(4)[:4000]
    codebook = kmeans(points, 32, seed=3, weights=torch.ones_like(points))
    assert torch.allclose(codebook, kmeans(points, 32, seed=3), atol=1e-6)


def test_weighted_codebook_is_seeded_and_chunk_independent():
    points = weight_subvectors(2)[:10000]
    weights = torch.rand(points.shape, generator=torch.Generator().manual_seed(0))
    codebook = kmeans(points, 64, chunk=1000, weights=weights)
    assert torch.equal(codebook, kmeans(points, 64, chunk=1 << 20, weights=weights))
    assert not torch.equal(codebook, kmeans(points, 64, chunk=1000, seed=1, weights=weights))


def test_subsets_keep_each_point_with_its_weights():
    gen = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    clusters = means.repeat_interleave(500, 0) + 0.1 * torch.randn(2000, 2, generator=gen)
    outliers = 50 + 10 * torch.randn(200, 2, generator=gen)  # weight 0: they must not move any center
    points = torch.cat([clusters, outliers])[torch.randperm(2200, generator=gen)]
    weights = (points.abs().max(1).values < 20).float()[:, None].expand_as(points)
    codebook = kmeans(points, 4, max_points=1500, init_points=500, weights=weights)
    assert torch.allclose(codebook[codebook.sum(1).argsort()][[0, 3]], means[[0, 3]], atol=0.05)
    assert torch.allclose(codebook.sort(0).values, means.sort(0).values, atol=0.05)


@pytest.mark.parametrize("weights,match", [
    (torch.ones(10, 3), r"shape \(10, 2\), got \(10, 3\)"),
    (torch.full((10, 2), -1.0), "non-negative, got -1.0"),
    (torch.full((10, 2), float("nan")), "finite, got nan"),
    (torch.full((10, 2), float("inf")), "finite, got inf"),
])
def test_rejects_bad_weights(weights, match):
    points = torch.randn(10, 2)
    with pytest.raises(ValueError, match=match):
        kmeans(points, 2, weights=weights)
    with pytest.raises(ValueError, match=match):
        nearest(points, points[:2], weights=weights)
