"""The two inference modes of a deployed layer against its reference weight `dequantize()`: the per-forward tile
decode is the same weight, gathered (bit for bit); its forward is the dense layer's; `decode=once` gives the
dense `nn.Linear`; with autograd the codebook still learns."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vq4dit.quant import decode
from vq4dit.quant.quantized_linear import decode_once
from vq4dit.quant.uniform_linear import UniformLinear
from vq4dit.quant.vq_linear import VQLinear


def vq_layer(out_f: int, in_f: int, k: int, d: int, seed: int = 0) -> VQLinear:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, k, (out_f * in_f // d,), generator=g)
    return VQLinear(codes, torch.randn(k, d, generator=g), torch.randn(out_f, generator=g), out_f, in_f)


def uniform_layer(out_f: int, in_f: int, bits: int, group: int | None, symmetric: bool) -> UniformLinear:
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(in_f, out_f)
    linear.weight.data, linear.bias.data = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, generator=g)
    return UniformLinear.from_linear(linear, bits, group, symmetric)


def indexed_uniform_layer(out_f: int, in_f: int, bits: int, group: int) -> UniformLinear:
    """Groups scattered over the input columns (GPTQ's act-order with dynamic groups): a group index per column."""
    layer = uniform_layer(out_f, in_f, bits, group, False)
    index = torch.randperm(in_f, generator=torch.Generator().manual_seed(2)) // group
    return UniformLinear(layer.codes, layer.scale, layer.zero, bits, group, False, layer.bias.detach(), index)


LAYERS = {  # k=256, d=4 (fp32 rows of 16 bytes), int16 codes (k 512), d=3 (12-byte rows: the plain row gather)
    "vq-w2": lambda: vq_layer(96, 64, 256, 4), "vq-int16": lambda: vq_layer(40, 32, 512, 2),
    "vq-d3": lambda: vq_layer(24, 48, 16, 3), "uniform-g16": lambda: uniform_layer(48, 64, 3, 16, False),
    "uniform-sym": lambda: uniform_layer(48, 64, 4, None, True),
    "uniform-indexed": lambda: indexed_uniform_layer(48, 64, 3, 16),
}


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(decode, "TILE_WEIGHTS", 64 * 10)  # 10 rows of 64: several tiles, a partial last one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(LAYERS))
def test_decoded_rows_are_the_dequantized_weight(name, dtype):
    layer = LAYERS[name]()
    reference = layer.dequantize().to(dtype)
    out = torch.empty(7, layer.in_features, dtype=dtype)
    layer.decode_rows(3, 10, out)
    assert torch.equal(out, reference[3:10])


@pytest.mark.parametrize("name", list(LAYERS))
def test_per_forward_is_the_dense_layer(name, small_tiles):
    layer = LAYERS[name]().requires_grad_(False)
    assert decode.tile_rows(layer.out_features, layer.in_features) < layer.out_features  # really tiled
    x = torch.randn(2, 5, layer.in_features)
    dense = F.linear(x, layer.dequantize(), layer.bias)
    torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # parameters that require grad take the same path under no_grad
        torch.testing.assert_close(LAYERS[name]()(x), dense, rtol=1e-5, atol=1e-5)


def test_bf16_forward_matches_a_bf16_dense_layer(small_tiles):
    layer = vq_layer(96, 64, 256, 4).requires_grad_(False)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    dense = F.linear(x.float(), layer.dequantize().bfloat16().float(), layer.bias.bfloat16().float())
    out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dense, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", list(LAYERS))
def test_to_dense_is_an_nn_linear_with_the_dequantized_weight(name, small_tiles):
    layer = LAYERS[name]()
    dense = layer.to_dense(torch.bfloat16)
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.bfloat16 and not dense.weight.requires_grad
    assert torch.equal(dense.weight, layer.dequantize().bfloat16())
    assert torch.equal(dense.bias, layer.bias.detach().bfloat16())


def test_decode_once_replaces_every_quantized_layer():
    model = nn.Sequential(vq_layer(32, 16, 16, 2), nn.GELU(), uniform_layer(16, 32, 4, 8, False)).requires_grad_(False)
    x = torch.randn(3, 16)
    per_forward = model(x)
    decode_once(model, torch.float32)
    assert [type(m) for m in model] == [nn.Linear, nn.GELU, nn.Linear]
    torch.testing.assert_close(model(x), per_forward, rtol=1e-6, atol=1e-6)


def test_codebook_still_trains_through_the_forward():
    layer = vq_layer(32, 16, 16, 2)
    x = torch.randn(8, 16)
    layer(x).square().sum().backward()
    expected = torch.autograd.grad(F.linear(x, layer.dequantize(), layer.bias).square().sum(), layer.codebook)[0]
    torch.testing.assert_close(layer.codebook.grad, expected)


def test_the_workspace_is_reused_across_layers(small_tiles):
    a, b = vq_layer(96, 64, 256, 4).requires_grad_(False), vq_layer(64, 64, 256, 4).requires_grad_(False)
    a(torch.randn(2, 64))
    first = decode.workspace(1, torch.float32, torch.device("cpu"), "weight").data_ptr()
    b(torch.randn(2, 64))
    assert decode.workspace(1, torch.float32, torch.device("cpu"), "weight").data_ptr() == first
