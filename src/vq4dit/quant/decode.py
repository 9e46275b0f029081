"""Running a quantized layer: decode its weight tile by tile just before the matmul, or once, to a dense layer.

`decode=per_forward` keeps only codes (+ codebook / scales) resident. A forward decodes at most `TILE_WEIGHTS`
weights at a time into a reused buffer (one per thread, device and dtype, shared by every layer) and runs a dense
GEMM on each tile, writing straight into its columns of the output: the extra memory is one tile, not one layer,
and the GEMM is the dense layer's own kernel. A VQ tile is one `index_select` of codebook rows; a row of d values
is gathered as one machine word where d x itemsize is 2, 4, 8 or 16 bytes (bf16/fp16 at d=4 is one int64), which
on a CPU is 2-3x faster than gathering d-wide rows.

`decode=once` replaces every quantized layer by a dense `nn.Linear` of the chosen dtype: fp speed, fp memory.
"""

import threading

import torch
import torch.nn.functional as F
from torch import nn

from vq4dit.quant.act_quantizer import attach_input_quantizer, input_quantizer_of

DECODE_MODES = ("per_forward", "once")
TILE_WEIGHTS = 1 << 19  # weights decoded at a time: 2 MiB in fp32, 1 MiB in bf16/fp16 (+ 4 bytes a code of index)
_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}
_buffers = threading.local()


def workspace(numel: int, dtype: torch.dtype, device: torch.device, slot: str) -> torch.Tensor:
    """A flat buffer of at least `numel` elements, reused across calls and layers (grown, never shrunk)."""
    pool = _buffers.__dict__.setdefault("pool", {})
    key = (slot, dtype, device)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        pool[key] = buf = None  # drop the old buffer before the new one is allocated
        pool[key] = buf = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def gather_rows(table: torch.Tensor, codes: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = table[codes[i]] for the integer `codes` (any width); `out` is (len(codes), d), contiguous."""
    table = table.detach().to(out.dtype).contiguous()
    index = workspace(len(codes), torch.int32, codes.device, "index")
    index.copy_(codes)
    word = _WORD.get(table.shape[1] * table.element_size())
    if word is None:
        torch.index_select(table, 0, index, out=out)
    else:
        torch.index_select(table.view(word).view(-1), 0, index, out=out.view(word).view(-1))


def tile_rows(out_features: int, in_features: int) -> int:
    return max(1, min(out_features, TILE_WEIGHTS // in_features))


def decoded_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """F.linear(x, W, bias) with W decoded tile by tile by `layer.decode_rows` (no autograd)."""
    out_features, in_features = layer.out_features, layer.in_features
    bias = None if layer.bias is None else layer.bias.detach().to(x.dtype)
    rows = tile_rows(out_features, in_features)
    buf = workspace(rows * in_features, x.dtype, x.device, "weight")
    if rows == out_features:
        w = buf.view(out_features, in_features)
        layer.decode_rows(0, out_features, w)
        return F.linear(x, w, bias)
    x2 = x.reshape(-1, in_features)
    y = torch.empty(x2.shape[0], out_features, dtype=x.dtype, device=x.device)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        w = buf[: (stop - start) * in_features].view(stop - start, in_features)
        layer.decode_rows(start, stop, w)
        if bias is None:
            torch.mm(x2, w.t(), out=y[:, start:stop])
        else:
            torch.addmm(bias[start:stop], x2, w.t(), out=y[:, start:stop])
    return y.view(*x.shape[:-1], out_features)


def dense_linear(layer, dtype: torch.dtype) -> nn.Linear:
    """The `nn.Linear` a quantized layer stands for, decoded tile by tile into its weight."""
    device = layer.bias.device if layer.bias is not None else next(layer.buffers()).device
    with torch.device("meta"):
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    weight = torch.empty(layer.out_features, layer.in_features, dtype=dtype, device=device)
    rows = tile_rows(layer.out_features, layer.in_features)
    for start in range(0, layer.out_features, rows):
        layer.decode_rows(start, min(start + rows, layer.out_features), weight[start:start + rows])
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return linear


def decode_once(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized layer of `model` by its dense `nn.Linear` (default dtype: the bias's, else fp32),
    one layer at a time, so the peak is the dense model plus one layer's codes."""
    from vq4dit.quant.quantized_linear import QuantizedLinear

    names = [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name in names:
        layer = model.get_submodule(name)
        chosen = dtype or (layer.bias.dtype if layer.bias is not None else torch.float32)
        parent, _, child = name.rpartition(".")
        # the dense layer keeps the quantized one's activation quantizer: decoding changes how, not what, it computes
        dense = attach_input_quantizer(layer.to_dense(chosen), input_quantizer_of(layer))
        setattr(model.get_submodule(parent) if parent else model, child, dense)
    return model
