"""Calibration and evaluation draw from streams that never coincide, and held-out pool rows are never trained on."""

import torch

from vq4dit.calibration.zero_data import ZeroDataBlockInputs
from vq4dit.cli.evaluate import sample_and_score
from vq4dit.cli.quantize import quantize
from vq4dit.errors import instantiate
from vq4dit.quant.checkpoint import load_quantized
from vq4dit.sampling import Sampler
from vq4dit.seeds import stream_seed

FAST = ["model=dit_tiny", "method=kmeans", "quant.k=16", "quant.d=2", "pool.trajectories=4", "pool.size=24",
        "pool.heldout_trajectories=2", "pool.heldout_size=16", "sampler.steps=4", "log_samples=0"]


def test_streams_differ_by_purpose_and_seed():
    seeds = {stream_seed(s, p) for s in range(50) for p in ("eval", "calibration", "calibration-heldout")}
    assert len(seeds) == 150 and all(0 <= s < 2**63 for s in seeds)
    assert stream_seed(0, "eval") == stream_seed(0, "eval")


def test_evaluation_never_starts_from_calibration_noise(compose_cfg, monkeypatch, tmp_path):
    """Same seed=0 for train and eval: the initial noise of every eval sample differs from every calibration and
    held-out trajectory's."""
    noises = {}
    original = Sampler.batches

    def record(self, model, labels, seed, *args, **kwargs):
        shape = (len(labels), model.in_channels, model.sample_size, model.sample_size)
        on_step = kwargs.get("on_step", args[1] if len(args) > 1 else None)  # set by the calibration pool
        noises.setdefault(on_step is not None, []).append(
            torch.randn(shape, generator=torch.Generator().manual_seed(seed)))  # what the sampler draws
        return original(self, model, labels, seed, *args, **kwargs)

    monkeypatch.setattr(Sampler, "batches", record)
    ckpt = quantize(compose_cfg("train", *FAST, "seed=0"))
    eval_cfg = compose_cfg("eval", "model=dit_tiny", f"ckpt={ckpt}", "num_samples=20", "sampler.steps=2", "seed=0")
    sample_and_score(eval_cfg, load_quantized(ckpt, eval_cfg.model), scorer=_NoScore())
    calibration = torch.cat(noises[True]).flatten(1)   # the pool's two sampling runs (trajectories, held-out)
    evaluation = torch.cat(noises[False]).flatten(1)
    assert len(noises[True]) == 2 and len(calibration) == 6 and len(evaluation) == 20
    assert torch.cdist(evaluation, calibration).min() > 1.0  # no eval sample starts where calibration did


class _NoScore:
    """The tiny model's 4-channel samples are not digits: this test only needs the sampling."""

    def check(self, *args):
        pass

    def update(self, *args):
        pass

    def compute(self, seed=0):
        return {}


def test_heldout_rows_come_from_trajectories_of_their_own(compose_cfg):
    cfg = compose_cfg("train", *FAST)
    model = instantiate(cfg.model)
    pool = ZeroDataBlockInputs(model, instantiate(cfg.sampler), 4, 24, seed=0, heldout_trajectories=2,
                               heldout_size=16, progress=False)
    train, held = pool.hidden[pool.train_rows].flatten(1), pool.hidden[pool.heldout_rows].flatten(1)
    assert len(train) == 24 and len(held) == 16
    assert torch.cdist(held, train).min() > 0  # not one held-out input equals a training input
