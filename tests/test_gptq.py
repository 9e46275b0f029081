"""GPTQ against the reference implementation (IST-DASLab/gptq) on a fixed problem: its outputs are committed in
tests/fixtures/gptq_reference.safetensors (tests/fixtures/README.md says how they were made). And against a
transcription of the published algorithm written here, in both of the reference's group modes (dynamic groups, its
default, whose act-order groups scatter over the input; static groups), on a layer with salient input channels."""

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
    codes, grid, index = gptq(W, _hessian(), setting["bits"], group, False, damp=setting["percdamp"],
                              block_size=setting["blocksize"], act_order=setting["act_order"],
                              static_groups=setting["static_groups"], scale_dtype=torch.float32)
    assert index is None  # the fixture's act-order runs with groups are static ones
    ours = _output_error(_dense(codes, grid))
    assert ours <= setting["gptq_error"] * (1 + 1e-6), (ours, setting["gptq_error"])
    torch.testing.assert_close(_dense(codes, grid), TENSORS[setting["tensor"]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("setting", SETTINGS)
def test_stored_fp16_scales_cost_under_one_percent_and_beat_rtn(setting):
    group = None if setting["groupsize"] == -1 else setting["groupsize"]
    codes, grid, _ = gptq(W, _hessian(), setting["bits"], group, False, act_order=setting["act_order"],
                          static_groups=setting["static_groups"])
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
    codes, grid, _ = gptq(W, h.value(), 4, 32, False)
    wq = _dense(codes, grid)
    assert torch.isfinite(wq).all() and (wq[:, :5] == 0).all()


def test_gptq_layer_through_the_method_is_the_algorithms_output():
    from vq4dit.methods import GPTQ
    from vq4dit.quant.presets import UniformPreset

    linear = nn.Linear(128, 48)
    with torch.no_grad():
        linear.weight.copy_(W)
    layer = GPTQ(UniformPreset(bits=3, group_size=32), act_order=False).quantize(linear, _hessian())
    codes, grid, _ = gptq(W, _hessian(), 3, 32, False)
    assert torch.equal(layer.dequantize(), _dense(codes, grid)) and torch.equal(layer.bias, linear.bias.detach())


# -- both group modes against the published algorithm, on a layer with salient input channels -----------------------

def _salient_layer(out_f: int = 64, in_f: int = 256, rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and correlated inputs where six input channels are 10-100x larger than the rest, as in a DiT's
    hidden activations: act-order then matters, and so does which columns share a group."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_f, generator=g) @ (torch.eye(in_f) + torch.randn(in_f, in_f, generator=g) / in_f ** 0.5)
    x[:, torch.randperm(in_f, generator=g)[:6]] *= torch.tensor([10.0, 15, 25, 40, 70, 100])
    return torch.randn(out_f, in_f, generator=g) * 0.05, x


def published_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group: int | None, act_order: bool,
                   static_groups: bool, block: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense quantized weight, each input column's group) by Algorithm 1 of the GPTQ paper in float64: every column
    rounded in turn and its error, through the upper Cholesky factor of the damped H^-1, subtracted from every column
    after it at once. Groups as the reference implementation forms them: static ones fitted up front on consecutive
    original columns; dynamic ones fitted at their first column in loop order, on the weights as they stood at the
    start of the current batch of `block` columns (the reference applies a batch's feedback beyond it only at its
    end). A grid is min-max over a range that holds 0, an integer zero point, codes clamped to 0..2^bits - 1."""
    w, h = w.double().clone(), h.double().clone()
    n = w.shape[1]
    size = n if group is None else group
    top = 2 ** bits - 1

    def fitted(columns):
        low, high = columns.min(1).values.clamp(max=0), columns.max(1).values.clamp(min=0)
        step = (high - low) / top
        step = torch.where(step > 0, step, torch.ones_like(step))
        return step[:, None], torch.round(-low / step)[:, None]

    def rounded(column, grid):
        step, zero = grid
        return ((torch.clamp(torch.round(column[:, None] / step) + zero, 0, top) - zero) * step)[:, 0]

    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    up_front = [fitted(w[:, k:k + size]) for k in range(0, n, size)]
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * h.diagonal().mean() * torch.eye(n, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h)).mT
    q, groups = torch.zeros_like(w), torch.zeros(n, dtype=torch.long)
    for start in range(0, n, block):
        at_batch_start = w.clone()
        for j in range(start, min(start + block, n)):
            if group is None or static_groups:
                groups[perm[j]] = int(perm[j]) // size
                grid = up_front[groups[perm[j]]]
            else:
                groups[perm[j]] = j // size
                grid = fitted(at_batch_start[:, j:j + size]) if j % size == 0 else grid
            q[:, j] = rounded(w[:, j], grid)
            error = (w[:, j] - q[:, j]) / u[j, j]
            w[:, j + 1:] -= error[:, None] * u[j, j + 1:][None, :]
    return q[:, torch.argsort(perm)], groups


MODES = [pytest.param(bits, group, static, id=f"w{bits}-{'pc' if group is None else f'g{group}'}-"
                      f"{'static' if static else 'dynamic'}")
         for bits in (2, 3, 4) for group in (None, 32) for static in (False, True)]


@pytest.mark.parametrize("bits,group,static", MODES)
def test_act_order_matches_the_published_algorithm_on_salient_channels(bits, group, static):
    """The deployed layer's output error ||X W^T - X Q^T|| within 5 % of the transcription's, and its columns in
    the transcription's groups: scattered over the input in the dynamic mode, consecutive in the static one."""
    from vq4dit.methods import GPTQ
    from vq4dit.quant.presets import UniformPreset

    w, x = _salient_layer()
    h = Hessian(w.shape[1], torch.device("cpu"))
    h.add(x)
    linear = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        linear.weight.copy_(w)
    method = GPTQ(UniformPreset(bits=bits, group_size=group), static_groups=static)
    assert method.act_order  # the default
    layer = method.quantize(linear, h.value())
    reference, groups = published_gptq(w, 2 / len(x) * x.double().T @ x.double(), bits, group, True, static)
    error = lambda wq: (x.double() @ (w.double() - wq.double()).T).norm().item()  # noqa: E731
    assert error(layer.dequantize()) == pytest.approx(error(reference), rel=0.05)
    scattered = group is not None and not static
    assert (layer.group_index is not None) == scattered
    if scattered:
        assert torch.equal(layer.group_index, groups) and not torch.equal(groups, groups.sort().values)


def test_dynamic_groups_beat_static_ones_on_salient_channels():
    """On this layer the reference's default groups (fitted in act-order) give lower output error than static ones
    at every bit width, in the transcription and in ours: the reason act_order runs with dynamic groups by default."""
    w, x = _salient_layer()
    h = 2 / len(x) * x.double().T @ x.double()
    error = lambda wq: (x.double() @ (w.double() - wq.double()).T).norm().item()  # noqa: E731

    def ours(bits, static):
        codes, grid, index = gptq(w, h.float(), bits, 32, False, act_order=True, static_groups=static)
        columns = index if index is not None else torch.arange(w.shape[1]) // 32
        return decode(codes, UniformGrid(grid.scale[:, columns], grid.zero[:, columns], bits, False))

    for bits in (2, 3, 4):
        dynamic, static = (error(published_gptq(w, h, bits, 32, True, s)[0]) for s in (False, True))
        assert dynamic < static
        assert error(ours(bits, False)) < error(ours(bits, True))


def _indexed_layer():
    """A GPTQ layer of 3 groups of 32 scattered over 96 input columns (a 2-bit stored index: 3 is off the record)."""
    from vq4dit.methods import GPTQ
    from vq4dit.quant.presets import UniformPreset

    w, x = _salient_layer(out_f=24, in_f=96, rows=256)
    h = Hessian(w.shape[1], torch.device("cpu"))
    h.add(x)
    linear = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        linear.weight.copy_(w)
    return GPTQ(UniformPreset(bits=3, group_size=32)).quantize(linear, h.value()), x


def test_a_group_indexed_layer_reloads_exactly_from_its_file(tmp_path):
    from safetensors.torch import save_file

    from vq4dit.quant.packing import unpack_codes
    from vq4dit.quant.uniform_linear import UniformLinear

    layer, x = _indexed_layer()
    tensors, record = layer.stored()
    assert tensors["group_index_packed"].dtype == torch.uint8 and len(tensors["group_index_packed"]) == 96 * 2 // 8
    assert torch.equal(unpack_codes(tensors["group_index_packed"], 2, 96).long(), layer.group_index.long())
    save_file(tensors, tmp_path / "layer.safetensors")
    again = UniformLinear.from_stored(load_file(tmp_path / "layer.safetensors"), json.loads(json.dumps(record)))
    assert torch.equal(again.group_index, layer.group_index)
    assert torch.equal(again.dequantize(), layer.dequantize()) and torch.equal(again.bias, layer.bias)
    with torch.no_grad():
        assert torch.equal(again(x), layer(x))
    # the deployed weight is the codes on their own group's grid, column by column
    columns = layer.group_index.long()
    expected = (layer.codes.float() - layer.zero[:, columns]) * layer.scale.float()[:, columns]
    assert torch.equal(layer.dequantize(), expected)


def _changed(index: torch.Tensor, column: int, group: int) -> torch.Tensor:
    from vq4dit.quant.packing import pack_codes

    index = index.clone()
    index[column] = group
    return pack_codes(index, 2)


@pytest.mark.parametrize("change,message", [
    (lambda p, i: p.to(torch.int32), "group_index_packed is int32 .* needs uint8"),
    (lambda p, i: p[:-1], r"group_index_packed is uint8 \(23,\), its record needs uint8 \(24,\)"),
    (lambda p, i: _changed(i, 5, 3), "group_index_packed holds group 3, its record allows 0..2"),
    (lambda p, i: _changed(i, 5, (int(i[5]) + 1) % 3), "group_index_packed puts 31 columns in group"),
])
def test_a_bad_group_index_is_refused(change, message):
    from vq4dit.quant.uniform_linear import UniformLinear

    layer = _indexed_layer()[0]
    tensors, record = layer.stored()
    tensors["group_index_packed"] = change(tensors["group_index_packed"], layer.group_index)
    with pytest.raises(ValueError, match=message):
        UniformLinear.from_stored(tensors, record)
