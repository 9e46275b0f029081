"""Which differences between rows of the comparison are real: a paired bootstrap over the eval samples.

Every row is sampled from the same eval noise with the same labels, so sample i of one row and sample i of another
start from the same noise and ask for the same digit. A resample draws n sample indices with replacement and takes
the same indices in every row: the spread of a difference over resamples is the eval noise of that difference,
which is far smaller than either row's own eval sd when two rows make similar images. Per resample and run: FID of
the resampled features against the fixed real side, class accuracy of the resampled verdicts, PSNR against the fp
model's samples from the resampled squared errors (10 log10(4 / their mean): the table's PSNR on the full set). A
row with several calibration seeds takes the mean over its runs, as the table does. A difference's 95 % interval is
the 2.5th to 97.5th percentile of its resampled values; it is marked real when the interval excludes 0. The interval
covers the eval noise only: the spread over calibration seeds is the table's ± and is not in it.
"""

import torch

METRICS = ("fid", "class_accuracy", "psnr_vs_reference")


def resamples(n: int, reps: int, seed: int = 0) -> torch.Tensor:
    """(reps, n) sample indices drawn with replacement; one draw serves every row (the pairing)."""
    return torch.randint(n, (reps, n), generator=torch.Generator().manual_seed(seed))


class RealSide:
    """FID's real side, fixed across resamples: the mean and covariance of the real images' features (unbiased, as
    torchmetrics), and the covariance's symmetric square root."""

    def __init__(self, features: torch.Tensor):
        f = features.detach().double().cpu()
        self.mu = f.mean(0)
        sigma = torch.cov(f.T)
        values, vectors = torch.linalg.eigh(sigma)
        self.root = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
        self.trace = sigma.trace()


def frechet(features: torch.Tensor, real: RealSide, indices: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """FID of each resample `features[indices[r]]` against `real` (float64, one value per row of `indices`).
    tr sqrt(S_real S) = tr sqrt(R S R) with R = S_real^(1/2), whose eigenvalues a symmetric solver finds."""
    f = features.detach().double().cpu()
    out = []
    for part in indices.split(chunk):
        x = f[part]                                              # (resamples, n, features)
        mu = x.mean(1)
        centred = x - mu[:, None]
        sigma = centred.transpose(1, 2) @ centred / (x.shape[1] - 1)
        roots = torch.linalg.eigvalsh(real.root @ sigma @ real.root).clamp(min=0).sqrt().sum(1)
        out.append((mu - real.mu).square().sum(1) + real.trace + sigma.diagonal(dim1=1, dim2=2).sum(1) - 2 * roots)
    return torch.cat(out)


def run_statistics(run: dict[str, torch.Tensor], real: RealSide, indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """One run's FID, class accuracy and PSNR vs fp (those its per-sample data hold) on every resample."""
    out = {"fid": frechet(run["features"], real, indices)}
    if "correct" in run:
        out["class_accuracy"] = run["correct"].double()[indices].mean(1)
    if "squared_error" in run:
        out["psnr_vs_reference"] = 10 * torch.log10(4 / run["squared_error"].double()[indices].mean(1))
    return out


def check_paired(runs: list[dict[str, torch.Tensor]]) -> None:
    """Runs are compared sample by sample only if they were scored on the same labels (same eval noise)."""
    for run in runs[1:]:
        if not torch.equal(run["labels"], runs[0]["labels"]):
            raise ValueError("runs scored on different labels are not paired: make them with the same evaluation")


def row_statistics(per_run: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A row's statistics on every resample from its runs' (`run_statistics`): the mean over its calibration
    seeds, as the table's value."""
    return {key: torch.stack([s[key] for s in per_run]).mean(0) for key in per_run[0]
            if all(key in s for s in per_run)}


def differences(above: dict[str, torch.Tensor], below: dict[str, torch.Tensor], level: float = 0.95
                ) -> dict[str, tuple[float, float]]:
    """below - above: per metric both rows have (finite), the `level` percentile interval of the resampled
    differences."""
    out = {}
    for key in METRICS:
        if key in above and key in below:
            diff = below[key] - above[key]
            if bool(torch.isfinite(diff).all()):
                q = torch.quantile(diff, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=diff.dtype))
                out[key] = (q[0].item(), q[1].item())
    return out


def excludes_zero(interval: tuple[float, float]) -> bool:
    low, high = interval
    return low > 0 or high < 0
