import math

import numpy as np
import pytest
import torch

from vq4dit.quant.packing import code_bits, pack_codes, smallest_code_dtype, unpack_codes


@pytest.mark.parametrize("k,bits", [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (64, 6), (256, 8), (257, 9),
                                    (4096, 12), (65536, 16), (65537, 17)])
def test_code_bits(k, bits):
    assert code_bits(k) == bits


@pytest.mark.parametrize("k,dtype", [(2, torch.uint8), (256, torch.uint8), (257, torch.int16),
                                     (1 << 15, torch.int16), ((1 << 15) + 1, torch.int32), (1 << 20, torch.int32)])
def test_smallest_code_dtype(k, dtype):
    assert smallest_code_dtype(k) == dtype


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16])
@pytest.mark.parametrize("count", [1, 13, 1001])
def test_round_trip_takes_exactly_its_bits(bits, count):
    codes = torch.randint(0, 1 << bits, (count,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and len(packed) == math.ceil(count * bits / 8)
    unpacked = unpack_codes(packed, bits, count)
    assert unpacked.dtype == smallest_code_dtype(1 << bits)
    assert torch.equal(unpacked.long(), codes)


@pytest.mark.parametrize("bits", [3, 6, 12])
def test_layout_is_a_little_endian_bit_stream(bits):
    """Bit j of code i is stream bit i * bits + j: numpy's little-endian packbits of the same bits."""
    codes = torch.randint(0, 1 << bits, (77,), generator=torch.Generator().manual_seed(0))
    stream = (codes.numpy()[:, None] >> np.arange(bits)) & 1
    expected = np.packbits(stream.astype(np.uint8).ravel(), bitorder="little")
    assert np.array_equal(pack_codes(codes, bits).numpy(), expected)
    assert pack_codes(torch.tensor([1, 2, 3]), 2).tolist() == [0b111001]


def test_accepts_every_integer_dtype():
    codes = torch.tensor([0, 200, 255, 7])
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        assert torch.equal(pack_codes(codes.to(dtype), 8), pack_codes(codes, 8))


def test_code_too_large_or_negative_raises():
    with pytest.raises(ValueError, match="code 8 does not fit in 3 bits"):
        pack_codes(torch.tensor([1, 8, 2]), 3)
    with pytest.raises(ValueError, match="code -1 does not fit"):
        pack_codes(torch.tensor([1, -1]), 3)


def test_short_stream_raises():
    with pytest.raises(ValueError, match="at least 2 bytes"):
        unpack_codes(torch.zeros(1, dtype=torch.uint8), 4, 3)


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 6, 7, 9, 12])
def test_any_stretch_of_codes_unpacks_alone(bits):
    """A tile's codes start anywhere in the stream: inside a run of bytes, inside a byte, at the cut-short end."""
    codes = torch.randint(0, 1 << bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    for start, count in ((0, 1001), (1, 17), (8, 64), (13, 988), (1000, 1)):
        assert torch.equal(unpack_codes(packed, bits, count, start).long(), codes[start:start + count])
