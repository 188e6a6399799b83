"""methods/index.py: hashed indices evaluated on demand, compiled or eager, equal to the cached index bit for bit."""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch
from torch import nn

from hf_freqcompress import compress
from hf_freqcompress.hashing import chunk_tables
from hf_freqcompress.methods import index
from hf_freqcompress.methods.freshnets import fold_bands
from hf_freqcompress.methods.hashednets import fold_signed, fold_signed_local
from hf_freqcompress.methods.index import CachedIndex, HashedIndex

GOLDEN_INDEX_DIGESTS = {
    # sha256[:16] of the folded index (int64 bytes) of each layout, as saved checkpoints were built with it
    "hashednets": ("linear", {}, "8f9491a55e32cc33"),
    "hashednets_local": ("linear", {"locality": 100}, "2b37a95c3e1f7369"),
    "hashednets_tiled": ("linear", {"block_size": 16}, "d7b7abb5e9071eb5"),
    "hashednets_patterns": ("linear", {"block_size": 16, "sign_patterns": 4}, "a6ac6988f38a613a"),
    "freshnets": ("conv", {}, "826147012d20108c"),
    "freshnets_local": ("conv", {"locality": 60}, "8991afce85d541c2"),
    "funhash": ("linear", {"num_hashes": 3, "reconstruction": "linear"}, "c2a683bc2b9fd8af"),
}


def _folded(layer: nn.Module) -> torch.Tensor:
    parametrization = layer.parametrizations.weight[0]
    if hasattr(parametrization, "hashes"):  # funhash: one index per hash
        return torch.stack([parametrization._source(u).materialize(None) for u in range(parametrization.hashes)])
    return parametrization.index_source().materialize(None)


@pytest.mark.parametrize("case", sorted(GOLDEN_INDEX_DIGESTS))
def test_every_layout_hashes_to_its_golden_index(case):
    """Checkpoints store no index: these values must never change, or every saved model would change."""
    kind, options, expected = GOLDEN_INDEX_DIGESTS[case]
    layer = nn.Linear(60, 40) if kind == "linear" else nn.Conv2d(6, 8, (5, 3))
    compress(nn.Sequential(layer), budget=97, exclude=[], seed=5, method={"method": case.split("_")[0], **options})
    digest = hashlib.sha256(_folded(layer).to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    assert digest == expected


def _sources() -> dict[str, HashedIndex]:
    chunk, first, count = chunk_tables(1000, 37, 64)
    return {
        "global": HashedIndex(fold_signed, (11, 22, 37), 1000),
        "local": HashedIndex(fold_signed_local, (11, 22, 37, chunk, 1.0 / chunk, first, count), 1000),
        "bands": HashedIndex(fold_bands, ([1, 2, 3], [4, 5, 6], [5, 7, 9], [0, 5, 12], 21), 77, 3),
    }


@pytest.mark.parametrize("name", ["global", "local", "bands"])
def test_compiled_eager_and_cached_agree_on_every_range(monkeypatch, name):
    source = _sources()[name]
    table = torch.randn(2 * 37 if name != "bands" else 42)
    compiled_rows = source.rows(0, source.units, torch.device("cpu"))
    compiled_take = source.take(table, 3, 50)
    monkeypatch.setenv(index.KERNELS_VARIABLE, "eager")
    monkeypatch.setattr(index, "_CHUNK_UNITS", 7)  # several eager chunks per range
    eager_rows = source.rows(0, source.units, torch.device("cpu"))
    cached = CachedIndex(source.materialize(None), source.width)
    assert torch.equal(compiled_rows, eager_rows) and torch.equal(cached.rows(0, source.units, table.device), eager_rows)
    assert torch.equal(compiled_take, source.take(table, 3, 50)) and torch.equal(compiled_take, cached.take(table, 3, 50))


def test_a_failed_compile_warns_once_and_hashes_eagerly(monkeypatch):
    class Broken:
        def rows(self, *args):
            raise RuntimeError("no C++ compiler")

        take = rows

    monkeypatch.setattr(index, "_compiled", lambda fold: Broken())
    monkeypatch.setattr(index, "_failed_devices", set())
    source = _sources()["global"]
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        rows = source.rows(0, 1000, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second attempt, no second warning
        again = source.rows(0, 1000, torch.device("cpu"))
    monkeypatch.setenv(index.KERNELS_VARIABLE, "eager")
    assert torch.equal(rows, again) and torch.equal(rows, source.rows(0, 1000, torch.device("cpu")))


def test_eager_setting_never_compiles(monkeypatch):
    monkeypatch.setenv(index.KERNELS_VARIABLE, "eager")
    monkeypatch.setattr(index, "_compiled", lambda fold: pytest.fail("compiled with HF_FREQCOMPRESS_KERNELS=eager"))
    layer = nn.Linear(30, 20)
    compress(nn.Sequential(layer), budget=50, exclude=[])
    layer.weight.sum().backward()
    assert layer.parametrizations.weight.original.grad is not None


def test_meta_tensors_have_shapes_only():
    source = _sources()["bands"]
    assert source.rows(0, 77, torch.device("meta")).shape == (77, 3)
    assert source.take(torch.empty(42, device="meta"), 0, 10).shape == (30,)


def test_default_layers_keep_no_index_and_layers_too_large_to_hash_are_refused():
    layer = nn.Linear(300, 200)
    report = compress(nn.Sequential(layer), budget="1/16", exclude=[])
    assert report.cache_bytes == 0 and list(layer.buffers()) == []
    with pytest.raises(ValueError, match="2\\*\\*32"):
        HashedIndex(fold_signed, (1, 2, 3), 2**31, width=2)
