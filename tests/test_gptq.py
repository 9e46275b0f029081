"""GPTQ against the reference implementation (IST-DASLab/gptq) on a fixed problem: its outputs are committed in
tests/fixtures/gptq_reference.safetensors (tests/fixtures/README.md says how they were made)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from vq4dit.methods.gptq import Hessian, gptq
from vq4dit.quant.uniform_linear import UniformGrid, decode, round_to_nearest

FIXTURE = Path(__file__).parent / "fixtures" / "gptq_reference.safetensors"
REFERENCE = json.loads(safe_open(FIXTURE, "pt").metadata()["gptq_reference"])
TENSORS = load_file(FIXTURE)
W, X = TENSORS["weight"], TENSORS["inputs"]


def _dense(codes: torch.Tensor, grid: UniformGrid) -> torch.Tensor:
    width = codes.shape[1] // grid.scale.shape[1]
    return decode(codes, UniformGrid(grid.scale.repeat_interleave(width, 1), grid.zero.repeat_interleave(width, 1),
                                     grid.bits, grid.symmetric))


def _output_error(wq: torch.Tensor) -> float:
    """The fixture's measure: ||X W^T - X Wq^T||_F^2 / N in float64."""
    return (X.double() @ (W.double() - wq.double()).T).square().sum().item() / len(X)


def _hessian() -> torch.Tensor:
    h = Hessian(W.shape[1], torch.device("cpu"))
    for chunk in X.split(64):  # fed in batches, as forward hooks would
        h.add(chunk[None])
    return h.value()


def test_hessian_is_two_over_n_xtx():
    torch.testing.assert_close(_hessian().double(), 2 / len(X) * X.double().T @ X.double(), rtol=1e-5, atol=1e-5)


SETTINGS = [pytest.param(s, id=f"w{s['bits']}-g{s['groupsize']}-act{int(s['act_order'])}")
            for s in REFERENCE["settings"]]


@pytest.mark.parametrize("setting", SETTINGS)
def test_matches_the_reference_at_equal_settings(setting):
    """With the reference's float32 scales: the same quantized weight, so the same layer-output error."""
    group = None if setting["groupsize"] == -1 else setting["groupsize"]
    codes, grid = gptq(W, _hessian(), setting["bits"], group, False, damp=setting["percdamp"],
                       block_size=setting["blocksize"], act_order=setting["act_order"], scale_dtype=torch.float32)
    ours = _output_error(_dense(codes, grid))
    assert ours <= setting["gptq_error"] * (1 + 1e-6), (ours, setting["gptq_error"])
    torch.testing.assert_close(_dense(codes, grid), TENSORS[setting["tensor"]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("setting", SETTINGS)
def test_stored_fp16_scales_cost_under_one_percent_and_beat_rtn(setting):
    group = None if setting["groupsize"] == -1 else setting["groupsize"]
    codes, grid = gptq(W, _hessian(), setting["bits"], group, False, act_order=setting["act_order"])
    assert torch.equal(grid.scale, grid.scale.half().float())
    ours = _output_error(_dense(codes, grid))
    assert ours <= 1.01 * setting["gptq_error"]
    rtn = _output_error(_dense(*round_to_nearest(W, setting["bits"], group, False)))
    assert rtn == pytest.approx(setting["rtn_error"], rel=0.01)  # our RTN is the reference's, fp16 scales aside
    assert ours < 0.6 * rtn


def test_dead_inputs_get_zero_weight_and_do_not_break_the_inverse():
    x = X.clone()
    x[:, :5] = 0  # five inputs that never fire: a singular Hessian without the dead-column rule
    h = Hessian(W.shape[1], torch.device("cpu"))
    h.add(x)
    codes, grid = gptq(W, h.value(), 4, 32, False)
    wq = _dense(codes, grid)
    assert torch.isfinite(wq).all() and (wq[:, :5] == 0).all()


def test_gptq_layer_through_the_method_is_the_algorithms_output():
    from vq4dit.methods import GPTQ
    from vq4dit.quant.presets import UniformPreset

    linear = nn.Linear(128, 48)
    with torch.no_grad():
        linear.weight.copy_(W)
    layer = GPTQ(UniformPreset(bits=3, group_size=32)).quantize(linear, _hessian())
    codes, grid = gptq(W, _hessian(), 3, 32, False)
    assert torch.equal(layer.dequantize(), _dense(codes, grid)) and torch.equal(layer.bias, linear.bias.detach())
