"""plan.py: one build path for compress() and loading; every layout option saves and reloads exactly."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_freqcompress import compress, finalize, on_train_step, save_pretrained
from hf_freqcompress.methods import available_methods, get_method
from hf_freqcompress.models import build_model

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from logit_digests import fixed_input, logit_digest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INPUT_SHAPE = (2, 1, 28, 28)

LAYOUTS: dict[str, list[dict]] = {
    "hashednets": [
        {"block_size": 16},
        {"block_size": 16, "sign_patterns": 4},
        {"locality": 256},
        {"cache_indices": False},
        {"backward": "sorted", "cache_indices": True},
    ],
    "freshnets": [
        {"allocation": "uniform"},
        {"alpha": 0.5, "beta": 2.0},
        {"locality": 256},
        {"cache_indices": False, "backward": "scatter"},
    ],
    "funhash": [
        {"shared_space": True},
        {"shared_space": True, "reconstruction": "linear"},
        {"reconstruction": "sum", "num_hashes": 2},
        {"frequency_domain": True},
        {"cache_indices": False},
    ],
    "freqreg": [
        {"drop_rate": 0.5, "start_fraction": 0.5},
        {"conv_floor": 64, "linear_floor": 128},
    ],
    "pq": [
        {"subvector": 4, "k": 16},
        {"codebooks": None, "subvector": 2},
        {"max_k": 16, "iterations": 2},
    ],
    "binary_stack": [
        {"scale": "layer", "depth": 4},
        {"scale": "slice", "bank_size": 16, "depth": 16},
        {"freeze_step": 1, "anneal_steps": 2, "temperature": 2.0, "final_temperature": 0.5},
    ],
}
"""Non-default options per method; every field of every config appears at least once."""

FIXED = {"freshnets": {"block_size": 16, "sign_patterns": 4}}
"""Options a method inherits but accepts only at their default (FreshNets hashes per coefficient, never tiled)."""

CASES = [(method, {}) for method in available_methods()] + [
    (method, options) for method, layouts in LAYOUTS.items() for options in layouts
]


def test_every_config_option_is_covered():
    """A new option must be added to LAYOUTS, so its layout is saved and reloaded too."""
    for method in available_methods():
        fields = {f.name for f in dataclasses.fields(get_method(method).config_class)}
        covered = {key for options in LAYOUTS.get(method, []) for key in options} | set(FIXED.get(method, {}))
        assert fields <= covered, f"{method}: options {sorted(fields - covered)} have no round-trip case"


@pytest.mark.parametrize("method, option", [(m, o) for m, options in FIXED.items() for o in options])
def test_fixed_options_refuse_other_values(method, option):
    with pytest.raises(ValueError, match=option):
        get_method(method).config_class(**{option: FIXED[method][option]})


def _trained_lenet(method: str, options: dict) -> torch.nn.Module:
    model = build_model("timm:mnist_lenet").eval()
    compress(model, budget="1/16", method={"method": method, **options}, exclude=[], seed=3)
    for step in range(1, 4):  # schedules (freqreg drop, binary_stack freeze / anneal) move
        on_train_step(model, step)
    finalize(model)
    return model


def test_every_layout_option_round_trips_in_a_fresh_process(tmp_path):
    x = fixed_input(INPUT_SHAPE)
    expected = {}
    for i, (method, options) in enumerate(CASES):
        model = _trained_lenet(method, options)
        folder = save_pretrained(model, tmp_path / f"{i}-{method}")
        expected[str(folder)] = logit_digest(model, x)
    command = [sys.executable, str(ROOT / "tests" / "helpers" / "logit_digests.py"), ",".join(map(str, INPUT_SHAPE))]
    run = subprocess.run([*command, *expected], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    mismatched = [CASES[i] for i, folder in enumerate(expected) if loaded[folder] != expected[folder]]
    assert not mismatched
