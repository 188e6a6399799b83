from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_freqcompress.packing import _CHUNK, bits_for, pack_bits, packed_size, unpack_bits


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7, 8, 11, 16, 24, 32])
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1001])
def test_round_trip_is_exact_and_tightly_sized(bits, count):
    generator = torch.Generator().manual_seed(bits * 1000 + count)
    values = torch.randint(0, 1 << bits, (count,), generator=generator, dtype=torch.int64)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(count, bits) == (count * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, count), values)


def test_bit_layout_is_little_endian_lsb_first():
    # 1 -> bits (1,0), 2 -> (0,1), 3 -> (1,1): stream 1,0,0,1,1,1 -> 0b111001
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [0b111001]
    assert pack_bits(torch.tensor([5]), 3).tolist() == [5]
    assert pack_bits(torch.tensor([1, 1]), 7).tolist() == [1 + 128, 0]  # the second value starts at bit 7


def test_byte_aligned_widths_match_plain_integer_arrays():
    values = torch.arange(0, 1000, 3, dtype=torch.int64)
    assert pack_bits(values % 256, 8).numpy().tobytes() == (values % 256).numpy().astype(np.uint8).tobytes()
    assert pack_bits(values * 60, 16).numpy().tobytes() == (values * 60).numpy().astype("<u2").tobytes()


def test_chunk_boundaries_round_trip():
    count = _CHUNK + 13
    values = torch.arange(count, dtype=torch.int64) % 5
    assert torch.equal(unpack_bits(pack_bits(values, 3), 3, count), values)


def test_bits_for():
    assert [bits_for(k) for k in (1, 2, 3, 4, 5, 255, 256, 257, 65536)] == [1, 1, 2, 2, 3, 8, 8, 9, 16]


def test_errors_are_clear():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_bits(torch.tensor([-1]), 2)
    with pytest.raises(TypeError, match="integer"):
        pack_bits(torch.tensor([1.0]), 2)
    with pytest.raises(ValueError, match="bits per value"):
        pack_bits(torch.tensor([1]), 0)
    with pytest.raises(ValueError, match="truncated"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, 8)
    with pytest.raises(TypeError, match="uint8"):
        unpack_bits(torch.zeros(3, dtype=torch.int32), 3, 8)


def test_unpack_at_a_bit_offset_reads_the_second_of_two_sequences():
    generator = torch.Generator().manual_seed(0)
    for (bits_a, count_a), (bits_b, count_b) in [((1, 13), (6, 40)), ((3, 7), (5, 100)), ((8, 3), (8, 5))]:
        first = torch.randint(0, 2**bits_a, (count_a,), generator=generator)
        second = torch.randint(0, 2**bits_b, (count_b,), generator=generator)
        stream = torch.cat([unpack_bits(pack_bits(first, bits_a), 1, count_a * bits_a),
                            unpack_bits(pack_bits(second, bits_b), 1, count_b * bits_b)])
        packed = pack_bits(stream, 1)
        assert torch.equal(unpack_bits(packed, bits_b, count_b, offset=count_a * bits_a), second)
        with pytest.raises(ValueError, match="truncated"):
            unpack_bits(packed[:-1], bits_b, count_b, offset=count_a * bits_a)
