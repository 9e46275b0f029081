"""Running a quantized layer: decode its weight tile by tile just before the matmul, or once, to a dense layer.

`decode=per_forward` keeps only what the checkpoint stores resident: codes bit-packed (+ codebook / scales / zero
points). A forward unpacks the codes of a tile (`unpack_tile`: a table lookup per byte, quant/packing.py), decodes
at most `TILE_WEIGHTS` weights at a time into a reused buffer (shared by every layer) and runs the dense layer's own
GEMM on it: the extra memory is one tile for the whole model, never one per layer. A layer that
fits the budget is one tile, one decode + one `F.linear`: every DiT-XL/2 linear does (the largest, adaLN
6912 x 1152, is 7.96 M weights), so 7 tiles a block, 196 a forward. A larger layer is cut into
ceil(out / floor(TILE_WEIGHTS / in)) tiles of whole rows, each GEMM writing straight into its output columns.

Precision is `nn.Linear`'s: the matmul runs in `compute_dtype(x)` (autocast's dtype when autocast is on for the
input's device, else the input's), the tile is decoded straight into that dtype (the same values as casting the
fp32 weight: one rounding) and the output has that dtype, so under `torch.autocast` a quantized model computes in
bf16 / fp16 like the dense one. A VQ tile is one `index_select` of codebook rows after its codes are unpacked
(8-bit codes need no unpacking: the packed stream is the codes); a row of d values
is gathered as one machine word where d x itemsize is 2, 4, 8 or 16 bytes (bf16/fp16 at d=4 is one int64), which
on a CPU is 2-3x faster than gathering d-wide rows.

`decode=once` replaces every quantized layer by a dense `nn.Linear` of the chosen dtype: fp speed, fp memory
(`dense_linear` here; `decode_once`, which walks a model for its quantized layers, in quantized_linear.py).
"""

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from vq4dit.quant.packing import run_layout, unpack_codes, unpack_runs

DECODE_MODES = ("per_forward", "once")
# Weights decoded at a time (8 Mi): the decode buffer is at most 32 MiB in fp32, 16 MiB in bf16/fp16, plus a VQ
# layer's int32 index (4 / d bytes a weight) or a uniform layer's fp32 scratch (non-fp32 tiles only, <= 32 MiB),
# and, for codes under 8 bits, the unpacked codes (a byte a code) and the lookup's scratch (at most 6 bytes a code).
# Chosen from DiT-XL/2's shapes: its largest linear (adaLN, 6912 x 1152 = 7.96 M) fits, so every XL linear is one
# tile; 2^19 (the earlier budget) cut an XL forward into 1,400 tiles (~4,000 decode and GEMM kernels).
TILE_WEIGHTS = 1 << 23
_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}
# The buffers live per thread, device and slot (one byte buffer each, viewed in any dtype and shape) and are shared
# by every layer: a model holds one weight buffer (the largest tile it ran, <= TILE_WEIGHTS) and one of each
# scratch, whatever its number of layers. They are kept between forwards rather than freed, since a fresh 32 MiB
# block per layer costs a CPU 8 k page faults (glibc maps and unmaps blocks that large) and a GPU's caching
# allocator would hold it anyway; `release_workspace()` frees them (a thread's also go when the thread ends).
_buffers = threading.local()
_tile_counters: list["TileCounter"] = []


class TileCounter:
    """Counts the tiles (one decode + one GEMM each) that per-forward layers run while it is active:
    `with TileCounter() as count: model(x)`, then `count.tiles`."""

    def __init__(self):
        self.tiles = 0

    def __enter__(self) -> "TileCounter":
        _tile_counters.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _tile_counters.remove(self)


def _count_tiles(n: int) -> None:
    for counter in _tile_counters:
        counter.tiles += n


def release_workspace() -> None:
    """Free this thread's decode buffers (the next per-forward layer allocates them again)."""
    _buffers.__dict__.pop("pool", None)


def held_buffers() -> dict[tuple[str, torch.device], torch.Tensor]:
    """This thread's decode buffers (bytes), by (slot, device)."""
    return {key: buffer for key, (buffer, _) in getattr(_buffers, "pool", {}).items()}


