"""Bit-packing of integer codes (VQ codes, uniform codes and zero points), so a b-bit code costs exactly b bits: on
disk and, since deployed layers hold their codes packed, in memory.

The stream is little-endian: bit j of code i is stream bit i * bits + j, and stream bit s is bit s % 8 of byte
s // 8. Codes of at most 8 bits fill whole runs of bytes (`run_layout`: 3 bytes hold 8 codes of 3 bits or 4 of 6), and
a run is unpacked with one table lookup per byte (`unpack_runs`): each byte value gives, for every code of its run,
the bits it holds of that code, in that code's byte of a machine word, and a run's codes are the sum of its bytes'
words (their bits never overlap). That is a few gathers and adds over whole tensors, fast enough for the decode of
a tile in every forward (quant/decode.py); bitwise shifts, slower on a CPU, are only used to pack. Wider codes go
bit by bit, looping over the (at most 31) bit positions, never over codes, holding one byte per stream bit.
"""

import math
import sys
from functools import cache

import torch

MAX_BITS = 31  # codes are held in int32 once unpacked
_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def code_bits(k: int) -> int:
    """Bits per code for a k-codeword codebook: ceil(log2 k), at least 1."""
    if k < 1:
        raise ValueError(f"codebook size k={k} must be at least 1")
    return max(1, (k - 1).bit_length())


def smallest_code_dtype(k: int) -> torch.dtype:
    """Smallest integer dtype that holds codes 0..k-1; int16 rather than uint16 because torch lacks uint16 ops."""
    bits = code_bits(k)
    if bits > MAX_BITS:
        raise ValueError(f"codebook size k={k} needs {bits} bits per code; at most {MAX_BITS} are supported")
    return torch.uint8 if bits <= 8 else torch.int16 if bits <= 15 else torch.int32


