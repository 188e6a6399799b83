"""Where metrics go: a JSONL file in the output folder and accelerate's trackers.

The JSONL file is the record benchmarks and tests read back (one object per
line: ``step``, ``epoch`` and the values); trackers (tensorboard, wandb, ...)
are for people watching a run. Only the main process writes. A tracker the
recipe asks for but that is not installed is skipped with a warning instead
of failing a run that has already spent its time training.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import accelerate.utils
from accelerate import Accelerator

__all__ = ["available_trackers", "MetricsLog"]


def available_trackers(names: list[str]) -> list[str]:
    """The trackers among ``names`` whose package is installed (accelerate's ``is_<name>_available``)."""
    usable = []
    for name in names:
        check = getattr(accelerate.utils, f"is_{name}_available", None)
        if check is None:
            raise ValueError(f"output.log_with: {name!r} is not an accelerate tracker (e.g. tensorboard, wandb)")
        if check():
            usable.append(name)
        else:
            warnings.warn(f"output.log_with: {name} is not installed; metrics go to metrics.jsonl only", stacklevel=2)
    return usable


class MetricsLog:
    """Append metrics to ``<dir>/metrics.jsonl`` and to the accelerator's trackers (main process only)."""

    FILE_NAME = "metrics.jsonl"

    def __init__(self, accelerator: Accelerator, directory: Path) -> None:
        self.accelerator = accelerator
        self.path = directory / self.FILE_NAME

    def log(self, values: dict[str, Any], step: int, epoch: int) -> None:
        clean = {k: (float(v) if hasattr(v, "item") else v) for k, v in values.items()}
        if self.accelerator.is_main_process:
            with self.path.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps({"step": step, "epoch": epoch, **clean}) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=step)

    @staticmethod
    def read(directory: str | Path) -> list[dict[str, Any]]:
        path = Path(directory) / MetricsLog.FILE_NAME
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
