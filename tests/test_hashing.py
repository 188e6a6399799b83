from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hf_freqcompress.hashing import bucket_of, hash32, layer_key, sign_bit, signed_buckets, signed_buckets_range

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
    folded = signed_buckets(index, 2, layer_key(0, "w", "index"), layer_key(0, "w", "sign"))
    joint = torch.bincount(folded, minlength=4).double() / index.numel()
    assert torch.allclose(joint, torch.full((4,), 0.25, dtype=torch.float64), atol=0.01)


def test_layer_key_depends_on_every_part():
    keys = {layer_key(s, n, r) for s in (0, 1) for n in ("a.weight", "b.weight") for r in ("index", "sign")}
    assert len(keys) == 8
    assert all(0 <= k <= MASK for k in keys)


def test_range_is_chunk_invariant_and_int32(monkeypatch):
    import hf_freqcompress.hashing as hashing

    whole = signed_buckets_range(10_000, 37, 11, 22)
    monkeypatch.setattr(hashing, "_CHUNK", 999)
    chunked = hashing.signed_buckets_range(10_000, 37, 11, 22)
    assert whole.dtype == torch.int32
    assert torch.equal(whole, chunked)
    assert torch.equal(whole.long(), signed_buckets(torch.arange(10_000), 37, 11, 22))


def test_hash_identical_in_a_fresh_process():
    code = (
        "import torch; from hf_freqcompress.hashing import signed_buckets_range, layer_key;"
        "x = signed_buckets_range(5000, 321, layer_key(7, 'l.weight', 'index'), layer_key(7, 'l.weight', 'sign'));"
        "print(','.join(map(str, x.tolist())))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = signed_buckets_range(5000, 321, layer_key(7, "l.weight", "index"), layer_key(7, "l.weight", "sign"))
    assert out.strip() == ",".join(map(str, here.tolist()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hash_identical_on_cuda():
    cpu = signed_buckets_range(100_000, 1000, 3, 4)
    gpu = signed_buckets_range(100_000, 1000, 3, 4, device="cuda")
    assert torch.equal(cpu, gpu.cpu())


def test_bad_inputs():
    with pytest.raises(TypeError, match="int64"):
        hash32(torch.arange(3, dtype=torch.int32), 1)
    with pytest.raises(ValueError, match="bucket count"):
        bucket_of(torch.arange(3), 0)
