"""Merge runs of one benchmark that differ only in ``--seed`` into one JSON of means.

One seed of a small MNIST network is not a measurement of a method: the
seed moves test error by more than the sampling noise of the test set.
Run the benchmark once per seed with ``--out``, then merge:

    python mnist_mlp.py --seed 0 --out /tmp/s0.json   # same flags otherwise
    python mnist_mlp.py --seed 1 --out /tmp/s1.json
    python seeds.py --out ../docs/results/mnist_mlp.json /tmp/s0.json /tmp/s1.json

Rows are matched by position and must agree on every non-numeric column
(model, method, budget, ...). A numeric column that differs between runs
becomes its mean; ``test_error_pct`` and ``value`` also keep every run's
number (``<column>_per_seed``) and their sample standard deviation
(``<column>_std``). The merged file keeps each run's command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

SPREAD_COLUMNS = ("test_error_pct", "value")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def merge_rows(row_sets: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per position: identity columns checked equal, differing numbers averaged."""
    lengths = {len(rows) for rows in row_sets}
    if len(lengths) != 1:
        raise ValueError(f"runs have different numbers of rows ({sorted(lengths)}); merge runs of the same command")
    merged = []
    for position, rows in enumerate(zip(*row_sets)):
        keys = list(dict.fromkeys(key for row in rows for key in row))
        out: dict[str, Any] = {}
        for key in keys:
            values = [row.get(key) for row in rows]
            numbers = all(_is_number(v) for v in values)
            if numbers and key in SPREAD_COLUMNS:
                out[key] = round(statistics.fmean(values), 4)
                out[f"{key}_per_seed"] = values
                out[f"{key}_std"] = round(statistics.stdev(values), 4)
            elif all(v == values[0] for v in values):
                out[key] = values[0]
            elif numbers:
                out[key] = round(statistics.fmean(values), 4)
            else:
                raise ValueError(f"row {position} differs in {key!r} between runs: {values}; "
                                 "merge runs that differ only in --seed")
        merged.append(out)
    return merged


def merge_files(paths: list[Path]) -> dict[str, Any]:
    """The merged JSON object of several ``--out`` files of one benchmark."""
    runs = [json.loads(path.read_text()) for path in paths]
    names = {run["benchmark"] for run in runs}
    if len(names) != 1:
        raise ValueError(f"files come from different benchmarks: {sorted(names)}")
    command = "\n".join([*(run.get("command", "") for run in runs), shlex.join(["python", *sys.argv])])
    return {"benchmark": names.pop(), "command": command, "rows": merge_rows([run["rows"] for run in runs])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="JSON files written by one benchmark with --out")
    parser.add_argument("--out", type=Path, required=True, help="merged JSON")
    args = parser.parse_args()
    if len(args.runs) < 2:
        parser.error("give at least two runs to merge")
    merged = merge_files(args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"wrote {args.out} (mean of {len(args.runs)} runs)")


if __name__ == "__main__":
    main()
