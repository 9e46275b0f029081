"""Calibration in bf16: teacher and student forwards run under bf16 autocast while the student's trainable weights
(and their optimizer) stay fp32, and the result is close to an fp32 calibration of the same blocks."""

import json

import pytest
import torch

from vq4dit.calibration import block_calibration
from vq4dit.cli.quantize import quantize
from vq4dit.errors import UserError

FAST = ["model=dit_tiny", "method=classic_vq", "quant=w3", "quant.k=16", "quant.d=2", "fit.iterations=30",
        "pool.trajectories=4", "pool.size=96", "pool.heldout_trajectories=2", "pool.heldout_size=32",
        "sampler.steps=6", "log_samples=0", "trainer.enable_progress_bar=false"]


def test_bf16_calibration_keeps_fp32_weights_and_lands_near_fp32(compose_cfg, tmp_path, monkeypatch):
    seen = []
    original = block_calibration.BlockCalibration.training_step

    def spy(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        trainable = [p for layer in self.layers.values() for p in layer.parameters() if p.requires_grad]
        probe = torch.ones(2, 2) @ torch.ones(2, 2)  # what a matmul in this step computes in
        seen.append(({p.dtype for p in trainable}, probe.dtype, loss.dtype))
        return loss

    monkeypatch.setattr(block_calibration.BlockCalibration, "training_step", spy)
    runs = {}
    for precision in ("fp32", "bf16"):
        seen.clear()
        cfg = compose_cfg("train", *FAST, f"precision={precision}", f"paths.output_dir={tmp_path / precision}")
        manifest = json.loads((quantize(cfg) / "manifest.json").read_text())
        runs[precision] = (manifest, list(seen))
    (fp32, fp32_steps), (bf16, bf16_steps) = runs["fp32"], runs["bf16"]
    assert bf16["precision"] == "bf16" and len(bf16_steps) == 2 * 30
    assert all(dtypes == {torch.float32} and probe == torch.bfloat16 and loss == torch.float32
               for dtypes, probe, loss in bf16_steps)
    assert all(probe == torch.float32 for _, probe, _ in fp32_steps)
    for a, b in zip(fp32["blocks"], bf16["blocks"]):
        # the same k-means start (computed in fp32), scored against bf16 teacher targets: close, not equal
        assert b["start_mse"] == pytest.approx(a["start_mse"], rel=0.1) and b["start_mse"] != a["start_mse"]
        assert b["shipped_mse"] == pytest.approx(a["shipped_mse"], rel=0.2)
        assert b["kept"] == a["kept"] == "method"


def test_unknown_precision_is_refused_before_any_work(compose_cfg, tmp_path):
    with pytest.raises(UserError, match="precision=fp8; valid: fp32, bf16, fp16") as err:
        quantize(compose_cfg("train", *FAST, "precision=fp8"))
    assert "\n" not in str(err.value) and not (tmp_path / "logs" / "train" / "cache").exists()
