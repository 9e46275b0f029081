"""Bit-packing of VQ codes, so a k-codeword layer stores exactly ceil(log2 k) bits per code on disk.

The stream is little-endian: bit j of code i is stream bit i * bits + j, and stream bit s is bit s % 8 of byte
s // 8. Both directions loop over the (at most 31) bit positions, never over codes, and hold one byte per stream
bit at most, so ~10M codes need a few hundred MB at worst.
"""

import math

import torch

MAX_BITS = 31  # codes are held in int32 once unpacked


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
    codes = codes.to(smallest_code_dtype(1 << bits))
    n_bytes = math.ceil(len(codes) * bits / 8)
    stream = torch.zeros(n_bytes * 8, dtype=torch.uint8, device=codes.device)  # one byte per bit, zero padded
    code_bits_view = stream[:len(codes) * bits].view(len(codes), bits)
    for j in range(bits):
        code_bits_view[:, j] = (codes >> j) & 1
    stream = stream.view(n_bytes, 8)
    packed = torch.zeros(n_bytes, dtype=torch.uint8, device=codes.device)
    for j in range(8):
        packed |= stream[:, j] << j
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` codes of a `pack_codes` stream, in `smallest_code_dtype(2 ** bits)`."""
    _check_bits(bits)
    n_bytes = math.ceil(count * bits / 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or len(packed) < n_bytes:
        raise ValueError(f"packed must be 1-D uint8 with at least {n_bytes} bytes for {count} {bits}-bit codes, "
                         f"got {packed.dtype} of shape {tuple(packed.shape)}")
    if bits == 8:
        return packed[:count].clone()
    stream = torch.empty(n_bytes, 8, dtype=torch.uint8, device=packed.device)
    for j in range(8):
        stream[:, j] = (packed[:n_bytes] >> j) & 1
    code_bits_view = stream.view(-1)[:count * bits].view(count, bits)
    dtype = smallest_code_dtype(1 << bits)
    codes = torch.zeros(count, dtype=dtype, device=packed.device)
    for j in range(bits):
        codes |= code_bits_view[:, j].to(dtype) << j
    return codes


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits} must be between 1 and {MAX_BITS}")
