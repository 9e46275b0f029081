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
    monkeypatch.setattr(kmeans_module, "_greedy_kmeanspp", lambda x, k, gen, chunk: far_init.clone())
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
