"""The dry run's estimate (`train.py dry_run=true`): FLOPs counted from the architecture equal the closed form of a
DiT block, the predicted pool memory equals the pool a real run builds, and the predicted time is within 2x of
the measured run (one CPU thread for both: with the 2 cores shared, thread contention would dominate both); it
names every phase a real run writes to phases.json; for an assumed machine its work is counted, so its time
follows the assumed throughput and not this CPU's speed."""

import json
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


@pytest.mark.slow
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


def test_the_estimate_names_every_phase_a_run_writes(compose_cfg, tmp_path, one_thread):
    """The defaults run a model-level fit (vq4dit) and sample grids: both are phases of the estimate, as are the
    pool, the method's model-level step, the blocks and saving; a method without a model fit has none."""
    tiny = ["model=dit_tiny", "fit.iterations=3", "pool.trajectories=2", "pool.size=32", "pool.heldout_size=8",
            "pool.heldout_trajectories=1", "sampler.steps=2", "log_samples=2", "trainer.enable_progress_bar=false",
            "quant.k=16", "quant.d=2", "estimate.steps=1"]
    for method in ("method=vq4dit model_fit.iterations=2", "method=kmeans"):  # vq4dit's model fit, shortened
        args, out = [*tiny, *method.split()], tmp_path / method.split()[0].removeprefix("method=")
        predicted = estimate(compose_cfg("train", *args, "dry_run=true"))
        quantize(compose_cfg("train", *args, f"paths.output_dir={out}"))
        written = json.loads((out / "phases.json").read_text())
        assert set(predicted.phases) == set(written), (predicted.phases, written)
        assert ("model fit" in written) == ("vq4dit" in method) and "sample grids" in written
        assert all(seconds > 0 for name, seconds in predicted.phases.items() if name != "model-level step")


def test_an_assumed_throughput_scales_the_counted_work(compose_cfg):
    slow, fast = (estimate(compose_cfg("train", *SMALL, "dry_run=true", f"estimate.tflops={t}")) for t in (1e-3, 2e-3))
    assert slow.phases["pool"] == pytest.approx(2 * fast.phases["pool"])  # FLOPs / throughput
    # a step is forward and backward (twice the forward's matmuls) of a batch of 16 rows
    assert slow.cost.step_flops == fast.cost.step_flops
    assert 2.5 * 16 * slow.cost.row_flops < slow.cost.step_flops < 3.5 * 16 * slow.cost.row_flops
    assert slow.device_bytes == fast.device_bytes and "every counted FLOP at 0.001 TFLOP/s" in str(slow)


@pytest.mark.slow
def test_the_set_up_for_another_machine_is_its_counted_work_at_the_assumed_throughput(compose_cfg, monkeypatch):
    """A block's set-up (k-means and the rest outside the fit steps) on an assumed machine: its counted FLOPs and
    bytes at the assumed rates, or its ops at the host time per op measured here, whichever is longer. At rates
    this low the device's share is the longer (by far): doubling both halves the set-up, and a CPU at half the
    speed (every measured duration doubled) leaves it as it is; only a CPU so slow that its host share is the
    longer sets it, as ops x the host time per op."""
    import vq4dit.calibration.block_cost as block_cost

    def run(tflops, tbps, slower=1.0):
        clock = time.perf_counter
        with monkeypatch.context() as patch:
            patch.setattr(block_cost.time, "perf_counter", lambda: slower * clock())  # every duration x slower
            return estimate(compose_cfg("train", *SMALL, "dry_run=true", f"estimate.tflops={tflops}",
                                        f"estimate.tbps={tbps}"))

    def counted(result):  # the same ops each run, give or take a few of Lightning's
        work = result.cost.setup_work
        return pytest.approx([work.flops, work.bytes, work.ops], rel=1e-3)

    slow, fast = run(1e-6, 1e-6), run(2e-6, 2e-6)
    work = slow.cost.setup_work
    assert work.flops > 0 and work.bytes > 0 and work.ops > 0 and [work.flops, work.bytes, work.ops] == counted(fast)
    device = work.flops / 1e-6 / 1e12 + work.bytes / 1e-6 / 1e12
    assert slow.block["set-up"] == pytest.approx(device)
    assert fast.block["set-up"] == pytest.approx(device / 2, rel=1e-3)
    half_speed, crawling = run(1e-6, 1e-6, slower=2.0), run(1e-6, 1e-6, slower=1e4)
    assert [work.flops, work.bytes, work.ops] == counted(half_speed)
    assert [work.flops, work.bytes, work.ops] == counted(crawling)
    assert half_speed.block["set-up"] == pytest.approx(device, rel=1e-3)
    op = crawling.host_op_seconds[1]  # host time per op in a plain step, measured on the crawling CPU
    assert op > 100 * slow.host_op_seconds[1]
    assert crawling.block["set-up"] == pytest.approx(crawling.cost.setup_work.ops * op) and op * work.ops > device


@pytest.mark.parametrize("override,message", [("estimate.tflops=0", "estimate.tflops=0; valid: a positive"),
                                              ("estimate.steps=0", "estimate.steps=0; valid: a positive")])
def test_bad_estimate_settings_are_refused(compose_cfg, override, message):
    with pytest.raises(UserError, match=message):
        estimate(compose_cfg("train", *SMALL, "dry_run=true", override))
