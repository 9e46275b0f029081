"""The two weights a VQ4DiT calibration step builds, as autograd functions with hand-written backwards.

`soft_mix`: every sub-vector's n candidate codewords mixed by the softmax of its logits, (n, S) candidate-major,
into the (S, d) weight; the ratios are its second output, so the regulariser's gradient joins the same node. Inside,
the work is planar, one coordinate of the d at a time: every op runs along the long S axis (a CPU reduces,
multiplies or transposes along a trailing axis of d = 2..4 several times slower). The gathered candidates are kept
for backward (n x S x d floats: the step is memory-bound) and the softmax's backward is ATen's fused kernel.
Figures: benchmarks/step_cost.py, docs/vq4dit.md.

`gather_codes`: the hard weight codebook[codes] once every code is fixed; only the codebook trains.

Both sum the rows' gradients into the small (k, d) codebook in a fixed order (`sum_by_index`): autograd's generic
embedding backward is about 15x slower on a CPU for an index into k <= 4096 rows, and CUDA's atomic index_add_
would make sums depend on scheduling.
"""

import torch


def sum_by_index(index: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """out[i] = sum of values[index == i], (size,), summed in a fixed order: a CPU's bincount is one sequential
    loop; elsewhere (CUDA, meta) index_put_ with accumulate, which on CUDA sorts the indices instead of racing on
    atomics."""
    if values.device.type == "cpu":
        return torch.bincount(index, weights=values, minlength=size).to(values.dtype)
    return values.new_zeros(size).index_put_((index,), values, accumulate=True)


def _codebook_grad(columns: tuple[torch.Tensor, ...], index: torch.Tensor, weights: torch.Tensor | None,
                   k: int) -> torch.Tensor:
    """(k, d): the gradient's coordinates `columns` (d of (S,)), times `weights` (n, S) (one set per candidate),
    summed into the codewords `index` (n * S,) names."""
    sums = [sum_by_index(index, (column.contiguous() if weights is None else weights * column).reshape(-1), k)
            for column in columns]
    return torch.stack(sums, dim=1)


def candidate_ratios(logits: torch.Tensor) -> torch.Tensor:
    """softmax(logits) over the n candidates, (n, S); for n = 2 (the default) as sigmoid(l0 - l1) and its
    complement, 2.5x faster on a CPU than a softmax along a leading axis of 2."""
    if len(logits) != 2:
        return logits.softmax(dim=0)
    first = torch.sigmoid(logits[0] - logits[1])
    return torch.stack([first, 1 - first])


class _SoftMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, codebook: torch.Tensor, candidates: torch.Tensor):
        ratios = candidate_ratios(logits)
        (n, count), d = candidates.shape, codebook.shape[1]
        gathered = codebook.T.contiguous().index_select(1, candidates.reshape(-1)).view(d, n, count)
        mixed = codebook.new_empty(count, d)
        for e in range(d):  # written column by column into the (S, d) weight: a transposing copy costs 5x more
            column = torch.mul(gathered[e, 0], ratios[0], out=mixed[:, e])
            for j in range(1, n):
                column.addcmul_(gathered[e, j], ratios[j])
        ctx.save_for_backward(ratios, gathered, candidates)
        ctx.k = len(codebook)
        return mixed, ratios

    @staticmethod
    def backward(ctx, grad: torch.Tensor, grad_ratios: torch.Tensor | None):
        ratios, gathered, candidates = ctx.saved_tensors
        columns = grad.unbind(1)  # strided views of the (S, d) gradient, one per coordinate
        grad_logits = grad_codebook = None
        if ctx.needs_input_grad[0]:
            through_mix = gathered[0] * columns[0]  # (n, S): each candidate's dot product with the gradient
            for e in range(1, len(columns)):
                through_mix.addcmul_(gathered[e], columns[e])
            if grad_ratios is not None:
                through_mix += grad_ratios
            grad_logits = torch._softmax_backward_data(through_mix, ratios, 0, ratios.dtype)
        if ctx.needs_input_grad[1]:
            grad_codebook = _codebook_grad(columns, candidates.reshape(-1), ratios, ctx.k)
        return grad_logits, grad_codebook, None


def soft_mix(logits: torch.Tensor, codebook: torch.Tensor,
             candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed (S, d), ratios (n, S)): the ratios softmax(logits) over each sub-vector's n `candidates`, and the
    candidates' codewords mixed by them; differentiable in logits (through both outputs) and codebook."""
    return _SoftMix.apply(logits.to(codebook.dtype), codebook, candidates)


class _RatioPenalty(torch.autograd.Function):
    """The regulariser pushing every ratio to 0 or 1, with its closed-form gradient (one pass each way)."""

    @staticmethod
    def forward(ctx, ratios: torch.Tensor, form: str) -> torch.Tensor:
        ctx.save_for_backward(ratios)
        ctx.form = form
        count = ratios.numel()
        if form == "paper":  # mean(1 - |2r - 1|) = 1 - 2 mean|r - 1/2|
            return 1 - 2 * torch.dist(ratios, ratios.new_tensor(0.5), p=1) / count
        flat = ratios.reshape(-1)  # code: n * mean(r (1 - r))
        return len(ratios) * (flat.sum() - torch.dot(flat, flat)) / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ratios,) = ctx.saved_tensors
        count = ratios.numel()
        if ctx.form == "paper":  # d/dr = -2 sign(r - 1/2) / N; sign(0) = 0 as autograd's abs has it
            return torch.sign(ratios - 0.5).mul_(-2 * grad / count), None
        return (1 - 2 * ratios).mul_(len(ratios) * grad / count), None


def ratio_penalty(ratios: torch.Tensor, form: str) -> torch.Tensor:
    """paper: mean(1 - |2r - 1|); code (the released code): n * mean(r (1 - r)), over ratios (n, S)."""
    if form not in ("paper", "code"):
        raise ValueError(f"regularizer={form!r}; valid: paper, code")
    return _RatioPenalty.apply(ratios, form)


class _GatherCodes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(codes)
        ctx.k = len(codebook)
        return codebook.index_select(0, codes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (codes,) = ctx.saved_tensors
        return _codebook_grad(grad.unbind(1), codes, None, ctx.k), None


def gather_codes(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """codebook[codes] (S, d), differentiable in the codebook."""
    return _GatherCodes.apply(codebook, codes)
