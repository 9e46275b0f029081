"""Uniform (scalar) quantization: RTN's grid against an independent per-group computation, the deployed layer's
storage, and the grid's allowed values."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from vq4dit.quant.uniform_linear import UniformLinear


def _linear(out_features=24, in_features=128, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight[3] += 0.5           # a row that is all positive: its range must still include 0
        linear.weight[5, :64] = 0.0       # an all-zero group
    return linear


def _numpy_rtn(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Asymmetric min-max rounding written out group by group, with fp16 scales (the stored dtype)."""
    out = np.empty_like(w)
    qmax = 2 ** bits - 1
    for r in range(w.shape[0]):
        for g0 in range(0, w.shape[1], group):
            x = w[r, g0:g0 + group].astype(np.float64)
            lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
            scale = (hi - lo) / qmax if hi > lo else 1.0
            scale = float(np.float16(np.float32(scale)))
            zero = min(max(np.round(-lo / scale), 0), qmax)
            q = np.clip(np.round(x / np.float32(scale)) + zero, 0, qmax)
            out[r, g0:g0 + group] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, None])
def test_rtn_matches_a_groupwise_min_max_rounding(bits, group):
    linear = _linear()
    layer = UniformLinear.from_linear(linear, bits, group, symmetric=False)
    expected = _numpy_rtn(linear.weight.detach().numpy(), bits, group or 128)
    np.testing.assert_allclose(layer.dequantize().numpy(), expected, rtol=0, atol=1e-6)
    assert layer.codes.dtype == torch.uint8 and int(layer.codes.max()) <= 2 ** bits - 1
    assert layer.scale.shape == (24, 128 // (group or 128))
    assert (layer.dequantize()[5, :64] == 0).all()  # an all-zero group stays exactly zero


def test_error_falls_as_bits_rise():
    linear = _linear()
    errors = [(UniformLinear.from_linear(linear, b, 32, False).dequantize() - linear.weight).square().mean().item()
              for b in (2, 3, 4, 6, 8)]
    assert all(a > 2.5 * b for a, b in zip(errors, errors[1:]))  # about 4x per bit


def test_symmetric_grid_is_symmetric_and_has_no_zero_point():
    linear = _linear()
    layer = UniformLinear.from_linear(linear, 4, 32, symmetric=True)
    w = layer.dequantize().reshape(24, 4, 32)
    absmax = linear.weight.detach().abs().reshape(24, 4, 32).amax(2, keepdim=True)
    levels = w / layer.scale[:, :, None]
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert levels.round().abs().max() <= 7  # -7..7: 15 levels, symmetric around 0
    expected = torch.where(absmax > 0, absmax / 7, 1.0).half().float()  # an all-zero group keeps scale 1
    assert layer.scale.dtype == torch.float16  # held as stored
    torch.testing.assert_close(layer.scale[:, :, None].float(), expected, atol=0, rtol=1e-3)
    tensors, record = layer.stored()
    assert "zero_packed" not in tensors and record["symmetric"]


@pytest.mark.parametrize("bits,group,symmetric", [(2, 32, False), (3, None, False), (4, 64, True), (8, 32, False)])
def test_stored_form_is_bit_packed_and_reloads_exactly(bits, group, symmetric):
    linear = _linear()
    layer = UniformLinear.from_linear(linear, bits, group, symmetric)
    tensors, record = layer.stored()
    groups = 128 // (group or 128)
    assert len(tensors["codes_packed"]) == math.ceil(24 * 128 * bits / 8)
    assert tensors["scale"].dtype == torch.float16 and tensors["scale"].shape == (24, groups)
    if not symmetric:
        assert len(tensors["zero_packed"]) == math.ceil(24 * groups * bits / 8)
    again = UniformLinear.from_stored(tensors, record)
    assert torch.equal(again.dequantize(), layer.dequantize()) and torch.equal(again.bias, layer.bias)
    x = torch.randn(5, 128)
    torch.testing.assert_close(again(x), x @ layer.dequantize().T + linear.bias.detach())
