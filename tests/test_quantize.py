"""`train.py` end to end on the tiny model: checkpoint format, resume, bad input."""

import copy
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file
from torch import nn

from vq4dit.errors import UserError
from vq4dit.quant import block_calibration
from vq4dit.quant.checkpoint import load_quantized, vq_layers
from vq4dit.quant.vq_linear import VQLinear
from vq4dit.quantize import quantize

FAST = ["model=dit_tiny", "quant.k=16", "quant.d=2", "method.iterations=12", "method.kmeans_iters=10",
        "method.pool.trajectories=4", "method.pool.size=96", "method.eval_rows=32", "sampler.steps=6",
        "log_samples=0", "trainer.enable_progress_bar=false"]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dequantized_copy(model):
    """The reference path: every VQLinear replaced by a dense nn.Linear holding dequantize()."""
    dense = copy.deepcopy(model)
    for name, layer in vq_layers(dense).items():
        linear = nn.Linear(layer.in_features, layer.out_features)
        linear.weight.data = layer.dequantize().detach().clone()
        linear.bias.data = layer.bias.detach().clone()
        parent, _, child = name.rpartition(".")
        setattr(dense.transformer.get_submodule(parent), child, linear)
    return dense


def test_train_writes_a_checkpoint_whose_forward_is_the_dequantized_model(compose_cfg):
    cfg = compose_cfg("train", *FAST, "quant.k=64")  # 6-bit codes
    ckpt = quantize(cfg)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    model = load_quantized(ckpt, cfg.model)
    layers = vq_layers(model)
    assert len(layers) == 7 * cfg.model.arch.num_layers  # q, k, v, proj, fc1, fc2, adaLN per block
    assert not any(isinstance(m, nn.Linear) and "transformer_blocks" in n and "emb" not in n
                   for n, m in model.transformer.named_modules())
    tensors = load_file(ckpt / "model.safetensors")
    for name, info in manifest["layers"].items():
        assert info["code_bits"] == 6 and info["bits_per_weight"] == 3.0
        assert tensors[f"{name}.codes_packed"].numel() == -(-info["num_codes"] * 6 // 8)
        assert tensors[f"{name}.codebook"].dtype == torch.float16
    sizes = manifest["sizes"]
    assert sizes["blocks_bytes"] < sizes["blocks_fp32_bytes"] / 4
    assert [b["block"] for b in manifest["blocks"]] == list(range(cfg.model.arch.num_layers))
    assert all(b["hard_mse"] > 0 for b in manifest["blocks"])
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([1, 2, 10])
    torch.testing.assert_close(model(x, t, y), _dequantized_copy(model)(x, t, y))


def test_interrupted_run_resumes_to_the_same_checkpoint(compose_cfg, tmp_path, monkeypatch, one_thread):
    """Bit-identical on one CPU thread. (With more threads, any two runs, interrupted or not, share their codes,
    but RMSprop turns last-bit float noise into ~1e-4 differences in biases.)"""
    whole = quantize(compose_cfg("train", *FAST, f"paths.log_dir={tmp_path / 'a'}", f"paths.output_dir={tmp_path / 'a/run'}"))

    class Crash(Exception):
        pass

    original = block_calibration.BlockCalibration.training_step

    def crash_in_block_1(self, batch, batch_idx):
        if self.block_index == 1:
            raise Crash()
        return original(self, batch, batch_idx)

    monkeypatch.setattr(block_calibration.BlockCalibration, "training_step", crash_in_block_1)
    b = [f"paths.log_dir={tmp_path / 'b'}"]
    with pytest.raises(Crash):
        quantize(compose_cfg("train", *FAST, *b, f"paths.output_dir={tmp_path / 'b/run1'}"))
    cached = sorted(p.name for p in (tmp_path / "b/train/cache").glob("*/block_*.safetensors"))
    assert cached == ["block_000.safetensors"]  # block 0 saved, block 1 not (no half block)
    monkeypatch.setattr(block_calibration.BlockCalibration, "training_step", original)
    resumed = quantize(compose_cfg("train", *FAST, *b, f"paths.output_dir={tmp_path / 'b/run2'}"))
    first, second = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("override,message", [
    ("quant.d=3", "quant.d=3 does not divide"),
    ("quant.k=100000", "quant.k=100000 is larger than"),
    ("method.candidates=0", "method.candidates=0"),
    ("method.ratio_init=random", "method.ratio_init=random; valid: uniform, inverse_distance"),
    ("method.harden_at=0", "method.harden_at=0"),
    ("method.name=gptq", "method.name=gptq; valid"),
])
def test_bad_quant_settings_stop_before_any_work(compose_cfg, tmp_path, override, message):
    cfg = compose_cfg("train", *FAST, override)
    with pytest.raises(UserError, match=message) as err:
        quantize(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "logs" / "train" / "cache").exists() and not (tmp_path / "run" / "checkpoint").exists()


def test_checkpoint_of_another_model_is_refused(compose_cfg):
    cfg = compose_cfg("train", *FAST)
    ckpt = quantize(cfg)
    other = compose_cfg("eval", "model=dit_digits", f"ckpt={ckpt}")
    with pytest.raises(UserError, match="quantized dit_tiny, not model=dit_digits"):
        load_quantized(Path(ckpt), other.model)


def test_fp_weights_of_another_model_are_refused(compose_cfg, tmp_path):
    digits = compose_cfg("eval", "model=dit_digits", "model.weights=null", "ckpt=x")
    instantiate(digits.model).transformer.save_pretrained(tmp_path / "digits")
    cfg = compose_cfg("train", *FAST, f"model.weights={tmp_path / 'digits'}")
    with pytest.raises(UserError, match="does not match model dit_tiny"):
        quantize(cfg)


def test_calibration_keeps_label_embedders_in_eval_mode(compose_cfg):
    model = instantiate(compose_cfg("train", *FAST).model)
    block = model.blocks[0]
    module = block_calibration.BlockCalibration(copy.deepcopy(block), copy.deepcopy(block),
                                                {"harden_at": 1.0, "iterations": 1}, 0, ())
    module.train()
    embedder = module.student.norm1.emb.class_embedder
    assert embedder.dropout_prob > 0 and not embedder.training and not module.teacher.training
    h, t, y = torch.randn(64, 16, 64), torch.full((64,), 500), torch.arange(64) % 10
    torch.testing.assert_close(module(h, t, y), block(h, timestep=t, class_labels=y))


def test_vq_layers_hold_codes_in_the_smallest_dtype(compose_cfg):
    cfg = compose_cfg("train", *FAST, "quant.k=512", "quant.d=4", "method=kmeans")
    model = load_quantized(quantize(cfg), cfg.model)
    layer = next(iter(vq_layers(model).values()))
    assert isinstance(layer, VQLinear) and layer.codes.dtype == torch.int16 and layer.k == 512
