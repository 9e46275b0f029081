"""A quantized layer computes in the precision an `nn.Linear` holding its decoded weight would: under CPU autocast
(bf16, fp16) its matmul runs in autocast's dtype and returns it, outside autocast in the input's dtype, on every
path (no-grad per-forward decode, one tile or several; the differentiable `dequantize()` path; `decode_once`'s
dense layer; with an input quantizer), and a whole quantized DiT under bf16 autocast runs its quantized matmuls in
bf16. Tiles: every DiT-XL/2 linear is one tile (one decode + one GEMM) under the default budget; a smaller budget
gives ceil(out / floor(budget / in)) tiles of the same result; the decode buffer is one, shared by every layer."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_decode import uniform_layer, vq_layer  # the same random layers as the decode tests
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vq4dit.deploy.synthetic import DIT_XL_2, random_layer, random_quantized_dit
from vq4dit.models.dit import build_transformer
from vq4dit.quant import decode
from vq4dit.quant.act_quantizer import ActQuantizer, attach_input_quantizer
from vq4dit.quant.block_layers import QUANTIZED_LINEARS
from vq4dit.quant.presets import UniformPreset, VQPreset
from vq4dit.quant.quantized_linear import QuantizedLinear, decode_once


def _cpu_autocast_supports(dtype: torch.dtype) -> bool:
    with torch.autocast("cpu", dtype=dtype):  # an unsupported dtype warns and leaves autocast off
        return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype


HALF = [torch.bfloat16] + ([torch.float16] if _cpu_autocast_supports(torch.float16) else [])
PRECISIONS = [*HALF, None]  # None: plain fp32, no autocast


def precision(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)




LAYERS = {  # d=4 (rows gathered as words), d=3 (the plain row gather), uniform grouped asymmetric and symmetric
    "vq-d4": lambda: vq_layer(96, 64, 256, 4), "vq-d3": lambda: vq_layer(24, 48, 16, 3),
    "uniform-g16": lambda: uniform_layer(48, 64, 3, 16, False),
    "uniform-sym": lambda: uniform_layer(48, 64, 4, None, True),
}


def reference(layer: QuantizedLinear, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """The `nn.Linear` holding the layer's decoded weight and bias, in `dtype`."""
    weight = layer.dequantize().detach().to(dtype)
    linear = nn.Linear(layer.in_features, layer.out_features, dtype=weight.dtype)
    linear.weight.data, linear.bias.data = weight.clone(), layer.bias.detach().to(weight.dtype).clone()
    return linear.requires_grad_(False)


def assert_within_rounding(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, linear: nn.Linear) -> None:
    """|out - ref| <= 2 eps(dtype) (|x| |W|^T + |b|) elementwise. Tiling changes only which GEMM call computes an
    output column: each output is still one dot product over the whole input, accumulated in fp32 and rounded once
    to the output dtype, but a kernel's blocking (and so its fp32 summation order) may depend on the tile's width,
    and addmm may add the bias before or after that rounding: at most two roundings of the result apart, each at
    most eps x its magnitude, bounded by the magnitudes' sum. (On this CPU it was bit-equal in bf16 and fp16.)"""
    assert out.dtype == ref.dtype
    mag = F.linear(x.abs().double(), linear.weight.abs().double(), linear.bias.abs().double())
    err = (out.double() - ref.double()).abs()
    assert (err <= 2 * torch.finfo(out.dtype).eps * mag).all(), (err / mag).max()


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(decode, "TILE_WEIGHTS", 64 * 10)  # 10 rows of 64: several tiles, a partial last one


