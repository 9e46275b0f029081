"""PTQ4DiT's pieces against closed forms: the folded block equals the unfolded one, balancing meets in the middle,
Spearman weights, AdaRound's start; and the method's transform on real pool rows."""

import copy

import numpy as np
import pytest
import torch

from vq4dit.errors import UserError, instantiate
from vq4dit.methods import PTQ4DiT
from vq4dit.methods.block_data import BlockData
from vq4dit.quant.adaround_linear import AdaRoundLinear
from vq4dit.quant.presets import ActPreset, UniformPreset
from vq4dit.quant.salience_balancing import (
    BALANCED,
    balancing_factors,
    check_foldable,
    fold_balancing,
    spearman_weights,
)
from vq4dit.quant.uniform_linear import UniformLinear


@pytest.fixture
def tiny(compose_cfg):
    model = instantiate(compose_cfg("train", "model=dit_tiny").model)
    with torch.no_grad():  # give adaLN real modulation (diffusers' init is small) and v a bias to fold into
        for block in model.blocks:
            block.norm1.linear.weight.mul_(5)
            block.norm1.linear.bias.normal_(0, 0.5)
    return model


def _rows(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(n, 16, 64, generator=g), torch.randint(0, 1000, (n,), generator=g)
    return x, t, torch.randint(0, 11, (n,), generator=g)


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_folding_leaves_block_and_model_outputs_unchanged(tiny):
    x, t, y = _rows()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        before = [block(x, timestep=t, class_labels=y) for block in tiny.blocks]
        latent = torch.randn(4, 4, 8, 8, generator=g)
        model_before = tiny(latent, t[:4], y[:4])
    folded = copy.deepcopy(tiny)
    for block in folded.blocks:  # factors spanning three orders of magnitude
        fold_balancing(block, {site: torch.exp(2 * torch.randn(64, generator=g)) for site in BALANCED})
    with torch.no_grad():
        after = [block(x, timestep=t, class_labels=y) for block in folded.blocks]
        model_after = folded(latent, t[:4], y[:4])
    for a, b in zip(after, before):
        assert _relative(a, b) < 1e-5
    assert _relative(model_after, model_before) < 1e-5
    assert not torch.equal(folded.blocks[0].attn1.to_v.weight, tiny.blocks[0].attn1.to_v.weight)


def test_folded_inputs_are_divided_and_columns_multiplied(tiny):
    block, x, t, y = tiny.blocks[0], *_rows()
    seen = {}

    def block_hook(store, name):
        return lambda _, args: store.__setitem__(name, args[0].detach().clone())

    names = ("attn1.to_q", "attn1.to_out.0", "ff.net.0.proj")
    for tag, b in (("before", block), ("after", copy.deepcopy(block))):
        if tag == "after":
            factors = {"qkv": torch.linspace(0.5, 4, 64), "proj": torch.linspace(3, 0.25, 64),
                       "fc1": torch.linspace(0.1, 10, 64)}
            fold_balancing(b, factors)
        store = seen.setdefault(tag, {})
        hooks = [b.get_submodule(n).register_forward_pre_hook(block_hook(store, n)) for n in names]
        with torch.no_grad():
            b(x, timestep=t, class_labels=y)
        for h in hooks:
            h.remove()
    for name, site in zip(names, ("qkv", "proj", "fc1")):
        torch.testing.assert_close(seen["after"][name], seen["before"][name] / factors[site], rtol=1e-4, atol=1e-5)


def test_balancing_meets_at_the_geometric_mean():
    act = torch.tensor([100.0, 1.0, 0.5, 0.0, 4.0])
    weight = torch.tensor([0.01, 1.0, 8.0, 3.0, 0.0])
    b = balancing_factors(act, weight)
    ok = torch.tensor([True, True, True, False, False])
    torch.testing.assert_close((act / b)[ok], (act * weight).sqrt()[ok])
    torch.testing.assert_close((weight * b)[ok], (act * weight).sqrt()[ok])
    assert torch.equal(b[~ok], torch.ones(2))  # nothing to balance where a side is 0


def test_spearman_weights_are_softmax_of_minus_rank_correlation():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(32, generator=g)
    act = torch.stack([w, -w, torch.rand(32, generator=g), torch.ones(32)])  # rho = 1, -1, ~0, undefined
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731  (no ties)
    rho = [np.corrcoef(ranks(a.numpy()), ranks(w.numpy()))[0, 1] for a in act[:3]] + [0.0]
    expected = np.exp(-np.array(rho)) / np.exp(-np.array(rho)).sum()
    np.testing.assert_allclose(spearman_weights(act, w).numpy(), expected, rtol=1e-5)
    assert spearman_weights(act, w)[1] > spearman_weights(act, w)[2] > spearman_weights(act, w)[0]


def test_transform_on_pool_rows_keeps_outputs_and_balances_the_inputs(tiny):
    block = tiny.blocks[0]
    x, t, y = _rows(24)
    t = torch.tensor([100, 500, 900] * 8)  # three timesteps
    with torch.no_grad():
        target = block(x, timestep=t, class_labels=y)
    data = BlockData(block, 0, (x, t, y, target), (x[:4], t[:4], y[:4], target[:4]), torch.device("cpu"), seed=0)
    before = copy.deepcopy(block)
    PTQ4DiT(UniformPreset(bits=8), ActPreset(bits=8)).transform_block(data)
    with torch.no_grad():
        assert _relative(block(x, timestep=t, class_labels=y), target) < 1e-5
    # qkv's input channels now peak at sqrt(s_X * s_W) of the timestep-weighted salience: closer together
    peaks = {}
    for tag, b in (("before", before), ("after", block)):
        h = b.attn1.to_q.register_forward_pre_hook(
            lambda _, a, tag=tag: peaks.__setitem__(tag, a[0].abs().amax((0, 1))))
        with torch.no_grad():
            b(x, timestep=t, class_labels=y)
        h.remove()
    spread = lambda v: (v.max() / v.min()).item()  # noqa: E731
    assert spread(peaks["after"]) < spread(peaks["before"])


def test_adaround_starts_at_the_weight_and_hardens_on_the_start_grid():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24)
    start = UniformLinear.from_linear(linear, 4, 16, False)
    soft = AdaRoundLinear(linear.weight, start)
    w, ws = linear.weight.detach(), soft.weight().detach()
    lo = (0 - soft.zero) * soft.scale
    hi = (soft.high - soft.zero) * soft.scale
    inside = (w > lo + soft.scale) & (w < hi - soft.scale)
    torch.testing.assert_close(ws[inside], w[inside], atol=1e-3 * w.abs().max().item(), rtol=0)
    hard = soft.to_hard()
    assert torch.equal(hard.scale, start.scale) and torch.equal(hard.zero, start.zero)
    frac = (w / soft.scale) - (w / soft.scale).floor()
    clear = (frac - 0.5).abs() > 0.01  # away from ties, hardening the start is round-to-nearest
    assert torch.equal(hard.codes[clear], start.codes[clear])
    with torch.no_grad():
        soft.alpha.fill_(50.0)  # every offset 1: every weight rounded up
    assert torch.equal(soft.to_hard().codes.float(), (soft.floor + 1 + soft.zero).clamp(0, 15))


def test_a_block_without_adaln_zero_is_refused():
    linears = {"norm1.linear": torch.nn.Linear(64, 128), **{n: torch.nn.Linear(64, 64) for ns in BALANCED.values()
                                                             for n in ns}}
    assert "adaLN-Zero" in check_foldable(linears)
    method = PTQ4DiT(UniformPreset(bits=8), ActPreset(bits=8))
    with pytest.raises(UserError, match="method=ptq4dit cannot fold .*adaLN-Zero") as err:
        method.check({**linears, "ff.net.2": torch.nn.Linear(256, 64)})
    assert "\n" not in str(err.value)
