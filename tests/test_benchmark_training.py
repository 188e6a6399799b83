from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402
from common import interleaved_medians, train_classifier, write_results  # noqa: E402


def _fit(teacher_logits: torch.Tensor | None, alpha: float) -> nn.Module:
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    labels = torch.zeros(256, dtype=torch.long)  # the labels all say class 0
    model = nn.Linear(8, 3)
    train_classifier(model, x, labels, epochs=20, lr=0.05, batch_size=32, optimizer="adam",
                     teacher_logits=teacher_logits, distill_alpha=alpha, temperature=2.0)
    return model.eval()


def test_distillation_follows_the_teacher_by_alpha():
    x = torch.randn(64, 8)
    teacher = torch.tensor([[0.0, 6.0, 0.0]]).expand(256, 3)  # the teacher says class 1
    assert (_fit(None, 0.5)(x).argmax(1) == 0).all()
    assert (_fit(teacher, 1.0)(x).argmax(1) == 1).all()
    assert (_fit(teacher, 0.0)(x).argmax(1) == 0).all()


def test_results_record_the_allocator_environment_with_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    monkeypatch.setenv("OMP_UNRELATED_SETTING", "1")
    monkeypatch.setattr(sys, "argv", ["perf.py", "--threads", "1"])
    write_results("perf", [{"metric": "train_step_ratio", "value": 1.0}], tmp_path / "perf.json")
    command = json.loads((tmp_path / "perf.json").read_text())["command"]
    assert command == "MALLOC_MMAP_MAX_=0 python perf.py --threads 1"


def test_interleaved_medians_calls_in_turn_and_takes_each_ones_median(monkeypatch):
    calls: list[str] = []
    seconds = {"a": iter([0.0, 5.0, 1.0, 3.0]), "b": iter([0.0, 2.0, 9.0, 4.0])}  # the first is the warm-up

    def step(name: str):
        return lambda: calls.append(name) or next(seconds[name])

    monkeypatch.setattr(common, "timed", lambda fn: fn())  # each call "takes" what it returns
    assert interleaved_medians([step("a"), step("b")], repeats=3) == [3.0, 4.0]
    assert calls == ["a", "b"] * 4
