from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import render_results  # noqa: E402
import seeds  # noqa: E402


def _run(path: Path, errors: list[float], seconds: list[float]) -> Path:
    rows = [
        {"model": "mlp", "method": m, "budget": b, "stored_values": n, "epochs": 30, "test_error_pct": e, "seconds": s}
        for (m, b, n), e, s in zip([("dense", "1", 1000), ("hashednets", "1/8", 125)], errors, seconds)
    ]
    path.write_text(json.dumps({"benchmark": "toy", "command": f"python toy.py --seed {path.stem}", "rows": rows}))
    return path


def test_merge_averages_what_differs_and_keeps_every_seed(tmp_path):
    runs = [_run(tmp_path / "0.json", [1.0, 1.5], [10.0, 20.0]), _run(tmp_path / "1.json", [1.2, 1.4], [12.0, 20.0]),
            _run(tmp_path / "2.json", [1.1, 1.6], [11.0, 20.0])]
    merged = seeds.merge_files(runs)
    dense, hashed = merged["rows"]
    assert dense["test_error_pct"] == pytest.approx(1.1) and hashed["test_error_pct"] == pytest.approx(1.5)
    assert hashed["test_error_pct_per_seed"] == [1.5, 1.4, 1.6]
    assert hashed["test_error_pct_std"] == pytest.approx(0.1)
    assert dense["seconds"] == pytest.approx(11.0) and hashed["seconds"] == 20.0  # equal numbers stay as they are
    assert "seconds_per_seed" not in dense  # only the measured columns keep their spread
    assert (hashed["method"], hashed["budget"], hashed["epochs"]) == ("hashednets", "1/8", 30)
    assert merged["command"].splitlines()[:3] == [f"python toy.py --seed {i}" for i in range(3)]

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "toy.json").write_text(json.dumps(merged))
    text = render_results.render(tmp_path / "results", tmp_path / "results.md")
    assert "| 1.5 / 1.4 / 1.6 |" in text
    assert (tmp_path / "results" / "toy.png").stat().st_size > 1000


def test_merge_refuses_runs_of_different_settings(tmp_path):
    first = _run(tmp_path / "0.json", [1.0, 1.5], [1.0, 1.0])
    other = json.loads(first.read_text())
    other["rows"][1]["budget"] = "1/64"
    (tmp_path / "1.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="row 1 differs in 'budget'"):
        seeds.merge_files([first, tmp_path / "1.json"])
    other["rows"].pop()
    (tmp_path / "1.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="different numbers of rows"):
        seeds.merge_files([first, tmp_path / "1.json"])
    other["benchmark"] = "elsewhere"
    (tmp_path / "1.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="different benchmarks"):
        seeds.merge_files([first, tmp_path / "1.json"])