def run_layout(bits: int) -> tuple[int, int] | None:
    """(bytes, codes) of the shortest run of whole bytes that holds whole `bits`-bit codes (1 byte for 4 codes of 2
    bits, 3 bytes for 8 codes of 3 bits), for codes of at most 8 bits; None for wider ones."""
    if bits > 8 or sys.byteorder != "little":  # a word's bytes are the codes' in order on little-endian machines
        return None
    run_bits = math.lcm(bits, 8)
    return run_bits // 8, run_bits // bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """A uint8 tensor of exactly ceil(len(codes) * bits / 8) bytes holding the 1-D integer `codes`."""
    _check_bits(bits)
    if codes.dim() != 1 or codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be a 1-D integer tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
    if codes.numel():
        low, high = (v.item() for v in codes.aminmax())
        if low < 0 or high >= 1 << bits:
            bad = low if low < 0 else high
            raise ValueError(f"code {bad} does not fit in {bits} bits (valid codes: 0..{(1 << bits) - 1})")
    if bits == 8:  # the stream is the codes' own bytes
        return codes.to(torch.uint8)
    n_bytes = math.ceil(len(codes) * bits / 8)
    layout = run_layout(bits)
    if layout is not None:
        run_bytes, per_run = layout
        packed = torch.empty(-(-len(codes) // per_run) * run_bytes, dtype=torch.uint8, device=codes.device)
        shifts = torch.arange(0, bits * per_run, bits, device=codes.device)
        step = per_run << 20  # codes a chunk: int64 temporaries of 8 MiB, whatever the layer
        for start in range(0, len(codes), step):
            chunk = codes[start:start + step].long()
            if len(chunk) % per_run:  # the last run, completed with zero codes
                chunk = torch.cat([chunk, chunk.new_zeros(per_run - len(chunk) % per_run)])
            words = (chunk.view(-1, per_run) << shifts).sum(1)  # the codes' bit fields are disjoint: sum = or
            first = start // per_run * run_bytes
            packed[first:first + len(words) * run_bytes].view(-1, run_bytes).copy_(
                words.view(torch.uint8).view(-1, 8)[:, :run_bytes])
        return packed[:n_bytes].clone() if len(packed) > n_bytes else packed
    codes = codes.to(smallest_code_dtype(1 << bits))
    stream = torch.zeros(n_bytes * 8, dtype=torch.uint8, device=codes.device)  # one byte per bit, zero padded
    code_bits_view = stream[:len(codes) * bits].view(len(codes), bits)
    for j in range(bits):
        code_bits_view[:, j] = (codes >> j) & 1
    stream = stream.view(n_bytes, 8)
    packed = torch.zeros(n_bytes, dtype=torch.uint8, device=codes.device)
    for j in range(8):
        packed |= stream[:, j] << j
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, count: int, start: int = 0) -> torch.Tensor:
    """Codes start..start + count - 1 of a `pack_codes` stream, in `smallest_code_dtype(2 ** bits)`."""
    _check_bits(bits)
    n_bytes = math.ceil((start + count) * bits / 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or len(packed) < n_bytes:
        raise ValueError(f"packed must be 1-D uint8 with at least {n_bytes} bytes for {start + count} {bits}-bit "
                         f"codes, got {packed.dtype} of shape {tuple(packed.shape)}")
    if bits == 8:
        return packed[start:start + count].clone()
    layout = run_layout(bits)
    if layout is None:
        return _unpack_bitwise(packed, bits, start, count).to(smallest_code_dtype(1 << bits))
    run_bytes, per_run = layout
    first, last = start // per_run, -(-(start + count) // per_run)
    runs = packed[first * run_bytes:last * run_bytes]
    if len(runs) < (last - first) * run_bytes:  # the stream's last run is cut short: zero bytes complete it
        runs = torch.cat([runs, runs.new_zeros((last - first) * run_bytes - len(runs))])
    codes = unpack_runs(runs.view(-1, run_bytes), bits).view(torch.uint8)
    skip = start - first * per_run
    return codes[skip:skip + count].clone() if skip or len(codes) > count else codes


def unpack_runs(runs: torch.Tensor, bits: int, words: torch.Tensor | None = None, index: torch.Tensor | None = None,
                parts: torch.Tensor | None = None) -> torch.Tensor:
    """The codes of `runs` ((n, run bytes) uint8, `run_layout(bits)`) as `words` (n machine words of a byte per code
    of a run; view them as uint8 for the codes in order): one table lookup per byte, the lookups of a run summed.
    `index` (run bytes, n) int32 and `parts` (run bytes, n) words are scratch; each is allocated when not given."""
    run_bytes, per_run = run_layout(bits)
    tables = _run_tables(bits, runs.device)  # (run bytes x 256) words, table k at rows 256 k
    n = len(runs)
    if words is None:
        words = torch.empty(n, dtype=tables.dtype, device=runs.device)
    if index is None:
        index = torch.empty(run_bytes, n, dtype=torch.int32, device=runs.device)
    if run_bytes == 1:
        index.view(-1).copy_(runs.view(-1))
        return torch.index_select(tables, 0, index.view(-1), out=words)
    index.copy_(runs.t())  # byte k of every run in row k (one add with a type promotion is 4x slower on a CPU)
    index.add_(_table_offsets(run_bytes, runs.device))  # + 256 k: row k looks up table k
    if parts is None:
        parts = torch.empty(run_bytes, n, dtype=tables.dtype, device=runs.device)
    torch.index_select(tables, 0, index.view(-1), out=parts.view(-1))
    return torch.sum(parts, 0, dtype=tables.dtype, out=words)  # the bytes of the words never carry: sum = or


@cache
def _table_offsets(run_bytes: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 256 * run_bytes, 256, dtype=torch.int32, device=device)[:, None]


@cache
def _run_tables(bits: int, device: torch.device) -> torch.Tensor:
    """(run bytes x 256) words of `codes a run` bytes: entry 256 k + v holds in its byte j the bits that value v of
    a run's byte k gives the run's code j, in their place in that code."""
    run_bytes, per_run = run_layout(bits)
    values = torch.arange(256)
    tables = torch.zeros(run_bytes, 256, per_run, dtype=torch.uint8)
    for k in range(run_bytes):
        for j in range(per_run):
            low, high = max(bits * j, 8 * k), min(bits * (j + 1), 8 * (k + 1))  # stream bits of code j in byte k
            if low < high:
                field = (values >> (low - 8 * k)) & ((1 << (high - low)) - 1)
                tables[k, :, j] = field << (low - bits * j)
    return tables.view(_WORDS[per_run]).view(-1).to(device)


def _unpack_bitwise(packed: torch.Tensor, bits: int, start: int, count: int) -> torch.Tensor:
    """Codes start..start + count - 1 (int32), bit by bit."""
    first_bit = start * bits
    first, stop = first_bit // 8, math.ceil((first_bit + count * bits) / 8)
    stream = torch.empty(stop - first, 8, dtype=torch.uint8, device=packed.device)
    for j in range(8):
        stream[:, j] = (packed[first:stop] >> j) & 1
    skip = first_bit - 8 * first
    code_bits_view = stream.view(-1)[skip:skip + count * bits].view(count, bits)
    codes = torch.zeros(count, dtype=torch.int32, device=packed.device)
    for j in range(bits):
        codes |= code_bits_view[:, j].to(torch.int32) << j
    return codes


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits} must be between 1 and {MAX_BITS}")
