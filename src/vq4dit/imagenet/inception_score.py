"""Inception Score as the ADM evaluator computes it, streamed.

The samples are cut, in their order, into consecutive splits of `split_size` (5000: 2 splits at 10k samples, 10 at
50k); per split, exp of the mean KL divergence between each sample's class distribution p (softmax of the
logits) and the split's mean p̄; the score is the mean over splits. torchmetrics' `InceptionScore` shuffles the
samples into a fixed number of splits instead, so its number is not the papers' (it depends on the shuffle).
A split only needs sum(p log p) and sum(p): mean KL = sum(p log p) / n - sum(p̄ log p̄).
"""

import math

import torch


class InceptionScore:
    def __init__(self, split_size: int = 5000):
        self.split_size = split_size
        self.split_scores: list[float] = []
        self._plogp, self._p, self._n = 0.0, None, 0

    def update(self, logits: torch.Tensor) -> None:
        probs = torch.softmax(logits.double(), dim=1)
        while len(probs):
            take = probs[: self.split_size - self._n]
            probs = probs[len(take):]
            self._plogp += torch.special.xlogy(take, take).sum().item()
            self._p = take.sum(0) if self._p is None else self._p + take.sum(0)
            self._n += len(take)
            if self._n == self.split_size:
                self._close_split()

    def compute(self) -> float:
        scores = self.split_scores + ([self._split_score()] if self._n else [])
        return sum(scores) / len(scores)

    def _split_score(self) -> float:
        mean = self._p / self._n
        return math.exp(self._plogp / self._n - torch.special.xlogy(mean, mean).sum().item())

    def _close_split(self) -> None:
        self.split_scores.append(self._split_score())
        self._plogp, self._p, self._n = 0.0, None, 0
