"""docs/extending.md's example method is real: it registers, compresses, trains a step, saves and loads."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_freqcompress import compress, from_pretrained, save_pretrained
from hf_freqcompress.methods import available_methods, registry
from hf_freqcompress.models import build_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


@pytest.fixture(scope="module")
def lowrank():
    """The first Python block of the doc, executed as a module (it registers "lowrank")."""
    source = re.search(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)[1]
    namespace: dict = {"__name__": "extending_example"}
    exec(compile(source, str(DOC), "exec"), namespace)
    yield namespace
    registry._METHODS.pop("lowrank", None)


def test_the_documented_method_compresses_trains_saves_and_loads(lowrank, tmp_path):
    assert "lowrank" in available_methods()
    model = build_model("timm:mnist_mlp").eval()
    report = compress(model, budget="1/8", method="lowrank", exclude=[])
    assert report.stored_values <= report.dense_values // 8
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    loaded = from_pretrained(save_pretrained(model, tmp_path / "lowrank"))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_plugin_method_is_found_through_its_entry_point(tmp_path, monkeypatch):
    """An installed distribution declaring the entry point: the method loads by name, its module imported on use."""
    package = tmp_path / "lowrank_plugin"
    package.mkdir()
    source = re.search(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)[1]
    (package / "__init__.py").write_text(source.replace('"lowrank"', '"lowrank_plugin"'), encoding="utf-8")
    dist = tmp_path / "lowrank_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lowrank-plugin\nVersion: 0.1\n", encoding="utf-8")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""
        [hf_freqcompress.methods]
        lowrank_plugin = lowrank_plugin:LowRankWeight
    """), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "lowrank_plugin" in available_methods() and "lowrank_plugin" not in sys.modules
        report = compress(build_model("timm:mnist_mlp"), budget="1/8", method="lowrank_plugin", exclude=[])
        assert report.method == "lowrank_plugin" and "lowrank_plugin" in sys.modules
    finally:
        registry._METHODS.pop("lowrank_plugin", None)
        sys.modules.pop("lowrank_plugin", None)
