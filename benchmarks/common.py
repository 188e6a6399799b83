"""Shared pieces of the benchmarks: MNIST tensors, a plain training loop, JSON rows.

Every benchmark takes ``--quick`` (same code path, fewer epochs) and
``--out FILE`` and writes ``{"benchmark": name, "rows": [...]}`` (keys in
docs/architecture.md). Training is deliberately plain PyTorch on tensors held
in memory, so the numbers measure the compression method, not a data loader.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from hf_freqcompress import compress
from hf_freqcompress.data import mnist_dataset
from hf_freqcompress.layers import find_layer_kind
from hf_freqcompress.methods import MethodConfig, get_method, resolve_config
from hf_freqcompress.models import parse_model_args
from hf_freqcompress.methods import compressed_weights
from hf_freqcompress.training import distillation_loss

__all__ = [
    "VALIDATION_IMAGES",
    "accuracy_row",
    "alternating_medians",
    "alternating_ratio",
    "interleaved_medians",
    "compress_from_scratch",
    "benchmark_parser",
    "median_seconds",
    "method_config",
    "mnist_tensors",
    "round_to_storage",
    "train_classifier",
    "train_step",
    "test_error_pct",
    "timed",
    "other_values",
    "write_results",
    "print_table",
    "soft_targets",
]


def benchmark_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="same code path, fewer epochs: a few minutes on 2 cores")
    parser.add_argument("--out", type=Path, help="write the JSON rows here")
    parser.add_argument("--epochs", type=int, help="override the number of epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    return parser


VALIDATION_IMAGES = 10_000


def mnist_tensors(
    flatten: bool, normalize: bool = True, root: Path | None = None, validation: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, eval_x, eval_y) of the full vendored MNIST as float32 (standardized by default).

    ``validation``: hold out the last 10,000 training digits as the eval set
    instead of the test set, so settings can be chosen without the test set.
    """
    train = mnist_dataset("train", root, flatten=flatten, normalize=normalize)
    test = mnist_dataset("test", root, flatten=flatten, normalize=normalize)
    train_x, train_y = train.tensors
    if validation:
        cut = len(train_x) - VALIDATION_IMAGES
        return train_x[:cut], train_y[:cut], train_x[cut:], train_y[cut:]
    return (train_x, train_y, *test.tensors)


def method_config(text: str) -> MethodConfig:
    """A method from the command line: ``name``, ``name:key=value,...`` or a JSON config object."""
    if text.lstrip().startswith("{"):
        return resolve_config(json.loads(text))
    name, _, options = text.partition(":")
    return get_method(name).config_class.from_dict(parse_model_args(options.split(",") if options else []))


def test_error_pct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Test error in percent; weights are rebuilt once for the whole pass (parametrize.cached)."""
    model.eval()
    wrong = 0
    with torch.no_grad(), parametrize.cached():
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size])
            wrong += int((logits.argmax(1) != y[start : start + batch_size]).sum())
    return 100.0 * wrong / len(x)


def train_classifier(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    *,
    epochs: int,
    lr: float = 0.05,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    seed: int = 0,
    optimizer: str = "sgd",
    on_step: Callable[[int], None] | None = None,
    extra_loss: Callable[[int], torch.Tensor] | None = None,
    parameters: Iterable[nn.Parameter] | None = None,
    teacher_logits: torch.Tensor | None = None,
    distill_alpha: float = 0.5,
    temperature: float = 4.0,
    label_smoothing: float = 0.0,
) -> float:
    """SGD with Nesterov momentum (or Adam) and a cosine schedule; returns wall seconds.

    The same recipe trains every row of a benchmark (dense, compressed,
    equal-size), so differences in test error come from the parametrization.
    ``extra_loss(step)`` is added to the loss; ``on_step(step)`` runs after
    each optimizer step (training schedules). Adam suits tensors whose
    gradients sum over many weights (codebooks, bucket tables), where one
    SGD learning rate cannot fit every scale. ``teacher_logits`` (one row
    per training example, from a trained dense network) turn on knowledge
    distillation with the library's loss: (1 - alpha) CE + alpha KD at
    ``temperature``, HashedNets' "dark knowledge" variant. ``label_smoothing``
    smooths the cross-entropy's targets (the KD term is soft already).
    """
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"unknown optimizer {optimizer!r}; use 'sgd' or 'adam'")
    if optimizer == "adam":
        optim = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        optim = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    total_steps = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    start_time = time.perf_counter()
    step = 0
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(train_x), batch_size):
            batch = order[start : start + batch_size]
            logits = model(train_x[batch])
            loss = F.cross_entropy(logits, train_y[batch], label_smoothing=label_smoothing)
            if teacher_logits is not None:
                kd = distillation_loss(logits, teacher_logits[batch], temperature)
                loss = (1.0 - distill_alpha) * loss + distill_alpha * kd
            if extra_loss is not None:
                loss = loss + extra_loss(step)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            schedule.step()
            step += 1
            if on_step is not None:
                on_step(step)
    return time.perf_counter() - start_time


@torch.no_grad()
def soft_targets(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """A trained network's logits on every training example (dropout off): the distillation targets."""
    model.eval()
    return torch.cat([model(x[start : start + batch_size]) for start in range(0, len(x), batch_size)])


