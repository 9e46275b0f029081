"""The shipped reference models do what the README says, and VQ4DiT calibration beats plain k-means on them."""

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vq4dit.errors import instantiate
from vq4dit.evaluate import load_model, sample_and_score
from vq4dit.quant.zero_data import ZeroDataBlockInputs
from vq4dit.quantize import calibrate_block


def test_calibration_beats_plain_kmeans_on_a_reference_block(compose_cfg):
    """A real block of the shipped DiT at 2 bits: the hard block that ships is closer to the fp block than
    plain k-means VQ, on fixed pool rows."""
    cfg = compose_cfg("train", "quant=w2", "method.iterations=100", "method.pool.trajectories=8",
                      "method.pool.size=320", "method.eval_rows=64", "sampler.steps=20",
                      "trainer.enable_progress_bar=false")
    model = instantiate(cfg.model)
    pool = ZeroDataBlockInputs(model, instantiate(cfg.sampler), 8, 320, seed=0, progress=False)
    assert len(pool) == 320  # 8 trajectories x 20 steps x (labels, null label)
    pool.advance(model.blocks[0])
    block = model.blocks[1]
    targets = pool.block_outputs(block)
    eval_rows = torch.arange(256, 320)  # calibration draws from all rows; these are also scored
    method = OmegaConf.to_container(cfg.method, resolve=True)
    _, stats = calibrate_block(copy.deepcopy(block), 1, pool.hidden, pool, targets, eval_rows, 256, 4, method, cfg, False)
    assert stats["soft_mse"] < stats["kmeans_mse"]
    assert stats["hard_mse"] < 0.9 * stats["kmeans_mse"]  # 100 iterations here; the full 500 do far better


@pytest.mark.slow
def test_reference_dit_meets_its_quality_target(compose_cfg):
    """The README's numbers for the fp reference: class accuracy >= 0.9 under the default eval protocol."""
    cfg = compose_cfg("eval", f"ckpt={Path(__file__).parents[1] / 'data/dit_digits'}", "num_samples=200")
    _, _, metrics = sample_and_score(cfg, load_model(cfg.model, cfg.ckpt))
    assert metrics["class_accuracy"] >= 0.9
    assert metrics["fid"] < 3 * metrics["fid_floor"]
