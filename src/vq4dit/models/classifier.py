"""The digits feature network: a small CNN classifier whose penultimate layer is FID's feature space and whose
logits give the Inception-style score and class-conditional accuracy."""

import torch
from torch import nn


class DigitClassifier(nn.Module):
    """Images in [-1, 1], N x 1 x 16 x 16 -> logits N x 10; `features` gives the 128-d embedding."""

    num_features = 128

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Features(nn.Module):
    """torchmetrics' `feature` module for FID: images in [0, 1] -> N x 128 (`num_features` spares a dummy pass)."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images01.float() * 2 - 1)


class Logits(nn.Module):
    """torchmetrics' `feature` module for the Inception score: images in [0, 1] -> class logits."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.classifier(images01.float() * 2 - 1)