@pytest.mark.parametrize("dtype", PRECISIONS, ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_one_tile_forward_is_nn_linear_bit_for_bit(name, dtype):
    layer = LAYERS[name]().requires_grad_(False)
    assert decode.num_tiles(layer.out_features, layer.in_features) == 1
    linear = reference(layer)
    x = torch.randn(2, 5, layer.in_features)
    with precision(dtype):
        out, ref = layer(x), linear(x)
    assert out.dtype == ref.dtype == (dtype or torch.float32)
    assert torch.equal(out, ref)  # the same decoded values and the same F.linear: nothing may differ


@pytest.mark.parametrize("dtype", PRECISIONS, ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_tiled_forward_is_nn_linear_within_one_rounding(name, dtype, small_tiles):
    layer = LAYERS[name]().requires_grad_(False)
    assert decode.num_tiles(layer.out_features, layer.in_features) > 1
    linear = reference(layer)
    x = torch.randn(2, 5, layer.in_features)
    with precision(dtype), decode.TileCounter() as count:
        out, ref = layer(x), linear(x)
    assert count.tiles == math.ceil(layer.out_features / (64 * 10 // layer.in_features))
    assert out.dtype == ref.dtype == (dtype or torch.float32)  # before: fp32 under autocast (the tiles' mm out=)
    assert_within_rounding(out, ref, x, linear)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_differentiable_path_is_nn_linear_and_trains(name, dtype):
    layer = LAYERS[name]()
    trained = [p for p in layer.parameters() if p.requires_grad]
    assert trained  # so the forward takes the dequantize() path
    linear = reference(layer)
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    with precision(dtype):
        out, ref = layer(x), linear(x)
    assert out.dtype == ref.dtype == dtype and out.requires_grad
    assert torch.equal(out, ref)  # one rounding of the fp32 weight to `dtype`, as autocast's own cast
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
    assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("tiles", ["one", "several"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_a_model_cast_to_half_precision_computes_in_it(name, tiles, dtype, monkeypatch):
    if tiles == "several":
        monkeypatch.setattr(decode, "TILE_WEIGHTS", 64 * 10)
    layer = LAYERS[name]().requires_grad_(False).to(dtype)  # codebook / scales, bias in `dtype`; codes unchanged
    linear = reference(layer, dtype)  # its decoded weight (a uniform layer's dequantize() gives fp32) in `dtype`
    x = torch.randn(2, 5, layer.in_features).to(dtype)
    out, ref = layer(x), linear(x)
    assert out.dtype == dtype
    if tiles == "one":
        assert torch.equal(out, ref)
    else:
        assert_within_rounding(out, ref, x, linear)


@pytest.mark.parametrize("dtype", PRECISIONS, ids=str)
def test_decode_once_and_input_quantizers_keep_the_precision(dtype):
    def model():
        torch.manual_seed(0)
        layers = [LAYERS["vq-d4"](), nn.GELU(), uniform_layer(64, 96, 4, 16, False)]
        attach_input_quantizer(layers[2], ActQuantizer(8, "token", dynamic=True))
        return nn.Sequential(*layers).requires_grad_(False)

    per_forward, dense = model(), decode_once(model())
    assert [type(m) for m in dense] == [nn.Linear, nn.GELU, nn.Linear] and dense[0].weight.dtype == torch.float32
    references = nn.Sequential(reference(per_forward[0]), nn.GELU(), reference(per_forward[2]))
    attach_input_quantizer(references[2], ActQuantizer(8, "token", dynamic=True))
    x = torch.randn(3, 64)
    with precision(dtype):
        outs = [m(x) for m in (per_forward, dense, references)]
    assert {o.dtype for o in outs} == {dtype or torch.float32}
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2])


class MatmulDtypes(TorchDispatchMode):
    """The dtypes of every matmul (mm, addmm, bmm) run inside the modules `inside` (hooks mark them)."""

    def __init__(self, inside: list[nn.Module]):
        super().__init__()
        self.dtypes, self.active = [], False
        self.hooks = [h for m in inside for h in (m.register_forward_pre_hook(lambda *_: self._mark(True)),
                                                  m.register_forward_hook(lambda *_: self._mark(False)))]

    def _mark(self, active: bool) -> None:
        self.active = active

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active and func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.dtypes.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
        return func(*args, **(kwargs or {}))


TINY = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
            patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)


@pytest.mark.parametrize("tiles", ["one", "several"])
def test_a_quantized_dit_under_bf16_autocast_runs_its_quantized_matmuls_in_bf16(tiles, monkeypatch):
    if tiles == "several":
        monkeypatch.setattr(decode, "TILE_WEIGHTS", 64 * 48)  # every linear in 2-8 tiles: the path that ran fp32
    model = random_quantized_dit(TINY, VQPreset(16, 2), name="dit_tiny")
    dense = decode_once(copy.deepcopy(model))
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 3 * len(QUANTIZED_LINEARS)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.tensor([1, 4])
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16), MatmulDtypes(layers) as seen:
            quantized_bf16 = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dense_bf16 = dense(x, t, y)
        quantized_fp32, dense_fp32 = model(x, t, y), dense(x, t, y)
    expected_tiles = sum(decode.num_tiles(m.out_features, m.in_features) for m in layers)
    assert (tiles == "one") == (expected_tiles == len(layers))
    assert len(seen.dtypes) == expected_tiles and all(d == {torch.bfloat16} for d in seen.dtypes)
    # the dense model's bf16 output (one tile: the same ops on the same values; several: bf16 roundings apart), and
    # as far from the fp32 run as the dense model's bf16 run is (a model that stayed in fp32 would be ~1e-6 away)
    assert quantized_bf16.dtype == dense_bf16.dtype
    if tiles == "one":
        assert torch.equal(quantized_bf16, dense_bf16)
    else:
        torch.testing.assert_close(quantized_bf16, dense_bf16, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(quantized_fp32, dense_fp32, rtol=1e-5, atol=1e-5)
    shift = (quantized_bf16.float() - quantized_fp32).abs().max()
    dense_shift = (dense_bf16.float() - dense_fp32).abs().max()
    assert shift > 1e-3 and 0.5 * dense_shift <= shift <= 2 * dense_shift, (shift, dense_shift)


XL_SHAPES = {"attn (1152→1152)": (1152, 1152), "fc1 (1152→4608)": (4608, 1152), "fc2 (4608→1152)": (1152, 4608),
             "adaLN (1152→6912)": (6912, 1152)}


def test_every_dit_xl_2_linear_is_one_tile():
    transformer = build_transformer(DIT_XL_2, empty=True)  # meta device: shapes only
    shapes = [tuple(transformer.get_submodule(f"transformer_blocks.{i}.{name}").weight.shape)
              for i in range(DIT_XL_2["num_layers"]) for name in QUANTIZED_LINEARS]
    assert set(shapes) == set(XL_SHAPES.values())
    assert max(o * i for o, i in shapes) <= decode.TILE_WEIGHTS  # adaLN: 7.96 M of 8 Mi weights
    assert all(decode.num_tiles(*shape) == 1 for shape in shapes)
    assert sum(decode.num_tiles(*shape) for shape in shapes) == 196
    assert decode.TILE_WEIGHTS * 4 <= 32 * 2**20  # the decode buffer: at most 32 MiB in fp32, 16 MiB in bf16


def test_the_earlier_budget_gave_the_issues_1400_tiles(monkeypatch):
    monkeypatch.setattr(decode, "TILE_WEIGHTS", 1 << 19)
    per_block = sum(decode.num_tiles(*XL_SHAPES[name]) for name in
                    ["attn (1152→1152)"] * 4 + ["fc1 (1152→4608)", "fc2 (4608→1152)", "adaLN (1152→6912)"])
    assert 28 * per_block == 1400


@pytest.mark.parametrize(("case", "preset"), [*((case, VQPreset(256, 4)) for case in XL_SHAPES),
                                              ("adaLN (1152→6912)", UniformPreset(4, 128))],
                         ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_a_smaller_budget_tiles_the_same_output(case, preset, monkeypatch):
    out_f, in_f = XL_SHAPES[case]
    layer = random_layer(out_f, in_f, preset, torch.Generator().manual_seed(0)).requires_grad_(False)
    linear = reference(layer)
    x = torch.randn(8, in_f)
    results = {}
    for budget in (decode.TILE_WEIGHTS, 1 << 19, 1000 * in_f + 1):
        monkeypatch.setattr(decode, "TILE_WEIGHTS", budget)
        for dtype in (torch.bfloat16, None):
            with precision(dtype), decode.TileCounter() as count:
                results[budget, dtype] = layer(x)
            assert count.tiles == math.ceil(out_f / (budget // in_f))  # ceil(out / floor(budget / in)), >= 1 row
    for (_, dtype), out in results.items():
        one_tile = results[next(iter(results))[0], dtype]
        assert out.dtype == one_tile.dtype == (dtype or torch.float32)
        assert_within_rounding(out, one_tile, x, linear)


def test_one_decode_buffer_serves_every_layer_and_can_be_freed():
    decode.release_workspace()
    g = torch.Generator().manual_seed(0)
    layers = [random_layer(*shape, VQPreset(256, 4), g).requires_grad_(False) for shape in XL_SHAPES.values()]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for layer in layers:
            layer(torch.randn(2, layer.in_features))
    weight = [buf for (slot, _), buf in decode.held_buffers().items() if slot == "weight"]
    largest = max(o * i for o, i in XL_SHAPES.values())
    # one buffer for every layer: the largest tile, 2 bytes a weight (decoded straight into autocast's dtype)
    assert len(weight) == 1 and weight[0].numel() == 2 * largest and largest <= decode.TILE_WEIGHTS
    decode.release_workspace()
    assert not decode.held_buffers()


def test_compute_dtype_follows_autocast_only_where_it_casts():
    x = torch.randn(2, 3)
    assert decode.compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert decode.compute_dtype(x) == torch.bfloat16
        assert decode.compute_dtype(x.double()) == torch.float64  # autocast leaves float64 alone
        assert decode.compute_dtype(x.to("meta")) == torch.float32  # CPU autocast does not touch other devices
    assert decode.compute_dtype(x.to("meta", torch.bfloat16)) == torch.bfloat16
