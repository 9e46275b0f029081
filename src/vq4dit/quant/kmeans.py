"""Seeded, chunked k-means for VQ codebooks: greedy k-means++ initialisation, then Lloyd iterations.

Layers hold millions of low-dimensional sub-vectors (d = 2..8) and codebooks have up to 4096 codewords, so every
point-to-center distance matrix is built `chunk` rows at a time (about chunk * k * 4 bytes) on the points'
device. Random draws come from a CPU generator, so a seed gives the same draws on any device; cluster sums are
accumulated in float64 with ops that add in point order, so the codebook does not depend on the chunk size.
Optional per-point, per-dimension weights w (N, d) make every distance sum_c w_c (x_c - c_c)^2, for data-aware
codebooks (GPTVQ-style: each dimension weighted by its input channel's E[x^2], so the error is the output's).
"""

import math

import torch


def kmeans(points: torch.Tensor, k: int, iters: int = 100, seed: int = 0, chunk: int = 8192,
           tol: float = 1e-4, init_points: int = 64 * 1024, max_points: int | None = None,
           weights: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 (k, d) codebook for `points` (N, d), on the points' device.

    With `weights` (N, d, non-negative) it minimises sum_i sum_c w_ic (x_ic - mu_a(i),c)^2: points go to the
    nearest center by that distance and each center coordinate is the w-weighted mean of its cluster (the plain
    mean where the cluster's weights in that dimension sum to 0, as any value serves there).

    The k-means++ seeding runs on a seeded subset of at most `init_points` points (its k sequential passes
    dominate the cost on large layers). Lloyd uses every point, or a seeded subset of `max_points` (as faiss
    caps points per centroid). It stops early once no assignment changes or once the inertia falls by less than
    tol times its previous value. Cache-sized chunks are about twice as fast on CPU as large ones.
    """
    _check_points(points)
    w = _check_weights(weights, points)
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of points N={n}")
    # centring keeps the |x|^2 - 2 x.c + |c|^2 distance expansion accurate in float32
    x = points.float()
    mean = x.mean(0)
    x = x - mean
    gen = torch.Generator().manual_seed(seed)
    if max_points is not None and n > max(max_points, k):
        subset = torch.randperm(n, generator=gen)[: max(max_points, k)].to(x.device)
        x, w = x[subset], None if w is None else w[subset]
        n = len(x)
    seeding, seeding_w = x, w
    if n > max(init_points, k):
        subset = torch.randperm(n, generator=gen)[: max(init_points, k)].to(x.device)
        seeding, seeding_w = x[subset], None if w is None else w[subset]
    centers = _greedy_kmeanspp(seeding, k, gen, chunk, seeding_w)
    labels, previous_total = None, math.inf
    for _ in range(iters):
        idx, sq_dist = nearest(x, centers, 1, chunk, w)
        new_labels, sq_dist = idx[:, 0], sq_dist[:, 0]
        if labels is not None and torch.equal(new_labels, labels):
            break  # the centers are already the means of this assignment
        labels = new_labels
        total = sq_dist.sum(dtype=torch.float64).item()
        if tol > 0 and previous_total - total < tol * previous_total:
            break
        previous_total = total
        counts = torch.bincount(labels, minlength=k)
        if w is None:
            centers = (_cluster_sums(x, labels, k, chunk) / counts[:, None]).float()
        else:
            plain, weighted, weight_sums = _cluster_sums(x, labels, k, chunk, w).chunk(3, dim=1)
            centers = torch.where(weight_sums > 0, weighted / weight_sums, plain / counts[:, None]).float()
        empty = (counts == 0).nonzero()[:, 0]
        if len(empty):
            # re-seed at the worst-served points: away from every center, where a new center cuts the inertia most
            centers[empty] = x[sq_dist.topk(len(empty)).indices]
    return centers + mean


def nearest(points: torch.Tensor, codebook: torch.Tensor, n: int = 1, chunk: int = 8192,
            weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The n nearest codewords of each point, nearest first: (Long indices (N, n), float32 squared distances).

    With `weights` (N, d) the distances are the weighted sum_c w_c (x_c - c_c)^2.
    """
    _check_points(points)
    w = _check_weights(weights, points)
    k, d = codebook.shape
    if points.shape[1] != d:
        raise ValueError(f"points have d={points.shape[1]} but the codebook has d={d}")
    if not 1 <= n <= k:
        raise ValueError(f"n={n} must be between 1 and the codebook size k={k}")
    codebook = codebook.to(points.device, torch.float32)
    # distances are shift-invariant; moving the codewords to the origin keeps the float32 expansion accurate
    shift = codebook.mean(0)
    codebook = codebook - shift
    codebook_terms = _center_terms(codebook, w is not None)
    indices = torch.empty(len(points), n, dtype=torch.long, device=points.device)
    sq_dists = torch.empty(len(points), n, dtype=torch.float32, device=points.device)
    for rows in _chunks(len(points), chunk):
        x = points[rows].float() - shift
        # |c|^2 - 2 x.c ranks the codewords like the distance does; |x|^2 is added to the n winners only
        if w is None:
            partial, x_sq = torch.addmm(codebook_terms, x, codebook.T, alpha=-2), x.square().sum(1, keepdim=True)
        else:
            partial, x_sq = _weighted_cross_terms(x, w[rows], codebook_terms), _weighted_sq_norms(x, w[rows])
        best, indices[rows] = partial.min(1, keepdim=True) if n == 1 else partial.topk(n, dim=1, largest=False)
        sq_dists[rows] = best.add_(x_sq).clamp_(min=0)
    return indices, sq_dists


def inertia(points: torch.Tensor, codebook: torch.Tensor, chunk: int = 8192,
            weights: torch.Tensor | None = None) -> float:
    """Sum of (weighted) squared distances from each point to its nearest codeword (the k-means objective)."""
    return nearest(points, codebook, 1, chunk, weights)[1].sum(dtype=torch.float64).item()


def _greedy_kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator, chunk: int,
                     w: torch.Tensor | None = None) -> torch.Tensor:
    """k-means++ that draws 2 + log(k) candidates per step (proportional to D(x)^2) and keeps the one that
    lowers the potential most, as scikit-learn does: it avoids the poor seeds plain k-means++ sometimes picks.
    With weights w, D(x)^2 is the weighted distance and the first center is drawn among points of nonzero weight."""
    n, trials = len(x), 2 + int(math.log(k))
    centers = x.new_empty(k, x.shape[1])
    if w is None:
        centers[0] = x[torch.randint(n, (1,), generator=gen).item()]
    else:
        # a uniform draw over the weighted points: all-ones weights then seed exactly as no weights do
        weighted = (w.sum(1) > 0).nonzero()[:, 0]
        weighted = weighted if len(weighted) else torch.arange(n, device=x.device)
        centers[0] = x[weighted[torch.randint(len(weighted), (1,), generator=gen).item()]]
    closest = _sq_dists_to(x, centers[0], chunk, w)
    for i in range(1, k):
        cumulative = closest.cumsum(0, dtype=torch.float64)
        draws = torch.rand(trials, generator=gen, dtype=torch.float64).to(x.device) * cumulative[-1]
        # right=True never lands on a point already chosen (its D(x)^2 = 0 adds nothing to the cumsum)
        candidates = torch.searchsorted(cumulative, draws, right=True).clamp_(max=n - 1)
        points = x[candidates]
        points_terms = _center_terms(points, w is not None)
        potentials = torch.zeros(trials, dtype=torch.float64, device=x.device)
        for rows in _chunks(n, chunk):
            dist = _sq_dists(x[rows], points, points_terms, None if w is None else w[rows])
            potentials += torch.minimum(dist, closest[rows, None]).sum(0, dtype=torch.float64)
        centers[i] = x[candidates[potentials.argmin()]]
        # recomputing the winner's distances costs one more pass but never holds trials x N distances
        closest = torch.minimum(closest, _sq_dists_to(x, centers[i], chunk, w))
    return centers


def add_rows(target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """target[index[i]] += rows[i], adding in row order on every device, so sums are reproducible: CUDA's
    index_add_ adds with atomics in no fixed order, its index_put_(accumulate=True) does not; on a CPU index_put_
    splits the work over threads and index_add_ does not."""
    if target.is_cuda:
        return target.index_put_((index,), rows, accumulate=True)
    return target.index_add_(0, index, rows)


def _cluster_sums(x: torch.Tensor, labels: torch.Tensor, k: int, chunk: int,
                  w: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 (k, d) sums of the points of each cluster: float32 would lose digits over millions of points.
    With weights w, (k, 3d): the sums of x, of w * x and of w side by side, all in one pass."""
    sums = torch.zeros(k, x.shape[1] * (1 if w is None else 3), dtype=torch.float64, device=x.device)
    for rows in _chunks(len(x), chunk):
        values = x[rows].double()
        if w is not None:
            weights = w[rows].double()
            values = torch.cat([values, weights * values, weights], 1)
        add_rows(sums, labels[rows], values)
    return sums


def _sq_dists_to(x: torch.Tensor, center: torch.Tensor, chunk: int, w: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) (weighted) squared distances from every point to one center."""
    center = center[None]
    center_terms = _center_terms(center, w is not None)
    return torch.cat([_sq_dists(x[rows], center, center_terms, None if w is None else w[rows])[:, 0]
                      for rows in _chunks(len(x), chunk)])


def _sq_dists(x: torch.Tensor, centers: torch.Tensor, center_terms: torch.Tensor,
              w: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, k) squared distances via |x|^2 - 2 x.c + |c|^2: one matmul instead of a (rows, k, d) difference.
    With weights w, sum_c w_c (x_c - c_c)^2 likewise; `center_terms` comes from _center_terms."""
    if w is None:
        dist = torch.addmm(x.square().sum(1, keepdim=True), x, centers.T, alpha=-2).add_(center_terms)
    else:
        dist = _weighted_cross_terms(x, w, center_terms).add_(_weighted_sq_norms(x, w))
    return dist.clamp_(min=0)  # rounding can push a zero distance slightly below 0


def _center_terms(centers: torch.Tensor, weighted: bool) -> torch.Tensor:
    """What the distance expansion needs of the centers, computed once: |c|^2 (k,), or [-2c, c^2] (k, 2d)."""
    if not weighted:
        return centers.square().sum(1)
    return torch.cat([-2 * centers, centers.square()], 1)


def _weighted_cross_terms(x: torch.Tensor, w: torch.Tensor, center_terms: torch.Tensor) -> torch.Tensor:
    """(rows, k) -2 (w x).c + w.c^2, the center-dependent part of sum_c w_c (x_c - c_c)^2, as one matmul:
    the weights differ per point, so w.c^2 is a matmul too rather than one vector added to every row."""
    return torch.cat([w * x, w], 1) @ center_terms.T


def _weighted_sq_norms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(rows, 1) w.x^2, the part of the weighted distance that does not depend on the center."""
    return (w * x.square()).sum(1, keepdim=True)


def _chunks(n: int, chunk: int):
    """Row slices of at most `chunk` rows covering range(n)."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be at least 1")
    return (slice(start, start + chunk) for start in range(0, n, chunk))


def _check_points(points: torch.Tensor) -> None:
    if points.dim() != 2:
        raise ValueError(f"points must be 2-D (N, d), got shape {tuple(points.shape)}")


def _check_weights(weights: torch.Tensor | None, points: torch.Tensor) -> torch.Tensor | None:
    """The weights as float32 on the points' device, or None; ValueError unless finite, >= 0 and shaped like points."""
    if weights is None:
        return None
    if weights.shape != points.shape:
        raise ValueError(f"weights must have the points' shape {tuple(points.shape)}, got {tuple(weights.shape)}")
    w = weights.to(points.device, torch.float32)
    bad = (~torch.isfinite(w)).nonzero()
    if len(bad):
        raise ValueError(f"weights must be finite, got {w[tuple(bad[0])].item()} at {tuple(bad[0].tolist())}")
    bad = (w < 0).nonzero()
    if len(bad):
        raise ValueError(f"weights must be non-negative, got {w[tuple(bad[0])].item()} at {tuple(bad[0].tolist())}")
    return w
