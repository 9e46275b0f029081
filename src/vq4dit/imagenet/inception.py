"""The ADM evaluator's feature network: Inception-v3 of the 2015 TensorFlow graph, as ported by torch-fidelity.

One forward pass of uint8 images gives the three feature sets of the protocol:
- `pool`: pool_3, 2048-d (FID, precision/recall);
- `spatial`: the first 7 channels of mixed_6/conv, the TF graph's name for torch-fidelity's `Mixed_6d.branch1x1`
  (17 x 17 at Inception's 299 px input), flattened in TF's height, width, channel order: 2023-d (sFID);
- `logits`: pool_3 times the classifier's weights, no bias (`logits_unbiased`), 1008 classes (Inception Score).
Images are resized to 299 px by torch-fidelity's TF-compatible bilinear resize (no antialiasing), as in ADM.
"""

import contextlib
import os
import pickle
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from vq4dit.errors import UserError

SPATIAL_LAYER = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7
WEIGHTS_HINT = "torch-fidelity's weights-inception-2015-12-05-6726825d.pth"


class Features(NamedTuple):
    pool: torch.Tensor
    spatial: torch.Tensor
    logits: torch.Tensor


class InceptionFeatures(nn.Module):
    """Wraps a network shaped like torch-fidelity's `FeatureExtractorInceptionV3` (forward: uint8 images ->
    (pool, logits); a `Mixed_6d.branch1x1` submodule) and adds the spatial features from that submodule."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network.eval().requires_grad_(False)
        self._spatial: list[torch.Tensor] = []
        network.get_submodule(SPATIAL_LAYER).register_forward_hook(lambda _m, _i, out: self._spatial.append(out))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Features:
        """uint8 images N x 3 x H x W -> Features, float32 on the images' device."""
        self._spatial.clear()
        pool, logits = self.network(images)
        spatial = self._spatial.pop()[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # N x H x W x C order
        return Features(pool.float(), spatial.float(), logits.float())


def load_inception(weights: str | Path) -> InceptionFeatures:
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"metric.inception_weights={path} not found; give the local path of {WEIGHTS_HINT}")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise UserError("metric=imagenet needs the optional extra: pip install -e '.[inception]' (torch-fidelity, "
                        "with a torchvision matching your torch: GPU machines)") from None
    try:
        with _tensors_only_unpickling():
            network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                  feature_extractor_weights_path=str(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"metric.inception_weights={path} is not {WEIGHTS_HINT} ({reason})") from None
    return InceptionFeatures(network)


@contextlib.contextmanager
def _tensors_only_unpickling():
    """torch-fidelity unpickles the weights file with weights_only switched off; torch's environment switch turns
    it back on for that call, so the file can hold nothing but tensors."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before
