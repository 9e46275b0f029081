"""VQ layers: calibration state (soft mixture) and deployment state (hard codes) compute what they claim."""

import torch
from torch import nn

from vq4dit.quant.kmeans import inertia
from vq4dit.quant.vq_linear import SoftVQLinear, VQLinear, subvectors


def _linear(out_features=32, in_features=64, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def test_vq_linear_forward_is_a_linear_with_the_dequantized_weight():
    layer = VQLinear.from_linear(_linear(), k=16, d=4, iters=20)
    x = torch.randn(5, 64)
    w = layer.dequantize()
    assert w.shape == (32, 64)
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias)
    assert layer.codes.dtype == torch.uint8 and layer.codes.numel() == 32 * 64 // 4
    assert layer.code_bits_per_weight == 1.0


def test_vq_linear_codes_are_the_nearest_codewords():
    linear = _linear()
    layer = VQLinear.from_linear(linear, k=16, d=2, iters=20)
    points = subvectors(linear.weight, 2)
    error = (layer.dequantize().reshape(-1, 2) - points).pow(2).sum()
    torch.testing.assert_close(error.item(), inertia(points, layer.codebook.detach()), rtol=1e-5, atol=1e-6)


def test_soft_layer_mixes_candidates_by_softmax_ratios():
    linear = _linear()
    soft = SoftVQLinear.from_linear(linear, k=16, d=2, n=3, ratio_init="uniform", iters=20)
    assert soft.candidates.shape == (3, 32 * 64 // 2)
    r = soft.ratios()
    torch.testing.assert_close(r, torch.full_like(r, 1 / 3))
    expected = soft.codebook[soft.candidates].mean(dim=0).reshape(32, 64)
    torch.testing.assert_close(soft.weight(), expected)
    # the first candidate is the nearest codeword: hardening a fresh layer gives plain k-means VQ
    plain = VQLinear.from_linear(linear, k=16, d=2, iters=20)
    soft.logits.data[0] = 10.0
    torch.testing.assert_close(soft.hard_weight(), plain.dequantize())


def test_inverse_distance_init_prefers_the_nearest_candidate():
    soft = SoftVQLinear.from_linear(_linear(), k=16, d=2, n=2, ratio_init="inverse_distance", iters=20)
    r = soft.ratios()
    assert (r[0] >= r[1]).all() and (r[0] > 0.5).any()


def test_freezing_makes_ratios_one_hot_and_stops_their_gradient():
    soft = SoftVQLinear.from_linear(_linear(), k=16, d=2, n=2, iters=20)
    soft.logits.data[1, :10] = 8.0  # confident in candidate 1
    soft.freeze_confident(0.99)
    assert soft.frozen[:10].all() and not soft.frozen[10:].any()
    soft(torch.randn(4, 64)).sum().backward()
    assert soft.logits.grad[:, :10].abs().sum() == 0 and soft.logits.grad[:, 10:].abs().sum() > 0
    torch.testing.assert_close(soft.ratios()[:, :10], torch.tensor([[0.0], [1.0]]).expand(2, 10))
    soft.freeze_all()
    torch.testing.assert_close(soft.weight(), soft.hard_weight())


def test_regularizers_vanish_at_one_hot_and_peak_at_uniform():
    soft = SoftVQLinear.from_linear(_linear(), k=16, d=2, n=2, iters=20)
    for form in ("paper", "code"):
        assert soft.regularizer(form).item() > 0.49
    soft.freeze_all()
    for form in ("paper", "code"):
        assert soft.regularizer(form).item() == 0.0


def test_to_hard_keeps_argmax_codes_and_rounds_the_codebook():
    soft = SoftVQLinear.from_linear(_linear(), k=16, d=2, n=2, iters=20)
    soft.logits.data.normal_()
    hard = soft.to_hard()
    assert torch.equal(hard.codes.long(), soft.hard_codes())
    torch.testing.assert_close(hard.dequantize(), soft.hard_weight(), atol=1e-3, rtol=1e-3)
    assert torch.equal(hard.codebook, hard.codebook.half().float())


def test_hardened_layer_trains_only_its_codebook_and_bias():
    soft = SoftVQLinear.from_linear(_linear(), k=16, d=2, n=2, iters=20)
    soft.logits.data.normal_()
    codes = soft.hard_codes()
    soft.freeze_all()
    x = torch.randn(4, 64)
    expected = x @ soft.hard_weight().T + soft.bias
    torch.testing.assert_close(soft(x), expected)
    (soft(x).sum() + soft.regularizer("paper")).backward()
    assert soft.logits.grad is None  # the optimizer skips the logits after hardening
    assert soft.codebook.grad is not None and soft.codebook.grad.abs().sum() > 0
    assert torch.equal(soft.to_hard().codes.long(), codes)