def workspace(shape: int | tuple[int, ...], dtype: torch.dtype, device: torch.device, slot: str) -> torch.Tensor:
    """A contiguous tensor of `shape` and `dtype` on one byte buffer per slot and device, reused across calls and
    layers (grown, never shrunk). Each view (dtype, shape) is kept too: a layer's forward then asks for its tiles
    without a slicing or viewing op."""
    pool = _buffers.__dict__.setdefault("pool", {})
    key = (slot, device)
    nbytes = (math.prod(shape) if isinstance(shape, tuple) else shape) * dtype.itemsize
    entry = pool.get(key)
    if entry is None or entry[0].numel() < nbytes:
        pool[key] = entry = None  # drop the old buffer (and its views) before the new one is allocated
        pool[key] = entry = (torch.empty(nbytes, dtype=torch.uint8, device=device), {})
    buffer, views = entry
    view = views.get((dtype, shape))
    if view is None:
        view = views[dtype, shape] = buffer[:nbytes].view(dtype).view(shape)
    return view


def unpack_tile(packed: torch.Tensor, bits: int, start: int, count: int, slot: str = "codes") -> torch.Tensor:
    """Codes start..start + count - 1 of a bit-packed stream (quant/packing.py): uint8 in a shared buffer for codes
    of at most 8 bits (the stream itself for 8 bits, else a table lookup per byte where the tile starts and ends on
    a run of bytes), else by the general unpack."""
    if bits == 8:
        return packed if start == 0 and count == len(packed) else packed[start:start + count]
    layout = run_layout(bits)
    if layout is None or start % layout[1] or count % layout[1]:
        return unpack_codes(packed, bits, count, start)
    run_bytes, per_run = layout
    first, last = start // per_run * run_bytes, (start + count) // per_run * run_bytes
    runs = (packed if first == 0 and last == len(packed) else packed[first:last]).view(-1, run_bytes)
    words = _WORDS[per_run]
    return unpack_runs(runs, bits, workspace(count // per_run, words, packed.device, slot),
                       workspace((run_bytes, len(runs)), torch.int32, packed.device, "run bytes"),
                       workspace((run_bytes, len(runs)), words, packed.device, "run parts")).view(torch.uint8)


def gather_rows(table: torch.Tensor, codes: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = table[codes[i]] for the integer `codes` (any width); `out` is (len(codes), d), contiguous."""
    table = table.detach()
    if table.dtype != out.dtype:
        table = table.to(out.dtype)
    index = workspace(len(codes), torch.int32, codes.device, "index")
    index.copy_(codes)
    word = _WORDS.get(table.shape[1] * table.element_size())
    if word is None:
        torch.index_select(table.contiguous(), 0, index, out=out)
    else:  # 1-D: index_select along a 2-D tensor's rows is several times slower on a CPU
        torch.index_select(table.contiguous().view(word).view(-1), 0, index, out=out.view(word).view(-1))


def tile_rows(out_features: int, in_features: int) -> int:
    """Rows of a tile: the whole layer when it has at most TILE_WEIGHTS weights, else as many rows as fit (>= 1)."""
    return max(1, min(out_features, TILE_WEIGHTS // in_features))


def num_tiles(out_features: int, in_features: int) -> int:
    """Tiles (decode + GEMM pairs) a forward of an out x in layer runs."""
    return -(-out_features // tile_rows(out_features, in_features))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype `nn.Linear` runs its matmul in (and returns) for the input `x`: autocast's where autocast is on
    for x's device type and would cast x (floating point, not float64, as autocast's own rule), else x's dtype."""
    kind = x.device.type
    try:
        enabled = torch.is_autocast_enabled(kind)
    except RuntimeError:  # a device type without autocast (meta)
        return x.dtype
    if enabled and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(kind)
    return x.dtype


def decoded_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """F.linear(x, W, bias) with W decoded tile by tile by `layer.decode_rows` (no autograd), in `compute_dtype(x)`:
    under autocast, what an `nn.Linear` holding W computes (its inputs are cast to autocast's dtype here)."""
    out_features, in_features = layer.out_features, layer.in_features
    dtype = compute_dtype(x)
    if x.dtype != dtype:
        x = x.to(dtype)
    bias = layer.bias  # no autograd here: the forward takes dequantize() when a graph is to be recorded
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    rows = tile_rows(out_features, in_features)
    if rows == out_features:  # one tile: the very F.linear an nn.Linear runs (autocast finds its inputs cast)
        w = workspace((out_features, in_features), dtype, x.device, "weight")
        layer.decode_rows(0, out_features, w)
        _count_tiles(1)
        return F.linear(x, w, bias)
    buf = workspace(rows * in_features, dtype, x.device, "weight")
    x2 = x.reshape(-1, in_features)
    y = torch.empty(x2.shape[0], out_features, dtype=dtype, device=x.device)
    _count_tiles(-(-out_features // rows))
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

