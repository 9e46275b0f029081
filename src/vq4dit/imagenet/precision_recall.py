"""Improved precision and recall (Kynkäänniemi et al. 2019) as the ADM evaluator computes them, with k = 3.

Each feature set spans a manifold: the union of balls around its points, each ball reaching the point's k-th
nearest other point of the same set. Precision is the fraction of samples inside the reference manifold; recall
the fraction of reference points inside the samples' manifold. Distances are squared Euclidean, in blocks of
`block` rows so that 50k x 50k distances never exist at once; float32 throughout (ADM's uses float16 where finite).
"""

import torch


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)).clamp_min_(0)


def manifold_radii(features: torch.Tensor, k: int = 3, block: int = 4096) -> torch.Tensor:
    """Squared distance of every point to its k-th nearest other point of the same set."""
    if len(features) <= k:
        raise ValueError(f"{len(features)} points have no {k}-th nearest other point")
    radii = []
    for rows in features.split(block):
        distances = torch.cat([squared_distances(rows, cols) for cols in features.split(block)], dim=1)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # k + 1: a point is its own nearest (distance 0)
    return torch.cat(radii)


def precision_recall(reference: torch.Tensor, samples: torch.Tensor, k: int = 3, block: int = 4096
                     ) -> tuple[float, float]:
    reference, samples = reference.float(), samples.to(reference.device, torch.float32)
    reference_radii, sample_radii = manifold_radii(reference, k, block), manifold_radii(samples, k, block)
    sample_inside = torch.zeros(len(samples), dtype=torch.bool, device=samples.device)
    reference_inside = torch.zeros(len(reference), dtype=torch.bool, device=reference.device)
    for r0 in range(0, len(reference), block):
        for s0 in range(0, len(samples), block):
            d = squared_distances(reference[r0:r0 + block], samples[s0:s0 + block])  # reference rows x sample cols
            sample_inside[s0:s0 + block] |= (d <= reference_radii[r0:r0 + block, None]).any(0)
            reference_inside[r0:r0 + block] |= (d <= sample_radii[None, s0:s0 + block]).any(1)
    return sample_inside.double().mean().item(), reference_inside.double().mean().item()
