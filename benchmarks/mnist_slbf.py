"""SLBF on MNIST: a VGG-style CNN, dense vs binary_stack on its conv layers, same recipe, same run.

Network: conv 1-32, pool, conv 32-64, pool, conv 64-64, conv 64-128 (3x3,
each followed by BatchNorm and ReLU), global average pool, Linear 128-10.
Every conv is compressed: conv2-4 with d = 8 sub-filters from a bank of at
most 64 per layer under a budget of 1/128 of their float32 weights; conv1
(C = 1, so d = 1) in its own compress() call at budget 1.0, where its bank is
capped at its 32 slices. As in the paper, the compressed net starts from the
trained dense one (projected by binary k-means) and is fine-tuned with the
same recipe for the same number of epochs; the selections anneal and freeze
after 80% of the fine-tuning steps. The Linear head stays dense (as do BatchNorm and
biases, reported as ``other_values``).

    compression_ratio = (dense conv weights * 32 bits) / (stored bits of the conv layers)

Stored bits count the frozen form (bank bits + index bits + float32 scales),
measured after ``finalize()``. Perf rows time path (a) (materialize W, then
conv) against path (b) (split-transform-merge) per layer on a test batch.

    python benchmarks/mnist_slbf.py --out docs/results/mnist_slbf.json
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from hf_freqcompress import BinaryStackConfig, compress, finalize, on_train_step
from hf_freqcompress.methods.binary_stack_forward import choose_conv_forward

from common import benchmark_parser, mnist_tensors, print_table, test_error_pct, train_classifier, write_results

CONV_BUDGET = "1/128"
FIRST_CONV = "features.0"


class VggMnist(nn.Module):
    """Four 3x3 conv blocks (conv, BatchNorm, ReLU), two max-pools, global average pool, Linear head."""

    def __init__(self) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 64), *block(64, 128)
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def conv_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def other_values(model: nn.Module) -> int:
    """Parameters outside the conv layers (BatchNorm, the Linear head); a conv's bank, scales and bias are its own."""
    convs = tuple(f"{name}." for name in conv_names(model))
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(convs))


def run_dense(args: argparse.Namespace, data, epochs: int) -> tuple[dict[str, Any], nn.Module]:
    torch.manual_seed(args.seed)
    model = VggMnist()
    dense = sum(model.get_submodule(name).weight.numel() for name in conv_names(model))
    seconds = train_classifier(model, data[0], data[1], epochs=epochs, lr=args.lr, seed=args.seed, optimizer="adam")
    return row("dense", "1", dense, dense, dense * 32, model, data, epochs, seconds), model


def run_slbf(args: argparse.Namespace, data, epochs: int, trained: nn.Module) -> tuple[dict[str, Any], nn.Module]:
    """Compress a copy of the trained dense net (projection = binary k-means) and fine-tune it, same recipe."""
    torch.manual_seed(args.seed)
    model = copy.deepcopy(trained)
    steps = epochs * math.ceil(len(data[0]) / 128)
    config = BinaryStackConfig(bank_size=args.bank_size, depth=args.depth, anneal_steps=steps, freeze_step=int(0.8 * steps))
    rest = [name for name in conv_names(model) if name != FIRST_CONV]
    reports = [
        compress(model, budget=1.0, method=config, targets=[FIRST_CONV], seed=args.seed),
        compress(model, budget=args.budget, method=config, targets=rest, seed=args.seed),
    ]
    for report in reports:
        print(report)
    seconds = train_classifier(model, data[0], data[1], epochs=epochs, lr=args.lr, seed=args.seed, optimizer="adam",
                               on_step=lambda step: on_train_step(model, step))
    finalize(model)
    layers = [layer for report in reports for layer in report.layers]
    dense = sum(layer.dense_values for layer in layers)
    stored_bits = sum(layer.stored_bits for layer in layers)
    result = row("binary_stack", f"{FIRST_CONV}: 1.0, others: {args.budget}", dense,
                 sum(layer.stored_values for layer in layers), stored_bits, model, data, epochs, seconds)
    result["start"] = "the trained dense row, then fine-tuned for `epochs`"
    result["layers"] = [
        {"name": layer.name, "dense_bits": layer.dense_values * 32, "stored_bits": layer.stored_bits,
         "layout": model.get_submodule(layer.name.rsplit(".", 1)[0]).parametrizations.weight[0].describe()}
        for layer in layers
    ]
    return result, model


def row(method: str, budget: str, dense: int, stored: int, bits: int, model: nn.Module, data, epochs: int, seconds: float) -> dict[str, Any]:
    return {
        "model": "vgg_mnist_32-64-64-128",
        "method": method,
        "budget": budget,
        "dense_values": dense,
        "stored_values": stored,
        "stored_bits": bits,
        "compression_ratio": round(dense * 32 / bits, 1),
        "other_values": other_values(model),
        "test_error_pct": test_error_pct(model, data[2], data[3]),
        "epochs": epochs,
        "seconds": round(seconds, 1),
    }


def perf_rows(model: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """Path (a) vs (b) per conv on a batch of test images, and the auto pick."""
    model.eval()
    rows = []
    for choice in choose_conv_forward(model, x, mode="autotune", repeats=5):
        rows.append({"model": "vgg_mnist_32-64-64-128", "method": "binary_stack", "budget": CONV_BUDGET,
                     "metric": "split_vs_materialize_ms", "layer": choice.layer, "batch": len(x),
                     "materialize_ms": round(choice.materialize_ms, 3), "split_ms": round(choice.split_ms, 3),
                     "chosen": choice.chosen, "value": round(choice.split_ms / choice.materialize_ms, 3)})
    return rows


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--data", type=Path, help="MNIST IDX gzip folder (default: the vendored data/mnist)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--budget", default=CONV_BUDGET)
    parser.add_argument("--bank-size", type=int, default=64)
    parser.add_argument("--depth", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (1 if args.quick else 3)
    train_x, train_y, test_x, test_y = mnist_tensors(flatten=False, root=args.data)
    if args.quick:  # 1 epoch on 20k training images
        train_x, train_y = train_x[:20000], train_y[:20000]
    data = (train_x, train_y, test_x, test_y)
    dense, trained = run_dense(args, data, epochs)
    slbf, model = run_slbf(args, data, epochs, trained)
    for layer in slbf["layers"]:
        print(f"{layer['name']}: {layer['layout']}; {layer['dense_bits']:,} -> {layer['stored_bits']:,} bits")
    rows = [dense, slbf]
    columns = ["model", "method", "budget", "dense_values", "stored_bits", "compression_ratio", "test_error_pct", "epochs", "seconds"]
    print_table(rows, columns)
    drop = slbf["test_error_pct"] - dense["test_error_pct"]
    print(f"conv weights: {slbf['compression_ratio']}x smaller in bits; test error +{drop:.2f} points vs dense")
    perf = perf_rows(model, data[2][:1000])
    print_table(perf, ["layer", "batch", "materialize_ms", "split_ms", "chosen"])
    write_results("mnist_slbf", rows + perf, args.out)


if __name__ == "__main__":
    main()
