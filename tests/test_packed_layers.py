"""Deployed layers hold their codes bit-packed, as the checkpoint stores them: resident bytes are the checkpoint's
(within 5 % at the digits DiT's shapes, for RTN, GPTQ and VQ layers), the decoded weight is the unpacked codes' bit
for bit, the per-forward output is `dequantize()` + `F.linear`'s bit for bit, and a layer reloaded from its file
equals it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from vq4dit.methods.gptq import GPTQ, Hessian
from vq4dit.quant import decode
from vq4dit.quant.presets import UniformPreset
from vq4dit.quant.quantized_linear import from_stored
from vq4dit.quant.uniform_linear import UniformLinear
from vq4dit.quant.vq_linear import VQLinear

OUT, IN = 1024, 256  # the digits DiT's fc1


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT)


def _gptq(bits: int, group: int) -> UniformLinear:
    hessian = Hessian(IN, torch.device("cpu"))
    hessian.add(torch.randn(1, 512, IN, generator=torch.Generator().manual_seed(1)))
    return GPTQ(UniformPreset(bits=bits, group_size=group)).quantize(_linear(), hessian.value())


def _vq(k: int, d: int) -> VQLinear:
    return VQLinear.from_linear(_linear(), k, d, iters=5).rounded()  # as deployed: the stored fp16 codebook


LAYERS = {  # every method deploys one of these two layer types; code widths 2, 3, 4, 6, 8 and 9 bits
    "rtn w2g64": lambda: UniformLinear.from_linear(_linear(), 2, 64, False),
    "rtn w3g64": lambda: UniformLinear.from_linear(_linear(), 3, 64, False),
    "rtn w4 g8 (Q-DiT's smallest digits group)": lambda: UniformLinear.from_linear(_linear(), 4, 8, False),
    "rtn w4 per channel, symmetric": lambda: UniformLinear.from_linear(_linear(), 4, None, True),
    "rtn w8 per channel": lambda: UniformLinear.from_linear(_linear(), 8, None, False),
    "gptq w2g64 (act-order groups)": lambda: _gptq(2, 64),
    "vq w2 (k 256, d 4)": lambda: _vq(256, 4),
    "vq w3 (k 64, d 2)": lambda: _vq(64, 2),
    "vq k 16, d 2": lambda: _vq(16, 2),
    "vq k 512, d 4": lambda: _vq(512, 4),
}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


@pytest.fixture(scope="module")
def layers():
    return {name: make().requires_grad_(False) for name, make in LAYERS.items()}


@pytest.mark.parametrize("name", list(LAYERS))
def test_resident_bytes_are_the_checkpoints(layers, name):
    layer = layers[name]
    stored, _ = layer.stored()
    resident = _bytes([*layer.parameters(), *layer.buffers()])
    assert stored["codes_packed"] is layer.codes_packed  # the very bytes the file gets
    assert stored["codes_packed"].numel() * 8 == -(-layer.codes.numel() * layer_bits(layer) // 8) * 8
    assert _bytes(stored.values()) <= resident <= 1.05 * _bytes(stored.values())


def layer_bits(layer) -> int:
    return layer.bits if isinstance(layer, UniformLinear) else (layer.k - 1).bit_length()


@pytest.mark.parametrize("name", list(LAYERS))
def test_the_weight_is_the_unpacked_codes(layers, name):
    """A layer made of random codes on the grid / codebook of `name`: it gives its codes back, and `dequantize()`
    is the weight computed here from the codes (the unpacked layout the layers held before)."""
    layer, g = layers[name], torch.Generator().manual_seed(2)
    if isinstance(layer, VQLinear):
        codes = torch.randint(0, layer.k, (OUT * IN // layer.d,), generator=g)
        made = VQLinear(codes, layer.codebook.detach(), layer.bias, OUT, IN)
        expected = layer.codebook.detach()[codes].reshape(OUT, IN)
    else:
        high = 2 * ((1 << (layer.bits - 1)) - 1) if layer.symmetric else (1 << layer.bits) - 1
        codes = torch.randint(0, high + 1, (OUT, IN), generator=g)
        zero = layer.zero  # (out, groups) floats, unpacked
        made = UniformLinear(codes, layer.scale, zero, layer.bits, layer.group_size, layer.symmetric, layer.bias,
                             getattr(layer, "group_index", None))
        group = made.group_index if made.group_index is not None else torch.arange(IN) // (IN // zero.shape[1])
        expected = (codes.float() - zero[:, group]) * layer.scale.float()[:, group]
    assert torch.equal(made.codes.long(), codes.reshape(made.codes.shape))
    assert torch.equal(made.dequantize(), expected)


@pytest.mark.parametrize("name", list(LAYERS))
def test_per_forward_output_is_the_dequantized_layers_bit_for_bit(layers, name, monkeypatch):
    layer = layers[name]
    x = torch.randn(3, 5, IN)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.dequantize(), layer.bias))  # one tile: the same GEMM
    # any rows, any start (a start inside a run of packed bytes takes the general unpack): the same weight
    weight = layer.dequantize()
    for start, stop in ((0, OUT), (3, 10), (1000, OUT)):
        out = torch.empty(stop - start, IN)
        layer.decode_rows(start, stop, out)
        assert torch.equal(out, weight[start:stop])
    monkeypatch.setattr(decode, "TILE_WEIGHTS", 7 * IN)  # 147 tiles, the last one of 2 rows
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(LAYERS))
def test_a_layer_reloaded_from_its_file_is_the_same_layer(layers, name, tmp_path):
    layer = layers[name]
    tensors, record = layer.stored()
    save_file({k: t.contiguous() for k, t in tensors.items()}, tmp_path / "layer.safetensors")
    again = from_stored(load_file(tmp_path / "layer.safetensors"), record)
    mine, theirs = dict(layer.named_buffers()), dict(again.named_buffers())
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(again.dequantize(), layer.dequantize())
    x = torch.randn(4, IN)
    with torch.no_grad():
        assert torch.equal(again(x), layer(x))


def test_a_codebook_still_trains_on_packed_codes():
    """The model-level fit trains deployed codebooks through `dequantize()`: the gradient is the one of the weight
    gathered from the unpacked codes. In float64, so the two sums' different orders cannot tell them apart."""
    layer = VQLinear.from_linear(_linear(), 64, 2, iters=5).double()
    x = torch.randn(8, IN, dtype=torch.float64)
    layer(x).square().sum().backward()
    codebook = layer.codebook.detach().clone().requires_grad_(True)
    weight = codebook[layer.codes.long()].reshape(OUT, IN)
    expected = torch.autograd.grad(F.linear(x, weight, layer.bias.detach()).square().sum(), codebook)[0]
    torch.testing.assert_close(layer.codebook.grad, expected)


@pytest.mark.parametrize("name", list(LAYERS))
def test_a_layer_holding_its_fixed_part_trains_as_it_does_from_packed_codes(layers, name):
    """The model-level fit holds what it cannot change decoded (`hold_fixed`); a step then gives exactly the
    output and gradients of the packed layer, the held tensor follows the layer's device, and releasing it leaves
    the layer's buffers as they were."""
    layer = copy.deepcopy(layers[name]).double().requires_grad_(True)
    buffers = dict(layer.named_buffers())
    x = torch.randn(8, IN, dtype=torch.float64, requires_grad=True)

    def step():
        out = layer(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
        return out.detach(), grads

    packed = step()
    layer.hold_fixed(True)
    held = step()
    assert torch.equal(packed[0], held[0]) and all(map(torch.equal, packed[1], held[1]))
    assert len([key for key, _ in layer.named_buffers() if key not in buffers]) == 1
    assert layer.state_dict().keys() == {**buffers, **dict(layer.named_parameters())}.keys()  # never saved
    layer.hold_fixed(False)
    assert dict(layer.named_buffers()).keys() == buffers.keys()
    layer.hold_fixed(True)
    assert all(b.device == torch.device("meta") for b in layer.to("meta").buffers())  # it moves with the layer
