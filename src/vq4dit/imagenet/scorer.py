"""The ImageNet protocol of the DiT and quantization papers (the ADM evaluator's): FID and sFID against the
reference batch's stored statistics, Inception Score, and precision/recall (k = 3) against its images.

Samples stream through: each batch is rounded to 8 bits exactly as it is written to `samples.npz`, its features
update the Fréchet sums and the score, and only its pool features are kept (for precision/recall: 50k x 2048
float32 = 400 MB). The reference batch's pool features come from a `ReferenceCache` (computed there once per
content key: the file's bytes, the network, the batch size, the device). No class accuracy: Inception's 1008
outputs are not the DiT's ImageNet class ids.
"""

import torch
from torch import nn

from vq4dit.artifacts import to_uint8
from vq4dit.errors import UserError
from vq4dit.imagenet.adm_npz import ReferenceBatch, read_reference_batch
from vq4dit.imagenet.frechet import FrechetDistanceToStatistics
from vq4dit.imagenet.inception import load_inception
from vq4dit.imagenet.inception_score import InceptionScore
from vq4dit.imagenet.precision_recall import precision_recall
from vq4dit.reference_cache import ReferenceCache, extraction_key, file_digest


class ImageNetScorer:
    def __init__(self, features: nn.Module, reference: ReferenceBatch, sample_counts: list[int] | None = None,
                 split_size: int = 5000, neighbours: int = 3, batch_size: int = 250, device: str = "cpu",
                 cache: ReferenceCache | None = None):
        self.device = torch.device(device)
        self.cache = cache if cache is not None else ReferenceCache(None)
        self.features, self.reference = features.to(self.device).eval(), reference
        self.sample_counts, self.neighbours, self.batch_size = sample_counts, neighbours, batch_size
        self.fid = FrechetDistanceToStatistics(reference.mu, reference.sigma, self.device)
        self.sfid = FrechetDistanceToStatistics(reference.mu_s, reference.sigma_s, self.device)
        self.inception_score = InceptionScore(split_size)
        self.pool: list[torch.Tensor] = []

    def check(self, num_samples: int, image_shape: tuple[int, int, int]) -> None:
        """Everything that can be wrong with this run, before any sampling."""
        where = f"metric.reference={self.reference.path}"
        if self.sample_counts is not None and num_samples not in self.sample_counts:
            raise UserError(f"num_samples={num_samples}: the protocol scores "
                            f"{' or '.join(map(str, self.sample_counts))} "
                            "samples (FIDs of other counts are not comparable); metric.sample_counts=null allows any")
        if num_samples <= self.neighbours:
            raise UserError(f"num_samples={num_samples}: precision/recall needs more than {self.neighbours} samples")
        channels, height, width = image_shape
        if (height, width, channels) != self.reference.images_shape[1:]:
            raise UserError(f"{where} holds {self.reference.images_shape[1]} x {self.reference.images_shape[2]} "
                            f"images, this model makes {height} x {width} x {channels}: use the reference batch "
                            f"of the model's resolution (e.g. VIRTUAL_imagenet{height}_labeled.npz)")
        with torch.no_grad():
            probe = self.features(torch.zeros(1, channels, height, width, dtype=torch.uint8, device=self.device))
        for name, stats, got in (("mu", self.fid, probe.pool), ("mu_s", self.sfid, probe.spatial)):
            if got.shape[1] != stats.num_features:
                raise UserError(f"{where}: {name} has {stats.num_features} values, the feature network gives "
                                f"{got.shape[1]}")

    @torch.no_grad()
    def update(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """images in [-1, 1], N x 3 x H x W, any device."""
        pixels = to_uint8(images.to(self.device))
        for start in range(0, len(pixels), self.batch_size):
            features = self.features(pixels[start:start + self.batch_size])
            self.fid.update(features.pool)
            self.sfid.update(features.spatial)
            self.inception_score.update(features.logits)
            self.pool.append(features.pool)

    @torch.no_grad()
    def compute(self, seed: int = 0) -> dict:
        """The protocol's numbers (deterministic: `seed` is not used)."""
        samples = torch.cat(self.pool)
        reference = self._reference_pool()
        precision, recall = precision_recall(reference, samples, self.neighbours)
        return {"fid": self.fid.compute(), "sfid": self.sfid.compute(),
                "inception_score": self.inception_score.compute(),
                "precision": precision, "recall": recall, "num_samples": len(samples),
                "num_reference": len(reference)}

    def _reference_pool(self) -> torch.Tensor:
        """The reference images' pool features, on the scorer's device."""
        pool = self.cache.features("imagenet-reference-pool", self._reference_key,
                                   lambda: {"pool": self._embed_reference()})
        return pool["pool"].to(self.device)

    def _reference_key(self) -> dict:
        """What determines the reference features: the file's bytes (not its path) and how they are embedded."""
        return {"images": file_digest(self.reference.path),
                **extraction_key(self.features, self.batch_size, self.device, [ImageNetScorer._embed_reference])}

    @torch.no_grad()
    def _embed_reference(self) -> torch.Tensor:
        pool = []
        with self.reference.images() as images:
            for batch in images.batches(self.batch_size):
                pixels = torch.from_numpy(batch.copy()).to(self.device).permute(0, 3, 1, 2)
                pool.append(self.features(pixels).pool)
        return torch.cat(pool)


def imagenet_scorer(inception_weights: str, reference: str, sample_counts: list[int] | None = (10000, 50000),
                    split_size: int = 5000, neighbours: int = 3, batch_size: int = 250, device: str = "cpu",
                    feature_network: nn.Module | None = None, cache: ReferenceCache | None = None) -> ImageNetScorer:
    """`feature_network`: None for the Inception from `inception_weights`, or another network with the same
    outputs (in the config, a `_target_` node: the tests' small stand-in)."""
    batch = read_reference_batch(reference)
    features = load_inception(inception_weights) if feature_network is None else feature_network
    counts = None if sample_counts is None else [int(n) for n in sample_counts]
    return ImageNetScorer(features, batch, counts, split_size, neighbours, batch_size, device, cache)
