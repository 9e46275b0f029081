"""Activation fake quantization against independent numpy computations: the allowed levels of every range,
dynamic ranges per token, the static range search, gradients, the attention processor, and storage with the
deployed layer."""

import numpy as np
import pytest
import torch
from torch import nn

from vq4dit.quant.act_quantizer import (
    CLIP_PERCENTILES,
    ActQuantizer,
    InputSample,
    attach_input_quantizer,
    calibrate_static,
    input_quantizer_of,
)
from vq4dit.quant.attention_quantizer import QuantizedAttnProcessor
from vq4dit.quant.quantized_linear import from_stored, is_weight_encoding, stored_form
from vq4dit.quant.uniform_linear import UniformLinear


def _inputs(seed=0, shape=(3, 16, 64)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 5] *= 20  # an outlier channel, as DiT activations have
    x[1] += 3        # a shifted sample
    return x


def _numpy_fake_quant(values: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """One range over all of `values` (float64): (fake-quantized values, the grid's allowed values)."""
    if symmetric:
        half = 2 ** (bits - 1) - 1
        scale = max(np.abs(values).max(), 1e-5) / half
        zero, codes = 0.0, np.arange(-half, half + 1)
    else:
        lo, hi = values.min(), values.max()
        scale = max(hi - lo, 1e-5) / (2 ** bits - 1)
        zero, codes = np.round(-lo / scale), np.arange(0, 2 ** bits)
    q = np.clip(np.round(values / scale) + zero, codes[0], codes[-1])
    return (q - zero) * scale, (codes - zero) * scale


def _ranges(x: np.ndarray, granularity: str, group: int | None) -> list[np.ndarray]:
    """Index arrays of every dynamic range, written out by hand."""
    b, n, c = x.shape
    index = np.arange(x.size).reshape(x.shape)
    if granularity == "tensor":
        return [index[i].ravel() for i in range(b)]
    if granularity == "token":
        return [index[i, t] for i in range(b) for t in range(n)]
    return [index[i, t, g0:g0 + group] for i in range(b) for t in range(n) for g0 in range(0, c, group)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("granularity,group", [("tensor", None), ("token", None), ("token_group", 16)])
def test_dynamic_quantization_takes_only_the_allowed_levels_of_each_range(bits, symmetric, granularity, group):
    x = _inputs()
    out = ActQuantizer(bits, granularity, dynamic=True, symmetric=symmetric, group_size=group)(x).numpy()
    flat_x, flat_out = x.double().numpy().ravel(), out.astype(np.float64).ravel()
    for idx in _ranges(x.numpy(), granularity, group):
        expected, allowed = _numpy_fake_quant(flat_x[idx], bits, symmetric)
        np.testing.assert_allclose(flat_out[idx], expected, rtol=0, atol=1e-5 * np.abs(flat_x[idx]).max())
        distance = np.abs(flat_out[idx][:, None] - allowed[None, :]).min(1)
        assert distance.max() <= 1e-5 * np.abs(flat_x[idx]).max()
        assert len(np.unique(np.round(flat_out[idx], 6))) <= len(allowed)


def test_dynamic_ranges_follow_each_token():
    x = _inputs()
    quantizer = ActQuantizer(8, "token", dynamic=True)
    before = quantizer(x)
    louder = x.clone()
    louder[2, 7] *= 64  # one token 64x louder (a power of two: its grid scales exactly)
    after = quantizer(louder)
    changed = (after != before).any(-1)
    assert changed[2, 7] and changed.sum() == 1  # no other token's range moved
    torch.testing.assert_close(after[2, 7], 64 * before[2, 7], rtol=1e-6, atol=0)
    for i in range(3):  # each token's error is at most half its own step
        for t in range(16):
            step = (x[i, t].max() - x[i, t].min()) / 255
            assert (before[i, t] - x[i, t]).abs().max() <= step / 2 + 1e-6


def test_static_quantizer_keeps_its_calibrated_range_for_every_token():
    x = _inputs()
    quantizer = ActQuantizer(8, "tensor", dynamic=False, width=64)
    calibrate_static(quantizer, x.reshape(-1, 64))
    louder = x.clone()
    louder[2, 7] *= 64
    out = quantizer(louder)
    low, high = quantizer.levels
    ceiling = (high - quantizer.zero) * quantizer.scale
    assert out.max() <= ceiling + 1e-6 and torch.equal(out[0], quantizer(x)[0])  # clipped, others unchanged


@pytest.mark.parametrize("granularity,group", [("tensor", None), ("token_group", 16)])
def test_static_calibration_keeps_the_clipping_with_least_error(granularity, group):
    values = _inputs(1).reshape(-1, 64)
    quantizer = ActQuantizer(4, granularity, dynamic=False, group_size=group, width=64)
    calibrate_static(quantizer, values)
    v = values.double().numpy()
    per_range = [v.ravel()] if granularity == "tensor" else [v[:, g0:g0 + group].ravel() for g0 in range(0, 64, group)]
    for j, r in enumerate(per_range):
        best = None
        for pct in CLIP_PERCENTILES:  # brute force: every candidate range, its MSE on the values
            lo, hi = (r.min(), r.max()) if pct == 1.0 else (np.quantile(r, 1 - pct), np.quantile(r, pct))
            scale = max(hi - lo, 1e-5) / 15
            zero = np.round(-lo / scale)
            err = np.mean(((np.clip(np.round(r / scale) + zero, 0, 15) - zero) * scale - r) ** 2)
            if best is None or err < best[0]:
                best = (err, scale, zero)
        assert quantizer.scale[j].item() == pytest.approx(best[1], rel=1e-4)
        assert quantizer.zero[j].item() == best[2]


def test_input_sample_keeps_an_even_subset_within_the_value_limit(monkeypatch):
    monkeypatch.setattr("vq4dit.quant.act_quantizer.MAX_CALIBRATION_VALUES", 64 * 100)
    sample = InputSample(pool_rows=40)
    rows = torch.arange(40 * 16 * 64, dtype=torch.float32).reshape(40, 16, 64)
    for chunk in rows.split(8):
        sample.add(chunk)
    kept = sample.values()
    assert kept.shape[1] == 64 and len(kept) <= 100 and len(kept) >= 80  # 640 token rows, stride 7
    assert torch.equal(kept[1], rows.reshape(-1, 64)[7])


def test_rounding_passes_gradients_straight_through_and_scales_learn():
    x = _inputs().requires_grad_(True)
    quantizer = ActQuantizer(4, "tensor", dynamic=False, width=64)
    calibrate_static(quantizer, x.detach().reshape(-1, 64))
    scale = quantizer.learnable_scale()
    out = quantizer(x)
    out.sum().backward()
    low, high = quantizer.levels
    inside = ((x / scale).round() + quantizer.zero).clamp(low, high) == ((x / scale).round() + quantizer.zero)
    torch.testing.assert_close(x.grad, inside.float().detach())  # 1 inside the grid, 0 where clipped
    assert scale.grad is not None and scale.grad.abs() > 0
    quantizer.freeze()
    assert not isinstance(quantizer.scale, nn.Parameter) and "scale" in dict(quantizer.named_buffers())


def test_attached_quantizer_applies_to_the_layer_and_is_stored_with_it():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = UniformLinear.from_linear(linear, 4, 16, False)
    quantizer = ActQuantizer(6, "token_group", dynamic=False, group_size=16, width=64)
    calibrate_static(quantizer, _inputs().reshape(-1, 64))
    attach_input_quantizer(layer, quantizer)
    x = _inputs(2)
    expected = quantizer(x) @ layer.dequantize().T + linear.bias.detach()
    torch.testing.assert_close(layer(x), expected)
    tensors, record = stored_form(layer)
    assert record["input_quantizer"]["granularity"] == "token_group" and record["input_quantizer"]["bits"] == 6
    assert not is_weight_encoding("input_quantizer.scale") and is_weight_encoding("codes_packed")
    again = from_stored(tensors, record)
    assert torch.equal(input_quantizer_of(again).scale, quantizer.scale)
    torch.testing.assert_close(again(x), expected, rtol=0, atol=0)
    plain_tensors, plain_record = stored_form(UniformLinear.from_linear(linear, 4, 16, False))
    assert ("input_quantizer" not in plain_record
            and input_quantizer_of(from_stored(plain_tensors, plain_record)) is None)


def test_attention_processor_matches_a_dense_attention_with_quantized_operands(compose_cfg):
    from vq4dit.errors import instantiate

    attn = instantiate(compose_cfg("train", "model=dit_tiny").model).blocks[0].attn1
    x = _inputs(3, (2, 16, 64))
    with torch.no_grad():
        fp = attn(x)
        attn.set_processor(QuantizedAttnProcessor(8))
        quantized = attn(x)
        tokens = ActQuantizer(8, "token", dynamic=True)
        q, k, v = (tokens(p(x)).view(2, 16, attn.heads, -1).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
        probs = torch.round(probs * 255) / 255
        dense = attn.to_out[0]((probs @ v).transpose(1, 2).reshape(2, 16, -1))
    torch.testing.assert_close(quantized, dense, rtol=1e-5, atol=1e-6)
    assert 0 < (quantized - fp).abs().max() < 0.05 * fp.abs().max()  # close to fp, but quantized
