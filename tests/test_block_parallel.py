"""Blocks in parallel: two processes started by Lightning's launcher (gloo on the CPU) each quantize half of the
blocks, and the checkpoint equals a one-process run's, tensor for tensor (one CPU thread per process, as the
one-process run: matmuls with more threads may round differently)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from vq4dit.cli.quantize import quantize
from vq4dit.errors import UserError

# classic VQ fits (a Trainer in every process) and beats its start in every block here, so what ships is the fit
FAST = ["model=dit_tiny", "model.arch.num_layers=3", "method=classic_vq", "quant=w3", "quant.k=16", "quant.d=2",
        "fit.iterations=30", "pool.trajectories=4", "pool.size=96", "pool.heldout_trajectories=2",
        "pool.heldout_size=32", "sampler.steps=6", "log_samples=0", "trainer.enable_progress_bar=false"]



@pytest.mark.slow
def test_two_processes_write_the_one_process_checkpoint(compose_cfg, tmp_path, one_thread):
    one = quantize(compose_cfg("train", *FAST, f"paths.output_dir={tmp_path / 'one'}"))
    two = quantize(compose_cfg("train", *FAST, "devices=2", f"paths.output_dir={tmp_path / 'two'}",
                               f"paths.log_dir={tmp_path / 'logs-two'}"))  # its own cache: nothing to resume
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    blocks = [json.loads((c / "manifest.json").read_text())["blocks"] for c in (one, two)]
    assert blocks[0] == blocks[1] and [b["kept"] for b in blocks[0]] == ["method"] * 3
    cached = sorted(p.name for p in (tmp_path / "logs-two/train/cache").glob("*/block_*.safetensors"))
    assert cached == ["block_000.safetensors", "block_001.safetensors", "block_002.safetensors"]


def test_quantized_student_inputs_cannot_be_spread(compose_cfg, tmp_path):
    cfg = compose_cfg("train", *FAST, "devices=2", "pool.student_inputs=quantized")
    with pytest.raises(UserError, match="pool.student_inputs=quantized with 2 devices") as err:
        quantize(cfg)
    assert "\n" not in str(err.value) and not (tmp_path / "logs" / "train" / "cache").exists()
