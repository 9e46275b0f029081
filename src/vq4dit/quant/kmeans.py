"""Seeded, chunked k-means for VQ codebooks: greedy k-means++ initialisation, then Lloyd iterations.

Layers hold millions of low-dimensional sub-vectors (d = 2..8) and codebooks have up to 4096 codewords, so every
point-to-center distance matrix is built `chunk` rows at a time (about chunk * k * 4 bytes) on the points'
device. Random draws come from a CPU generator, so a seed gives the same draws on any device; cluster sums are
accumulated in float64 with ops that add in point order, so the codebook does not depend on the chunk size.
"""

import math

import torch


def kmeans(points: torch.Tensor, k: int, iters: int = 100, seed: int = 0, chunk: int = 8192,
           tol: float = 1e-4, init_points: int = 64 * 1024, max_points: int | None = None) -> torch.Tensor:
    """A float32 (k, d) codebook for `points` (N, d), on the points' device.

    The k-means++ seeding runs on a seeded subset of at most `init_points` points (its k sequential passes
    dominate the cost on large layers). Lloyd uses every point, or a seeded subset of `max_points` (as faiss
    caps points per centroid). It stops early once no assignment changes or once the inertia falls by less than
    tol times its previous value. Cache-sized chunks are about twice as fast on CPU as large ones.
    """
    _check_points(points)
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of points N={n}")
    # centring keeps the |x|^2 - 2 x.c + |c|^2 distance expansion accurate in float32
    x = points.float()
    mean = x.mean(0)
    x = x - mean
    gen = torch.Generator().manual_seed(seed)
    if max_points is not None and n > max(max_points, k):
        x = x[torch.randperm(n, generator=gen)[: max(max_points, k)].to(x.device)]
        n = len(x)
    seeding = x
    if n > max(init_points, k):
        seeding = x[torch.randperm(n, generator=gen)[: max(init_points, k)].to(x.device)]
    centers = _greedy_kmeanspp(seeding, k, gen, chunk)
    labels, previous_total = None, math.inf
    for _ in range(iters):
        idx, sq_dist = nearest(x, centers, 1, chunk)
        new_labels, sq_dist = idx[:, 0], sq_dist[:, 0]
        if labels is not None and torch.equal(new_labels, labels):
            break  # the centers are already the means of this assignment
        labels = new_labels
        total = sq_dist.sum(dtype=torch.float64).item()
        if tol > 0 and previous_total - total < tol * previous_total:
            break
        previous_total = total
        counts = torch.bincount(labels, minlength=k)
        centers = (_cluster_sums(x, labels, k, chunk) / counts[:, None]).float()
        empty = (counts == 0).nonzero()[:, 0]
        if len(empty):
            # re-seed at the worst-served points: away from every center, where a new center cuts the inertia most
            centers[empty] = x[sq_dist.topk(len(empty)).indices]
    return centers + mean


