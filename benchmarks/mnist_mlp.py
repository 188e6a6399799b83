"""HashedNets' MNIST experiment: the 784-1000-10 network at 1/8 and 1/64.

Rows: the dense network, HashedNets at each budget (every layer compressed,
the output layer included, as in the paper) and an equal-size dense network
whose hidden width gives the same number of weights as the stored values.
The paper's errors: 1.43% at 1/8 and 2.79% at 1/64 (equal-size dense: ~6%).
``--block-size B`` trains the tiled (ROAST) layout instead of per-weight hashing.

    python benchmarks/mnist_mlp.py --out docs/results/mnist_mlp.json
"""

from __future__ import annotations

import torch
from torch import nn

from hf_freqcompress import HashedNetsConfig

from common import accuracy_row, benchmark_parser, compress_from_scratch, mnist_tensors, print_table, train_classifier, write_results

BUDGETS = ("1/8", "1/64")
HIDDEN = 1000


def mlp(hidden: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))


def weight_count(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def run(label: str, method: str, budget: str, model: nn.Module, data, args, epochs: int) -> dict:
    train_x, train_y, test_x, test_y = data
    dense_values = weight_count(model)
    stored = dense_values
    if method == "hashednets":
        stored = compress_from_scratch(model, budget, HashedNetsConfig(block_size=args.block_size), args.seed)
    torch.manual_seed(args.seed)
    seconds = train_classifier(model, train_x, train_y, epochs=epochs, lr=args.lr, seed=args.seed)
    row = accuracy_row(label, method, budget, model, (test_x, test_y), dense_values=dense_values,
                       stored_values=stored, epochs=epochs, seconds=seconds)
    return {**row, "block_size": args.block_size} if method == "hashednets" else row


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS))
    parser.add_argument("--block-size", type=int, default=1, help="hashednets block_size (1: per weight; B > 1: tiled)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (3 if args.quick else 40)
    data = mnist_tensors(flatten=True)
    rows = []
    torch.manual_seed(args.seed)
    rows.append(run("mlp-784-1000-10", "dense", "1", mlp(HIDDEN, args.dropout), data, args, epochs))
    for budget in args.budgets:
        torch.manual_seed(args.seed)
        rows.append(run("mlp-784-1000-10", "hashednets", budget, mlp(HIDDEN, args.dropout), data, args, epochs))
        stored = rows[-1]["stored_values"]
        width = max(1, round(stored / (784 + 10)))
        torch.manual_seed(args.seed)
        rows.append(run(f"mlp-784-{width}-10", "dense_equal_size", budget, mlp(width, args.dropout), data, args, epochs))
        print_table(rows, ["model", "method", "budget", "block_size", "stored_values", "test_error_pct", "seconds"])
    write_results("mnist_mlp", rows, args.out)


if __name__ == "__main__":
    main()
