"""What a compressed model keeps in memory: resident, training peak and inference peak, each in its own process.

For each model, budget and variant (``default``: compress() with default
options; ``recompute``: the same plus ``enable_weight_recompute``), a fresh
process records its RSS once its imports are done (the baseline), builds the
dense model, compresses it, frees the dense weights, and then:

- ``resident_bytes_vs_stored``: bytes of every tensor the compressed layers
  hold after a forward (stored values, caches, buffers) / ``report.stored_bytes``;
- ``peak_train_memory_ratio``: peak RSS over the baseline during four AdamW
  training steps (high-water mark reset after compression), compressed /
  dense (the dense model trained the same way in its own process);
- ``peak_infer_memory_ratio``: peak RSS over the baseline during an
  inference forward under ``torch.inference_mode()`` without
  ``parametrize.cached()`` (each layer's weight is rebuilt and freed in turn),
  compressed / dense;
- ``train_step_ratio``: median step seconds, compressed / dense (separate
  processes: compare only within one run of this script).

``*_mb`` rows give the absolute megabytes over the baseline for the README's
table. On CUDA (``--device cuda``) peaks are ``torch.cuda.max_memory_allocated``.
Linux only on CPU (``/proc/self/status``).

    python benchmarks/memory.py --out docs/results/memory.json
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn import functional as F

import hf_freqcompress
from hf_freqcompress import compress
from hf_freqcompress.methods import compressed_weights

from common import benchmark_parser, method_config, print_table, write_results

MODELS = ("resnet50", "vgg16_bn", "vit_base_patch16_224")
QUICK_MODELS = ("resnet18",)
BUDGETS = ("1/16", "1/64")
VARIANTS = ("default", "recompute")
BATCH, IMAGE = 2, 224


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status: CPU memory needs Linux")


class Meter:
    """Bytes over the after-imports baseline: current and peak since :meth:`reset` (RSS, or CUDA allocations)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = self.current()

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _status_kib("VmRSS") * 1024

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        return _status_kib("VmHWM") * 1024 - self.baseline


def _compressed_layer_bytes(model: nn.Module) -> int:
    tensors = {}
    for _, module, name, _ in compressed_weights(model):
        chain = module.parametrizations[name]
        for tensor in [*chain.parameters(), *chain.buffers()]:
            tensors[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(tensors.values())


def _train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 4) -> float:
    """Median seconds of ``steps`` AdamW steps (the first one creates the optimizer state)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def child(model_name: str, budget: str, variant: str, method: str, device_name: str) -> dict:
    """One measurement in this (fresh) process; ``variant`` "dense" leaves the model uncompressed."""
    device = torch.device(device_name)
    meter = Meter(device)
    model = timm.create_model(model_name, pretrained=False).to(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=generator).to(device)
    y = torch.randint(0, 1000, (BATCH,), generator=generator).to(device)
    result: dict = {}
    if variant != "dense":
        report = compress(model, budget=budget, method=method_config(method))
        if variant == "recompute":
            hf_freqcompress.enable_weight_recompute(model)
        with torch.no_grad():
            model(x)
        result["resident_bytes_vs_stored"] = _compressed_layer_bytes(model) / report.stored_bytes
    meter.reset()
    with torch.inference_mode():
        model.eval()(x)
    result["infer_peak"] = meter.peak()
    model.train()
    meter.reset()
    result["step_seconds"] = _train_steps(model, x, y)
    result["train_peak"] = meter.peak()
    return result


def measure(model_name: str, budget: str, method: str, device: str, dense: dict) -> list[dict]:
    rows = []
    for variant in VARIANTS:
        run = _run_child(model_name, budget, variant, method, device)
        name = method if variant == "default" else f"{method}+recompute"
        values = {
            "resident_bytes_vs_stored": run["resident_bytes_vs_stored"],
            "peak_train_memory_ratio": run["train_peak"] / dense["train_peak"],
            "peak_infer_memory_ratio": run["infer_peak"] / dense["infer_peak"],
            "train_step_ratio": run["step_seconds"] / dense["step_seconds"],
            "peak_train_mb": run["train_peak"] / 2**20,
            "peak_infer_mb": run["infer_peak"] / 2**20,
        }
        rows += [{"model": model_name, "method": name, "budget": budget, "metric": metric, "value": round(value, 4)}
                 for metric, value in values.items()]
    return rows


def _run_child(model_name: str, budget: str, variant: str, method: str, device: str) -> dict:
    command = [sys.executable, __file__, "--child", model_name, budget, variant, method, device]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def dense_rows(model_name: str, dense: dict) -> list[dict]:
    return [{"model": model_name, "method": "dense", "budget": "1", "metric": metric, "value": round(value, 4)}
            for metric, value in (("peak_train_mb", dense["train_peak"] / 2**20),
                                  ("peak_infer_mb", dense["infer_peak"] / 2**20))]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        torch.set_num_threads(2)
        print(json.dumps(child(*sys.argv[2:7])))
        return
    parser = benchmark_parser(__doc__)
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS))
    parser.add_argument("--method", default="hashednets")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    models = args.models or (QUICK_MODELS if args.quick else MODELS)
    rows = []
    for model_name in models:
        dense = _run_child(model_name, "1", "dense", args.method, args.device)
        rows += dense_rows(model_name, dense)
        for budget in args.budgets:
            rows += measure(model_name, budget, args.method, args.device, dense)
            print_table(rows, ["model", "method", "budget", "metric", "value"])
    write_results("memory", rows, args.out)


if __name__ == "__main__":
    main()
