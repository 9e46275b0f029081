"""The soft VQ weight's hand-written autograd (quant/soft_mix.py) against plain autograd in float64: values and
gradients of the mixed weight, the ratios and the regulariser, for every candidate count and sub-vector width."""

import pytest
import torch

from vq4dit.quant.soft_mix import candidate_ratios, gather_codes, ratio_penalty, soft_mix, sum_by_index


def reference(logits, codebook, candidates, form):
    ratios = logits.softmax(dim=0)
    mixed = (ratios[..., None] * codebook[candidates]).sum(0)
    penalty = (1 - (2 * ratios - 1).abs()).mean() if form == "paper" else len(ratios) * (ratios * (1 - ratios)).mean()
    return mixed, ratios, penalty


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("d", [1, 2, 4])
@pytest.mark.parametrize("form", ["paper", "code"])
def test_soft_mix_matches_autograd(n, d, form):
    g = torch.Generator().manual_seed(n * 10 + d)
    k, count = 7, 300
    logits = torch.randn(n, count, generator=g, dtype=torch.float64)
    logits[:, :4] = 0  # ties: ratios exactly 1/n, where |2r - 1|'s gradient is 0 at n = 2
    codebook = torch.randn(k, d, generator=g, dtype=torch.float64)
    candidates = torch.randint(0, k, (n, count), generator=g, dtype=torch.int32)  # as SoftVQLinear holds them
    upstream = torch.randn(count, d, generator=g, dtype=torch.float64)
    results = []
    for fn in (lambda lg, cb: (*soft_mix(lg, cb, candidates)[:1], ratio_penalty(soft_mix(lg, cb, candidates)[1], form)),
               lambda lg, cb: (lambda m, r, p: (m, p))(*reference(lg, cb, candidates, form))):
        lg, cb = logits.clone().requires_grad_(), codebook.clone().requires_grad_()
        mixed, penalty = fn(lg, cb)
        ((mixed * upstream).sum() + 3 * penalty).backward()
        results.append((mixed.detach(), penalty.detach(), lg.grad, cb.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs)


def test_soft_mix_one_graph_node_for_weight_and_regulariser():
    """The ratios that the regulariser reads are the mixing node's own output: one backward carries both."""
    logits = torch.randn(2, 50, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    candidates = torch.randint(0, 5, (2, 50))
    assert torch.autograd.gradcheck(lambda lg, cb: soft_mix(lg, cb, candidates), (logits, codebook))


def test_candidate_ratios_are_the_softmax_and_exactly_one_hot_when_saturated():
    logits = torch.randn(2, 1000)
    torch.testing.assert_close(candidate_ratios(logits), logits.softmax(0))
    frozen = torch.tensor([[0.0, -1e4], [-1e4, 0.0]])
    assert torch.equal(candidate_ratios(frozen), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_gather_codes_and_sum_by_index_match_index_add():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    codes = torch.randint(0, 9, (400,), generator=g)
    upstream = torch.randn(400, 3, generator=g, dtype=torch.float64)
    gather_codes(codebook, codes).backward(upstream)
    torch.testing.assert_close(codebook.grad, torch.zeros(9, 3, dtype=torch.float64).index_add_(0, codes, upstream))
    values = torch.randn(400, generator=g)
    torch.testing.assert_close(sum_by_index(codes, values, 12), torch.zeros(12).index_add_(0, codes, values))


def test_ratio_penalty_refuses_unknown_form():
    with pytest.raises(ValueError, match="regularizer='l1'; valid: paper, code"):
        ratio_penalty(torch.full((2, 3), 0.5), "l1")
