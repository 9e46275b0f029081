"""The ImageNet protocol of the ADM evaluator: reference batch and sample files, Inception features, FID, sFID,
Inception Score and precision/recall."""

from vq4dit.imagenet.scorer import ImageNetScorer, imagenet_scorer

__all__ = ["ImageNetScorer", "imagenet_scorer"]
