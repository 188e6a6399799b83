from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import render_results  # noqa: E402


def test_render_builds_tables_plots_and_commands(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    rows = [
        {"model": "mlp", "method": "dense", "budget": "1", "stored_values": 1000, "test_error_pct": 1.5},
        {"model": "mlp", "method": "hashednets", "budget": "1/8", "stored_values": 125, "test_error_pct": 1.9},
        {"model": "mlp", "method": "hashednets", "budget": "1/64", "stored_values": 16, "test_error_pct": 3.1},
    ]
    (results / "toy.json").write_text(json.dumps({"benchmark": "toy", "command": "python benchmarks/toy.py", "rows": rows}))
    (results / "perf.json").write_text(json.dumps({"benchmark": "perf", "rows": [
        {"model": "m", "method": "hashednets", "budget": "1/16", "metric": "train_step_ratio", "value": 1.07}]}))
    output = tmp_path / "results.md"
    text = render_results.render(results, output)
    assert "## toy" in text and "## perf" in text
    assert "python benchmarks/toy.py" in text
    assert "| mlp | hashednets | 1/64 | 16 | 3.1 |" in text
    assert "train_step_ratio | 1.07" in text
    assert (results / "toy.png").stat().st_size > 1000
    assert not (results / "perf.png").exists()
