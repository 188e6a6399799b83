from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hf_freqcompress.hashing import bucket_of, chunk_slices, chunk_tables, floor_divide, hash32, hash_bits, layer_key, sign_bit
from hf_freqcompress.methods.hashednets import fold_signed

MASK = 0xFFFFFFFF


def reference_mix(x: int) -> int:
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & MASK
    return (x >> 16) ^ x


def reference_hash(index: int, key: int) -> int:
    return reference_mix(reference_mix((index >> 32) ^ key) ^ (index & MASK))


def test_hash32_matches_pure_python_reference_including_64_bit_indices():
    indices = [0, 1, 2, 12345, 2**31 - 1, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3]
    for key in (0, 1, 0xDEADBEEF):
        got = hash32(torch.tensor(indices, dtype=torch.int64), key).tolist()
        assert got == [reference_hash(i, key) for i in indices]


def test_hash_is_uniform_and_signs_balanced():
    hashed = hash32(torch.arange(200_000), layer_key(0, "layer", "index"))
    buckets = bucket_of(hashed, 100)
    counts = torch.bincount(buckets, minlength=100).double()
    assert buckets.min() >= 0 and buckets.max() < 100
    # chi-square with 99 dof: mean 99, sd ~14; a broken hash is off by orders of magnitude
    chi2 = float(((counts - 2000) ** 2 / 2000).sum())
    assert chi2 < 200
    assert abs(float(sign_bit(hashed).double().mean()) - 0.5) < 0.01


def test_index_and_sign_hashes_are_independent():
    index = torch.arange(100_000)
    keys = torch.tensor(layer_key(0, "w", "index")), torch.tensor(layer_key(0, "w", "sign"))
    folded = fold_signed(index, index, *keys, torch.tensor(2))
    joint = torch.bincount(folded, minlength=4).double() / index.numel()
    assert torch.allclose(joint, torch.full((4,), 0.25, dtype=torch.float64), atol=0.01)


def test_hash_bits_are_hash32_below_2_32_for_int_and_tensor_keys():
    index = torch.cat([torch.arange(1000), torch.tensor([2**31 - 1, 2**31, 2**32 - 1])])
    for key in (0, 7, 0xDEADBEEF):
        expected = hash32(index, key)
        assert hash_bits(index, key).dtype == torch.int32
        assert torch.equal(hash_bits(index, key).long() & MASK, expected)
        assert torch.equal(hash_bits(index, torch.tensor(key)).long() & MASK, expected)
        assert torch.equal(bucket_of(hash_bits(index, key), 97), bucket_of(expected, 97))
        assert torch.equal(sign_bit(hash_bits(index, key)), sign_bit(expected))


GOLDEN_LAYER_KEYS = {(0, "fc.weight", "index"): 2275634310, (7, "features.0.weight", "sign"): 2966124632,
                     (123456789, "a.b.c.weight", "index3"): 1051190339}
GOLDEN_HASH32 = {  # hash32([0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40 + 3], key)
    0: [0, 824515495, 1722258072, 1747545881, 3192437470, 1029333365, 539527247, 379550018, 187353171],
    0xDEADBEEF: [1148367058, 3714726861, 1625678284, 2098267516, 1568291893, 2404810588, 4214123531, 443137039,
                 4108458105],
}


def test_golden_values_pin_every_saved_checkpoint():
    """Checkpoints store no index: changing these values would silently corrupt every one ever saved."""
    assert {args: layer_key(*args) for args in GOLDEN_LAYER_KEYS} == GOLDEN_LAYER_KEYS
    index = torch.tensor([0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40 + 3])
    assert {key: hash32(index, key).tolist() for key in GOLDEN_HASH32} == GOLDEN_HASH32


def test_layer_key_depends_on_every_part():
    keys = {layer_key(s, n, r) for s in (0, 1) for n in ("a.weight", "b.weight") for r in ("index", "sign")}
    assert len(keys) == 8
    assert all(0 <= k <= MASK for k in keys)


def test_hash_identical_in_a_fresh_process():
    code = (
        "import torch; from hf_freqcompress.hashing import hash32, layer_key;"
        "print(','.join(map(str, hash32(torch.arange(5000), layer_key(7, 'l.weight', 'index')).tolist())))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ",".join(map(str, hash32(torch.arange(5000), layer_key(7, "l.weight", "index")).tolist()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hash_identical_on_cuda():
    index = torch.arange(100_000)
    assert torch.equal(hash32(index, 3), hash32(index.cuda(), 3).cpu())
    assert torch.equal(hash_bits(index, torch.tensor(3)), hash_bits(index.cuda(), torch.tensor(3).cuda()).cpu())


def test_bad_inputs():
    with pytest.raises(TypeError, match="int64"):
        hash32(torch.arange(3, dtype=torch.int32), 1)
    with pytest.raises(ValueError, match="bucket count"):
        bucket_of(torch.arange(3), 0)


def test_floor_divide_is_integer_division_without_dividing():
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randint(0, 2**33, (100_000,), generator=generator), torch.arange(0, 5000)])
    for divisor in (1, 3, 7, 9, 49, 65536, 1_000_003, 2**31 - 1):
        quotient = floor_divide(x, torch.tensor(divisor), torch.tensor(1.0 / divisor, dtype=torch.float64))
        assert torch.equal(quotient, x // divisor)
    multiples = torch.arange(1, 10_000) * 9  # exact multiples: where a float quotient would round either way
    assert torch.equal(floor_divide(multiples, torch.tensor(9), torch.tensor(1 / 9, dtype=torch.float64)), multiples // 9)


def test_chunk_tables_list_every_chunk_slice():
    chunk, first, count = chunk_tables(240, 37, 64)
    expected_first, expected_count = chunk_slices(torch.arange(240), 240, 37, 64)
    for position in range(240):
        assert first[position // chunk] == expected_first[position] and count[position // chunk] == expected_count[position]