def nearest(points: torch.Tensor, codebook: torch.Tensor, n: int = 1,
            chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """The n nearest codewords of each point, nearest first: (Long indices (N, n), float32 squared distances)."""
    _check_points(points)
    k, d = codebook.shape
    if points.shape[1] != d:
        raise ValueError(f"points have d={points.shape[1]} but the codebook has d={d}")
    if not 1 <= n <= k:
        raise ValueError(f"n={n} must be between 1 and the codebook size k={k}")
    codebook = codebook.to(points.device, torch.float32)
    # distances are shift-invariant; moving the codewords to the origin keeps the float32 expansion accurate
    shift = codebook.mean(0)
    codebook = codebook - shift
    codebook_sq = codebook.square().sum(1)
    indices = torch.empty(len(points), n, dtype=torch.long, device=points.device)
    sq_dists = torch.empty(len(points), n, dtype=torch.float32, device=points.device)
    for rows in _chunks(len(points), chunk):
        x = points[rows].float() - shift
        # |c|^2 - 2 x.c ranks the codewords like the distance does; |x|^2 is added to the n winners only
        partial = torch.addmm(codebook_sq, x, codebook.T, alpha=-2)
        best, indices[rows] = partial.min(1, keepdim=True) if n == 1 else partial.topk(n, dim=1, largest=False)
        sq_dists[rows] = best.add_(x.square().sum(1, keepdim=True)).clamp_(min=0)
    return indices, sq_dists


def inertia(points: torch.Tensor, codebook: torch.Tensor, chunk: int = 8192) -> float:
    """Sum of squared distances from each point to its nearest codeword (the k-means objective)."""
    return nearest(points, codebook, 1, chunk)[1].sum(dtype=torch.float64).item()


def _greedy_kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator, chunk: int) -> torch.Tensor:
    """k-means++ that draws 2 + log(k) candidates per step (proportional to D(x)^2) and keeps the one that
    lowers the potential most, as scikit-learn does: it avoids the poor seeds plain k-means++ sometimes picks."""
    n, trials = len(x), 2 + int(math.log(k))
    centers = x.new_empty(k, x.shape[1])
    centers[0] = x[torch.randint(n, (1,), generator=gen).item()]
    closest = _sq_dists_to(x, centers[0], chunk)
    for i in range(1, k):
        cumulative = closest.cumsum(0, dtype=torch.float64)
        draws = torch.rand(trials, generator=gen, dtype=torch.float64).to(x.device) * cumulative[-1]
        # right=True never lands on a point already chosen (its D(x)^2 = 0 adds nothing to the cumsum)
        candidates = torch.searchsorted(cumulative, draws, right=True).clamp_(max=n - 1)
        points, points_sq = x[candidates], x[candidates].square().sum(1)
        potentials = torch.zeros(trials, dtype=torch.float64, device=x.device)
        for rows in _chunks(n, chunk):
            dist = _sq_dists(x[rows], points, points_sq)
            potentials += torch.minimum(dist, closest[rows, None]).sum(0, dtype=torch.float64)
        centers[i] = x[candidates[potentials.argmin()]]
        # recomputing the winner's distances costs one more pass but never holds trials x N distances
        closest = torch.minimum(closest, _sq_dists_to(x, centers[i], chunk))
    return centers


def _cluster_sums(x: torch.Tensor, labels: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Float64 (k, d) sums of the points of each cluster: float32 would lose digits over millions of points."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    for rows in _chunks(len(x), chunk):
        # each op adds the rows in point order on its device (CUDA's index_add_ uses atomics, CPU's index_put_
        # splits the work over threads), so the sums are reproducible and independent of the chunk size
        if x.is_cuda:
            sums.index_put_((labels[rows],), x[rows].double(), accumulate=True)
        else:
            sums.index_add_(0, labels[rows], x[rows].double())
    return sums


def _sq_dists_to(x: torch.Tensor, center: torch.Tensor, chunk: int) -> torch.Tensor:
    """(N,) squared distances from every point to one center."""
    center = center[None]
    center_sq = center.square().sum(1)
    return torch.cat([_sq_dists(x[rows], center, center_sq)[:, 0] for rows in _chunks(len(x), chunk)])


def _sq_dists(x: torch.Tensor, centers: torch.Tensor, centers_sq: torch.Tensor) -> torch.Tensor:
    """(rows, k) squared distances via |x|^2 - 2 x.c + |c|^2: one matmul instead of a (rows, k, d) difference."""
    dist = torch.addmm(x.square().sum(1, keepdim=True), x, centers.T, alpha=-2).add_(centers_sq)
    return dist.clamp_(min=0)  # rounding can push a zero distance slightly below 0


def _chunks(n: int, chunk: int):
    """Row slices of at most `chunk` rows covering range(n)."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be at least 1")
    return (slice(start, start + chunk) for start in range(0, n, chunk))


def _check_points(points: torch.Tensor) -> None:
    if points.dim() != 2:
        raise ValueError(f"points must be 2-D (N, d), got shape {tuple(points.shape)}")
