"""What compression costs at run time, as ratios measured in one run.

For each model and method (at 1/16 unless told otherwise):

- ``train_step_ratio``: forward + backward + SGD step, compressed / dense
  (and ``dense_train_step_seconds``, the dense step's median, for scale:
  the allocator setting in docs/results/perf.md changes it);
- ``infer_cached_ratio``: inference batches inside one ``parametrize.cached()``
  context (weights rebuilt once, as in an evaluation loop) / dense;
- ``infer_materialized_ratio``: inference after ``materialize`` / dense;
- ``reconstruct_vs_memcpy`` and ``reconstruct_vs_clone``: rebuilding every
  compressed weight, forward and backward, / writing the same dense weights
  once, timed against two floors in the same run: ``copy_`` into preallocated
  tensors (memcpy: pages already mapped) and ``clone()`` (a fresh tensor, as
  every rebuilt weight is: large ones get fresh pages from the OS). The
  upstream gradients are built once, outside the timed rebuild;
- ``persistent_memory_ratio``: bytes of everything the compressed layers keep
  (stored values, caches) / ``report.stored_bytes``;
- ``peak_train_memory_ratio``: peak RSS during two training steps,
  compressed / dense, each in a fresh process: after the model is built (and
  compressed) the process resets its high-water mark (``5`` into
  ``/proc/self/clear_refs``), so building the dense model first does not
  count, then reads ``VmHWM`` after the steps (Linux only);
- ``compress_seconds``: wall time of ``compress()`` on resnet50 and vit_base;
- with ``--compile``, also ``train_step_compiled_ratio`` (``torch.compile``
  of the compressed model / of the dense one, both after compilation) and
  ``reconstruct_compiled_vs_memcpy`` / ``_vs_clone`` (the rebuild of every
  weight as one compiled function, against the same floors).

Methods are registered names or ``name:key=value,...`` with config options
(``hashednets:block_size=64`` is the tiled layout); by default every
registered method plus the tiled HashedNets, with and without sign
patterns. Timings alternate dense and compressed steps and take medians, so
machine noise hits both sides alike.

    python benchmarks/perf.py --out docs/results/perf.json
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn.utils import parametrize

from hf_freqcompress import available_methods, compress, materialize
from hf_freqcompress.methods import parallel
from hf_freqcompress.methods import compressed_weights

from common import (
    alternating_medians, alternating_ratio, benchmark_parser, method_config, print_table, timed, train_step,
    write_results,
)


@dataclass(frozen=True)
class Workload:
    model: str
    batch: int
    image: int


WORKLOADS = (
    Workload("resnet18", 32, 128),
    Workload("vgg11_bn", 16, 128),
    Workload("vit_small_patch16_224", 8, 224),
)
QUICK_WORKLOADS = (Workload("resnet18", 8, 64),)
COMPRESS_TIMING_MODELS = ("resnet50", "vit_base_patch16_224")
EXTRA_VARIANTS = ("hashednets:block_size=64", "hashednets:block_size=64,sign_patterns=4")


def build(workload: Workload) -> nn.Module:
    return timm.create_model(workload.model, pretrained=False, num_classes=100, img_size=workload.image) \
        if workload.model.startswith("vit") else timm.create_model(workload.model, pretrained=False, num_classes=100)


def inputs_for(workload: Workload) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(workload.batch, 3, workload.image, workload.image, generator=generator)
    y = torch.randint(0, 100, (workload.batch,), generator=generator)
    return x, y


def reconstruct_ratios(model: nn.Module, repeats: int, compiled: bool = False) -> dict[str, float]:
    """Rebuild all compressed weights (forward + backward) / write the same dense values, against both floors.

    The upstream gradients exist before the clock starts: allocating them is
    the caller's cost (autograd's), not the reconstruction's. All weights are
    rebuilt, then one backward runs through all of them: the shape a
    ``torch.compile``d rebuild (``compiled``) needs, so eager and compiled
    are timed alike.
    """
    layers = [(module, name) for _, module, name, _ in compressed_weights(model)]
    sources = [torch.randn_like(getattr(module, name)) for module, name in layers]
    targets = [torch.empty_like(source) for source in sources]
    upstream = [torch.ones_like(source) for source in sources]

    def weights() -> list[torch.Tensor]:
        return [getattr(module, name) for module, name in layers]

    rebuild = torch.compile(weights) if compiled else weights

    def copy_all() -> None:
        for target, source in zip(targets, sources):
            target.copy_(source)

    def clone_all() -> None:
        for source in sources:
            source.clone()

    def rebuild_all() -> None:
        torch.autograd.backward(rebuild(), upstream)

    prefix = "reconstruct_compiled" if compiled else "reconstruct"
    return {f"{prefix}_vs_memcpy": alternating_ratio(copy_all, rebuild_all, repeats),
            f"{prefix}_vs_clone": alternating_ratio(clone_all, rebuild_all, repeats)}


def persistent_bytes(model: nn.Module) -> int:
    """Bytes the compressed layers keep alive: stored tensors and every buffer, caches included."""
    total = 0
    for _, module, name, _ in compressed_weights(model):
        chain = module.parametrizations[name]
        tensors = [*chain.parameters(), *chain.buffers()]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def peak_rss_ratio(workload: Workload, method: str, budget: str) -> float:
    """Peak RSS of two training steps in a fresh process, compressed / dense."""

    def peak(compressed_method: str | None) -> int:
        command = [sys.executable, __file__, "--peak-rss", workload.model, str(workload.batch), str(workload.image),
                   compressed_method or "dense", budget, str(parallel.MIN_VALUES_PER_THREAD)]
        return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])

    return peak(method) / peak(None)


def high_water_bytes() -> int:
    """This process's peak RSS (VmHWM) since start or the last :func:`reset_high_water`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux")


