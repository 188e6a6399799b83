"""FreshNets vs HashedNets on a LeNet-style CNN, full MNIST, at 1/16 and 1/64 of the weights.

The network: conv 1->32 5x5, max-pool, conv 32->64 5x5, max-pool, FC
1024->512, FC 512->10 (581,408 weights). Every layer is compressed, the
output layer included, as in the papers: ``freshnets`` stores the 5x5
filter banks as hashed DCT coefficients with more buckets for low
frequencies and falls back to HashedNets (bit-identical) for the FC layers,
so the two methods differ exactly on the convolutions. The equal-size dense
CNN scales every width by one factor so its weights match the stored values.
All rows: same seed, epochs, optimizer (SGD + Nesterov, cosine schedule).

Each compressed row also reports ``projected_error_pct``: the test error of
the trained dense CNN right after ``compress()`` projects its two conv
layers at the row's budget (least squares, no fine-tuning; the FC layers
stay dense, since there the methods are identical), and
``projected_conv_rel_error``, the relative weight error of that projection.
``--projection-budgets`` adds projection-only rows (no training) at more
budgets, to find where each method stops keeping the trained network.

    python benchmarks/mnist_cnn.py --out docs/results/mnist_cnn.json
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from hf_freqcompress import FreshNetsConfig, compress, parse_budget
from hf_freqcompress.methods import resolve_config

from common import (
    accuracy_row,
    compress_from_scratch,
    benchmark_parser,
    mnist_tensors,
    print_table,
    test_error_pct,
    train_classifier,
    write_results,
)

BUDGETS = ("1/16", "1/64")
WIDTHS = (32, 64, 512)
COLUMNS = ["model", "method", "budget", "stored_values", "test_error_pct", "projected_error_pct",
           "projected_conv_rel_error", "epochs", "seconds"]


def lenet(c1: int, c2: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.ReLU(), nn.Linear(hidden, 10),
    )  # fmt: skip


def weight_count(c1: int, c2: int, hidden: int) -> int:
    return 25 * c1 + 25 * c1 * c2 + 16 * c2 * hidden + 10 * hidden


def equal_size_widths(values: int) -> tuple[int, int, int]:
    """Widths (32s, 64s, 512s) rounded, with s chosen so the weight count is closest to ``values``."""
    candidates = {tuple(max(1, round(w * s / 1000)) for w in WIDTHS) for s in range(1, 1001)}
    return min(candidates, key=lambda widths: abs(weight_count(*widths) - values))


def name_of(widths: tuple[int, int, int]) -> str:
    return "lenet-" + "-".join(map(str, widths))


def method_config(method: str, args) -> object:
    if method == "freshnets":
        return FreshNetsConfig(alpha=args.alpha, beta=args.beta, allocation=args.allocation)
    return resolve_config(method)


def conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.Conv2d)]


def projected(dense_model: nn.Module, method: str, budget: str, args, data) -> dict:
    """Test error and conv weight error of the trained dense CNN right after compressing its convolutions."""
    model = copy.deepcopy(dense_model)
    before = conv_weights(model)
    convolutions = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    compress(model, budget=budget, method=method_config(method, args), targets=convolutions, exclude=[],
             seed=args.seed)
    after = conv_weights(model)
    error = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(after, before)))
    norm = math.sqrt(sum(float(b.pow(2).sum()) for b in before))
    return {
        "projected_error_pct": test_error_pct(model, data[2], data[3]),
        "projected_conv_rel_error": round(error / norm, 4),
    }


def run(widths, method: str, budget: str, data, args, epochs: int) -> tuple[dict, nn.Module]:
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(args.seed)
    model = lenet(*widths)
    dense_values = weight_count(*widths)
    stored = dense_values
    if method in ("freshnets", "hashednets"):
        stored = compress_from_scratch(model, budget, method_config(method, args), args.seed)
    seconds = train_classifier(model, train_x, train_y, epochs=epochs, lr=args.lr, seed=args.seed)
    row = accuracy_row(name_of(widths), method, budget, model, (test_x, test_y), dense_values=dense_values,
                       stored_values=stored, epochs=epochs, seconds=seconds)
    if method == "freshnets":
        row.update(alpha=args.alpha, beta=args.beta, allocation=args.allocation)
    return row, model


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--lr", type=float, default=0.01, help="0.05 diverges at 1/64: each bucket sums ~64 gradients")
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS))
    parser.add_argument("--methods", nargs="+", default=["dense", "freshnets", "hashednets", "dense_equal_size"])
    parser.add_argument("--alpha", type=float, default=FreshNetsConfig.alpha)
    parser.add_argument("--beta", type=float, default=FreshNetsConfig.beta)
    parser.add_argument("--allocation", default=FreshNetsConfig.allocation, choices=["beta", "uniform"])
    parser.add_argument("--projection-budgets", nargs="*", default=[],
                        help="also project the trained dense CNN's convolutions at these budgets (no training)")
    parser.add_argument("--train-size", type=int, help="train on the first N digits (default: all 60,000)")
    parser.add_argument("--validation", action="store_true",
                        help="train on the first 50,000 training digits, report error on the last 10,000 (for tuning)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (1 if args.quick else 6)
    train_x, train_y, test_x, test_y = mnist_tensors(flatten=False, validation=args.validation)
    size = args.train_size or (12_000 if args.quick else len(train_x))
    data = (train_x[:size], train_y[:size], test_x, test_y)

    rows: list[dict] = []
    dense_model = None
    if "dense" in args.methods:
        row, dense_model = run(WIDTHS, "dense", "1", data, args, epochs)
        rows.append(row)
    for budget in args.budgets:
        for method in ("freshnets", "hashednets"):
            if method not in args.methods:
                continue
            row, _ = run(WIDTHS, method, budget, data, args, epochs)
            if dense_model is not None:
                row.update(projected(dense_model, method, budget, args, data))
            rows.append(row)
            print_table(rows, COLUMNS)
        if "dense_equal_size" in args.methods:
            target = next((r["stored_values"] for r in rows if r["budget"] == budget and r["method"] != "dense"), None)
            target = target or parse_budget(budget).total_values(weight_count(*WIDTHS), 32)
            row, _ = run(equal_size_widths(target), "dense_equal_size", budget, data, args, epochs)
            rows.append(row)
        print_table(rows, COLUMNS)
    if dense_model is not None:
        rows += [{"model": name_of(WIDTHS), "method": method, "budget": budget,
                  **projected(dense_model, method, budget, args, data)}
                 for budget in args.projection_budgets for method in ("freshnets", "hashednets")]
        print_table(rows, COLUMNS)
    write_results("mnist_cnn", rows, args.out)


if __name__ == "__main__":
    main()