def other_values(model: nn.Module) -> int:
    """Parameters besides the conv/linear weights (biases, norms): reported apart, as the papers do.

    A compressed layer's weight counts as everything its parametrization stores.
    """
    weights: set[int] = set()
    for module in model.modules():
        kind = find_layer_kind(module)
        if kind is None:
            continue
        if parametrize.is_parametrized(module, kind.param_name):
            weights |= {id(p) for p in module.parametrizations[kind.param_name].parameters()}
        else:
            weights.add(id(getattr(module, kind.param_name)))
    return sum(p.numel() for p in model.parameters() if id(p) not in weights)


def accuracy_row(
    model_label: str,
    method: str,
    budget: str,
    model: nn.Module,
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    dense_values: int,
    stored_values: int,
    epochs: int,
    seconds: float,
) -> dict[str, Any]:
    """One accuracy row in the keys every benchmark shares (stored values counted at 32 bits)."""
    return {
        "model": model_label,
        "method": method,
        "budget": budget,
        "dense_values": dense_values,
        "stored_values": stored_values,
        "stored_bits": stored_values * 32,
        "other_values": other_values(model),
        "test_error_pct": test_error_pct(model, *test),
        "epochs": epochs,
        "seconds": round(seconds, 1),
    }


def compress_from_scratch(model: nn.Module, budget: str, config, seed: int) -> int:
    """Compress a freshly initialised model for training from scratch; returns stored values.

    ``init="preserve_norm"``: projecting a random init averages ~1/budget
    independent weights per stored value, which shrinks every layer by about
    sqrt(budget) and, compounded over four layers, leaves the network
    untrainable at 1/64. Same treatment for every method.
    """
    return compress(model, budget=budget, method=config, exclude=[], seed=seed, init="preserve_norm").stored_values


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One cross-entropy step (forward, backward, optimizer step): what the step-time ratios time."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    """Median wall seconds of ``repeat`` calls, after one warm-up call (allocator, caches, lazy init)."""
    fn()
    return statistics.median(timed(fn) for _ in range(repeat))


def interleaved_medians(fns: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each of ``fns``, calling them in turn ``repeats`` times so drift and noise hit all alike."""
    for fn in fns:  # warm-up: allocator, caches, lazy init
        fn()
    times = [[timed(fn) for fn in fns] for _ in range(repeats)]
    return [statistics.median(column) for column in zip(*times)]


def alternating_medians(
    reference: Callable[[], object], other: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median seconds of ``reference`` and of ``other``, alternating the two (:func:`interleaved_medians`)."""
    reference_seconds, other_seconds = interleaved_medians((reference, other), repeats)
    return reference_seconds, other_seconds


def alternating_ratio(reference: Callable[[], object], other: Callable[[], object], repeats: int) -> float:
    """median time of ``other`` / median time of ``reference`` (:func:`alternating_medians`)."""
    reference_seconds, other_seconds = alternating_medians(reference, other, repeats)
    return other_seconds / reference_seconds


@torch.no_grad()
def round_to_storage(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every compressed layer's stored tensor to the checkpoint dtype, so the error measured is the saved model's."""
    for _, module, param_name, _ in compressed_weights(model):
        original = module.parametrizations[param_name].original
        original.copy_(original.to(dtype))


TIMING_ENVIRONMENT = ("MALLOC_", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")
"""Environment variable prefixes recorded with a benchmark's command: glibc malloc tunables, a preloaded
allocator, PyTorch's transparent-huge-page switch for CPU tensors."""


def write_results(name: str, rows: Sequence[dict[str, Any]], out: Path | None) -> None:
    """Write the rows as JSON, with the command that produced them (docs quote it).

    Environment variables that change timings without changing the code
    (:data:`TIMING_ENVIRONMENT`: the allocator's) are part of the command.
    """
    if out is None:
        return
    environment = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(TIMING_ENVIRONMENT)]
    # quoted, so JSON-valued arguments paste back as they ran
    command = shlex.join([*environment, "python", *sys.argv])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": name, "command": command, "rows": list(rows)}, indent=2) + "\n")
    print(f"wrote {out}")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Fixed-width table of ``columns`` (missing keys left blank)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
        return "" if value is None else str(value)

    table = [list(columns), *[[cell(row.get(c)) for c in columns] for row in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for i, line in enumerate(table):
        print("  ".join(v.rjust(w) for v, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