def reset_high_water() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def measure_peak_rss(model_name: str, batch: int, image: int, method: str, budget: str) -> None:
    torch.set_num_threads(2)
    workload = Workload(model_name, batch, image)
    model = build(workload)
    if method != "dense":
        compress(model, budget=budget, method=method_config(method))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = inputs_for(workload)
    reset_high_water()
    for _ in range(2):
        train_step(model, optimizer, x, y)
    print(high_water_bytes())


def stepper(model: nn.Module, workload: Workload, compiled: bool = False) -> Callable[[], None]:
    """One SGD train step of ``model`` on ``workload``'s batch per call (``torch.compile``d first if ``compiled``)."""
    x, y = inputs_for(workload)
    runner = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return lambda: train_step(runner, optimizer, x, y)


def train_step_seconds(dense: nn.Module, compressed: nn.Module, workload: Workload, repeats: int,
                       compiled: bool = False) -> tuple[float, float]:
    """Median SGD train step seconds of ``dense`` and ``compressed``, each ``torch.compile``d first if ``compiled``."""
    steps = stepper(dense, workload, compiled), stepper(compressed, workload, compiled)
    return alternating_medians(*steps, repeats)  # its warm-up call compiles


def measure(workload: Workload, method: str, budget: str, repeats: int, with_memory: bool,
            with_compile: bool = False) -> list[dict]:
    torch.manual_seed(0)
    dense = build(workload)
    compressed = copy.deepcopy(dense)
    report = compress(compressed, budget=budget, method=method_config(method))
    x, _ = inputs_for(workload)
    dense_step, compressed_step = train_step_seconds(dense, compressed, workload, repeats)
    results = {
        "train_step_ratio": compressed_step / dense_step,
        "dense_train_step_seconds": dense_step,
        **reconstruct_ratios(compressed, repeats),
        "persistent_memory_ratio": persistent_bytes(compressed) / report.stored_bytes,
    }
    if with_compile:
        dense_step, compressed_step = train_step_seconds(dense, compressed, workload, repeats, compiled=True)
        results["train_step_compiled_ratio"] = compressed_step / dense_step
        results.update(reconstruct_ratios(compressed, repeats, compiled=True))
    dense.eval(), compressed.eval()
    with torch.no_grad():
        # One cached() context around all the timed calls, as an evaluation loop
        # uses it: the weights are rebuilt once, then every batch runs dense convs.
        with parametrize.cached():
            results["infer_cached_ratio"] = alternating_ratio(lambda: dense(x), lambda: compressed(x), repeats)
        materialize(compressed)
        results["infer_materialized_ratio"] = alternating_ratio(lambda: dense(x), lambda: compressed(x), repeats)
    if with_memory:
        results["peak_train_memory_ratio"] = peak_rss_ratio(workload, method, budget)
    return [{"model": workload.model, "method": method, "budget": budget, "metric": metric, "value": round(value, 4)}
            for metric, value in results.items()]


def compress_seconds(model_name: str, method: str, budget: str) -> dict:
    model = timm.create_model(model_name, pretrained=False)
    seconds = timed(lambda: compress(model, budget=budget, method=method_config(method)))
    return {"model": model_name, "method": method, "budget": budget, "metric": "compress_seconds",
            "value": round(seconds, 3)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--peak-rss":
        model_name, batch, image, method, budget, split_from = sys.argv[2:8]
        parallel.MIN_VALUES_PER_THREAD = int(split_from)
        measure_peak_rss(model_name, int(batch), int(image), method, budget)
        return
    parser = benchmark_parser(__doc__)
    parser.add_argument("--budget", default="1/16")
    parser.add_argument("--methods", nargs="+", default=[*available_methods(), *EXTRA_VARIANTS])
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--models", nargs="+", help="only these workloads (e.g. resnet18); skips compress timing")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile'd train steps and reconstruction (minutes of compilation each)")
    parser.add_argument("--split-from", type=int, default=parallel.MIN_VALUES_PER_THREAD,
                        help="values per thread from which a rebuild is split over CPU threads "
                             "(methods/parallel.py; a huge value keeps every rebuild on one thread)")
    args = parser.parse_args()
    parallel.MIN_VALUES_PER_THREAD = args.split_from
    torch.set_num_threads(args.threads)
    workloads = QUICK_WORKLOADS if args.quick else WORKLOADS
    workloads = [w for w in workloads if w.model in args.models] if args.models else workloads
    timing_models = COMPRESS_TIMING_MODELS[:1] if args.quick else COMPRESS_TIMING_MODELS
    timing_models = () if args.models else timing_models
    repeats = args.repeats or (3 if args.quick else 7)
    rows = []
    for method in args.methods:
        for workload in workloads:
            rows += measure(workload, method, args.budget, repeats, with_memory=not args.quick,
                            with_compile=args.compile)
            print_table(rows, ["model", "method", "budget", "metric", "value"])
        for model_name in timing_models:
            rows.append(compress_seconds(model_name, method, args.budget))
    print_table(rows, ["model", "method", "budget", "metric", "value"])
    write_results("perf", rows, args.out)


if __name__ == "__main__":
    main()
