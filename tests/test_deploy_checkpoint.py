"""The checkpoint holds what theory says and loads without the full-precision model: a DiT-XL/2-shaped file is
the sum of its parts (codes at their bits, codebooks, every fp tensor once), shared embedders come back shared,
and the peak memory of a load is the quantized model's."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from torch import nn

from vq4dit.deploy.memory import CPU_PROBE_ENV
from vq4dit.deploy.synthetic import DIT_XL_2, random_quantized_dit
from vq4dit.errors import UserError
from vq4dit.models.dit import build_transformer
from vq4dit.quant.block_layers import QUANTIZED_LINEARS
from vq4dit.quant.checkpoint import load_quantized, quantized_layers, save_quantized
from vq4dit.quant.presets import UniformPreset, VQPreset
from vq4dit.quant.quantized_linear import QuantizedLinear

TINY = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
            patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)
XL_BLOCK_LINEAR_PARAMS = 669_344_256  # the 28 blocks' linears of DiT-XL/2, weights and biases (method notes §1)


def test_a_dit_xl_2_shaped_w2_checkpoint_is_the_sum_of_its_parts(tmp_path):
    k, d = 256, 4
    folder = save_quantized(random_quantized_dit(DIT_XL_2, VQPreset(k, d)), tmp_path / "xl")
    manifest = json.loads((folder / "manifest.json").read_text())
    # the parts, from the architecture alone (built on the meta device: no weights)
    fp = build_transformer(DIT_XL_2, empty=True)
    shapes = {name: p.shape for name, p in fp.state_dict().items()}
    linears = {f"transformer_blocks.{i}.{n}" for i in range(28) for n in QUANTIZED_LINEARS}
    linear_params = sum(shapes[f"{n}.weight"].numel() + shapes[f"{n}.bias"].numel() for n in linears)
    assert linear_params == XL_BLOCK_LINEAR_PARAMS
    codes = sum(shapes[f"{n}.weight"].numel() // d for n in linears)  # log2(256) = 8 bits: a byte a code
    codebooks = len(linears) * k * d * 2  # fp16
    biases = sum(4 * shapes[f"{n}.bias"].numel() for n in linears)
    once = [name for name in shapes if name.rpartition(".")[0] not in linears
            and not (".norm1.emb." in name and not name.startswith("transformer_blocks.0."))]
    full_precision = sum(4 * shapes[name].numel() for name in once)
    parts = codes + codebooks + biases + full_precision
    file_bytes = os.path.getsize(folder / "model.safetensors")
    assert parts <= file_bytes <= 1.02 * parts, (file_bytes, parts)
    # without storing the 27 embedder copies once, the file would be ~300 MiB larger than its parts
    copies = sum(4 * shapes[n].numel() for n in shapes if ".norm1.emb." in n and n not in once)
    assert copies > 250 * 2**20
    sizes = manifest["sizes"]
    params = XL_BLOCK_LINEAR_PARAMS + sum(shapes[n].numel() for n in once)
    assert sizes["model_params"] == params and 674e6 < params < 676e6  # DiT-XL/2 has 675 M parameters
    assert sizes["model_bits_per_weight"] == pytest.approx(8 * parts / params)
    weights = XL_BLOCK_LINEAR_PARAMS - biases // 4
    assert sizes["blocks_bits_per_weight"] == pytest.approx(8 * (codes + codebooks) / weights)
    assert 2 < sizes["blocks_bits_per_weight"] < 2.01 and sizes["shared_embedders"] == 27


def test_shared_embedders_are_stored_once_and_shared_after_loading(tmp_path):
    model = random_quantized_dit(TINY, VQPreset(16, 2), name="dit_tiny")
    folder = save_quantized(model, tmp_path / "ckpt")
    with safe_open(folder / "model.safetensors", "pt") as f:
        embedder_keys = [k for k in f.keys() if ".norm1.emb." in k]
    assert embedder_keys and all(k.startswith("transformer_blocks.0.") for k in embedder_keys)
    loaded = load_quantized(folder)
    blocks = loaded.transformer.transformer_blocks
    assert blocks[1].norm1.emb is blocks[0].norm1.emb and blocks[2].norm1.emb is blocks[0].norm1.emb
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_different_embedders_are_each_stored(tmp_path):
    model = random_quantized_dit(TINY, VQPreset(16, 2), name="dit_tiny")
    blocks = model.transformer.transformer_blocks
    blocks[2].norm1.emb = copy.deepcopy(blocks[0].norm1.emb)  # an unshared copy with other values
    blocks[2].norm1.emb.timestep_embedder.linear_1.bias.data += 1
    folder = save_quantized(model, tmp_path / "ckpt")
    assert json.loads((folder / "manifest.json").read_text())["shared"] == {
        "transformer_blocks.1.norm1.emb": "transformer_blocks.0.norm1.emb"}
    loaded = load_quantized(folder).transformer.transformer_blocks
    assert loaded[2].norm1.emb is not loaded[0].norm1.emb
    assert torch.equal(loaded[2].norm1.emb.timestep_embedder.linear_1.bias,
                       blocks[2].norm1.emb.timestep_embedder.linear_1.bias)


@pytest.mark.parametrize("preset", [VQPreset(16, 2), UniformPreset(3, 32, False)], ids=["vq", "uniform"])
def test_decode_once_and_dtype(tmp_path, preset):
    model = random_quantized_dit(TINY, preset, name="dit_tiny")
    folder = save_quantized(model, tmp_path / "ckpt")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 10])
    with torch.no_grad():
        expected = model(x, t, y)
        dense = load_quantized(folder, decode="once")
        assert not quantized_layers(dense) and isinstance(dense.transformer.transformer_blocks[0].ff.net[2], nn.Linear)
        torch.testing.assert_close(dense(x, t, y), expected, rtol=1e-5, atol=1e-5)
        half = load_quantized(folder, decode="once", dtype=torch.bfloat16)
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
        torch.testing.assert_close(half(x.bfloat16(), t, y).float(), expected, rtol=0.1, atol=0.1)
        codes = load_quantized(folder, dtype=torch.bfloat16)  # per_forward in bf16: codes stay, bf16 out
        assert all(isinstance(m, QuantizedLinear) for m in quantized_layers(codes).values())
        torch.testing.assert_close(codes(x.bfloat16(), t, y).float(), expected, rtol=0.1, atol=0.1)


def test_bad_decode_mode_is_one_line(tmp_path):
    folder = save_quantized(random_quantized_dit(TINY, VQPreset(16, 2), name="dit_tiny"), tmp_path / "ckpt")
    with pytest.raises(UserError, match="decode=twice; valid: per_forward, once") as err:
        load_quantized(folder, decode="twice")
    assert "\n" not in str(err.value)


def test_a_truncated_checkpoint_names_what_is_missing(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_quantized(random_quantized_dit(TINY, VQPreset(16, 2), name="dit_tiny"), tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    del tensors["transformer_blocks.1.attn1.to_k.codebook"], tensors["proj_out_2.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UserError, match="no transformer_blocks.1.attn1.to_k.codebook tensor"):
        load_quantized(folder)
    del tensors["transformer_blocks.1.attn1.to_k.codes_packed"], tensors["transformer_blocks.1.attn1.to_k.bias"]
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["layers"]["transformer_blocks.1.attn1.to_k"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UserError, match="incomplete or from another model: transformer_blocks.1.attn1.to_k.weight"):
        load_quantized(folder)


def test_loading_peaks_at_the_quantized_model_not_the_fp_one(tmp_path):
    """One DiT-XL/2-shaped block at w2, loaded in a fresh process: the resident-set peak of the load stays below
    the quantized model's tensors plus its largest layer's dense weight, a fraction of the fp32 model."""
    model = random_quantized_dit({**DIT_XL_2, "num_layers": 1}, VQPreset(256, 4))
    folder = save_quantized(model, tmp_path / "ckpt")
    fp32 = json.loads((folder / "manifest.json").read_text())["sizes"]["model_fp32_bytes"]
    largest_dense = max(4 * m.num_weights for m in quantized_layers(model).values())
    script = ("import json, sys, torch\n"
              "from vq4dit.deploy.memory import peak_memory\n"
              "from vq4dit.quant.checkpoint import load_quantized\n"
              "load_quantized(sys.argv[1])  # imports and first-use allocations out of the measurement\n"
              "model, peak, held = peak_memory(lambda: load_quantized(sys.argv[1]))\n"
              "tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}.values()\n"
              "print(json.dumps([peak, sum(t.numel() * t.element_size() for t in tensors)]))\n")
    result = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True,
                            env={**os.environ, **CPU_PROBE_ENV}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    peak, resident = json.loads(result.stdout.strip().splitlines()[-1])
    assert peak < resident + largest_dense, (peak, resident, largest_dense)
    assert peak < 0.4 * fp32, (peak, fp32)
