"""The shipped reference models do what the README says, and VQ4DiT calibration beats plain k-means on them."""

import copy
from pathlib import Path

import pytest
import torch

from vq4dit.calibration.pipeline import default_trainer, quantize_block
from vq4dit.calibration.zero_data import ZeroDataBlockInputs
from vq4dit.cli.build import build_method
from vq4dit.cli.evaluate import load_model, sample_and_score
from vq4dit.errors import instantiate
from vq4dit.methods import FitSettings
from vq4dit.methods.block_data import BlockData


@pytest.mark.slow
def test_calibration_beats_plain_kmeans_on_a_reference_block(compose_cfg):
    """A real block of the shipped DiT at 2 bits: the hard block that ships is closer to the fp block than
    plain k-means VQ, on held-out rows (trajectories calibration never saw)."""
    cfg = compose_cfg("train", "quant=w2", "sampler.steps=20", "trainer.enable_progress_bar=false")
    model = instantiate(cfg.model)
    pool = ZeroDataBlockInputs(model, instantiate(cfg.sampler), 8, 320, seed=0, heldout_trajectories=4,
                               heldout_size=64, progress=False)
    assert (pool.num_train, len(pool)) == (320, 384)  # 8 trajectories x 20 steps x (labels, null label), + 64
    device = torch.device("cpu")
    hidden = pool.block_outputs(model.blocks[0], device)  # block 1's inputs
    block = model.blocks[1]
    targets = pool.block_outputs(block, device, hidden)
    rows = lambda part: (hidden[part], pool.timesteps[part], pool.labels[part], targets[part])  # noqa: E731
    data = BlockData(copy.deepcopy(block), 1, rows(pool.train_rows), rows(pool.heldout_rows), device, seed=0)
    fit = FitSettings(iterations=100)
    trainer = default_trainer(device, trainer=instantiate(cfg.trainer))
    _, stats = quantize_block(build_method(cfg), data, fit, trainer)
    assert stats["soft_mse"] < stats["start_mse"]
    assert stats["kept"] == "method"
    assert stats["shipped_mse"] < 0.9 * stats["start_mse"]  # 100 iterations here; the full 500 do far better


@pytest.mark.slow
def test_reference_dit_meets_its_quality_target(compose_cfg):
    """The README's numbers for the fp reference: class accuracy >= 0.9 under the default eval protocol."""
    cfg = compose_cfg("eval", f"ckpt={Path(__file__).parents[1] / 'data/dit_digits'}", "num_samples=200")
    _, _, metrics = sample_and_score(cfg, load_model(cfg.model, cfg.ckpt))
    assert metrics["class_accuracy"] >= 0.9
    assert metrics["fid"] < 3 * metrics["fid_floor"]
