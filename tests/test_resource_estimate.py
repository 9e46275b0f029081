"""The dry run's estimate (`train.py dry_run=true`): FLOPs counted from the architecture equal the closed form of a
DiT block, the predicted pool memory equals the pool a real run builds, and the predicted time is within 2x of
the measured run (one CPU thread for both: with the 2 cores shared, thread contention would dominate both)."""

import time

import pytest
import torch

from vq4dit.calibration.block_cost import forward_flops
from vq4dit.cli.estimate import estimate
from vq4dit.cli.quantize import quantize
from vq4dit.errors import UserError
from vq4dit.models.dit import build_transformer

SMALL = ["model=dit_tiny", "fit.iterations=60", "pool.trajectories=8", "pool.size=256", "pool.heldout_size=64",
         "sampler.steps=10", "log_samples=0", "trainer.enable_progress_bar=false", "quant.k=16", "quant.d=2"]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_block_flops_are_the_closed_form_of_the_architecture():
    """DiT-XL/2's block, counted on the meta device: per token 2 x 12 D^2 for qkv, proj, fc1, fc2 and 4 N D for
    the attention products; per row 2 x 6 D^2 for adaLN and the block's timestep embedder (256 -> D -> D)."""
    arch = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=1,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_eps=1e-6)
    with torch.device("meta"):
        block = build_transformer(arch).transformer_blocks[0]
    n, d = 256, 1152
    closed = 24 * n * d * d + 4 * n * n * d + 12 * d * d + 2 * (256 * d + d * d)
    assert forward_flops(block, n) == closed == 8_474_886_144


def test_estimate_is_within_2x_of_a_measured_run(compose_cfg, tmp_path, monkeypatch, one_thread):
    predicted = estimate(compose_cfg("train", *SMALL, "dry_run=true"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "logs").exists()  # a dry run writes nothing

    pools = []
    import vq4dit.cli.quantize as job
    original = job.quantize_model

    def keep(model, method, pool, **kwargs):
        pools.append(pool.hidden.numel() * pool.hidden.element_size())
        return original(model, method, pool, **kwargs)

    monkeypatch.setattr(job, "quantize_model", keep)
    start = time.perf_counter()
    quantize(compose_cfg("train", *SMALL))
    measured = time.perf_counter() - start
    # the pool's inputs, the targets beside them, and the quantized students' inputs (vq4dit's default)
    assert predicted.pool_bytes == 3 * pools[0]
    assert measured / 2 < predicted.total_seconds < 2 * measured, (predicted.total_seconds, measured, str(predicted))


def test_an_assumed_throughput_scales_the_counted_work(compose_cfg):
    slow, fast = (estimate(compose_cfg("train", *SMALL, "dry_run=true", f"estimate.tflops={t}")) for t in (1e-3, 2e-3))
    assert slow.pool_seconds == pytest.approx(2 * fast.pool_seconds)  # FLOPs / throughput
    # a step is forward and backward (twice the forward's matmuls) of a batch of 16 rows
    assert slow.cost.step_flops == fast.cost.step_flops
    assert 2.5 * 16 * slow.cost.row_flops < slow.cost.step_flops < 3.5 * 16 * slow.cost.row_flops
    assert slow.device_bytes == fast.device_bytes and "assumed 0.001 TFLOP/s" in str(slow)


@pytest.mark.parametrize("override,message", [("estimate.tflops=0", "estimate.tflops=0; valid: a positive"),
                                              ("estimate.steps=0", "estimate.steps=0; valid: a positive")])
def test_bad_estimate_settings_are_refused(compose_cfg, override, message):
    with pytest.raises(UserError, match=message):
        estimate(compose_cfg("train", *SMALL, "dry_run=true", override))
