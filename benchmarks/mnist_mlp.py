"""HashedNets' and FunHashNN's MNIST experiments, every row trained alike in one run.

Rows:

- the HashedNets paper's 784-1000-10 network: dense, then at 1/8 and 1/64
  each method of ``--methods`` and an equal-size dense network (the hidden
  width whose weights match the stored values);
- a 5-layer MLP (784-500-500-500-10) at 1/64 with each method;
- the train-step time of every other method relative to the first, on
  784-1000-10 at each budget (interleaved medians, so load hits both alike).

``--distill`` trains the 784-1000-10 compressed and equal-size rows against
the dense row's soft targets as well (HashedNets' "DK" rows: knowledge
distillation from the dense network; method labels gain ``+dk``). The
5-layer rows are never distilled. ``--from-dense`` compresses the trained
dense row instead of a fresh network (least-squares projection, then the
same training: the library's compress-then-fine-tune workflow); labels gain
``+from_dense``.

Every layer is compressed, the output layer included (``exclude=[]``), as in
both papers, from a fresh init with ``init="preserve_norm"``. Same seed,
batches, epochs, optimizer and loss (cross-entropy with label smoothing 0.1,
``--label-smoothing``) for every row. Paper errors on 784-1000-10:
HashedNets 1.43% at 1/8 and 2.79% at 1/64 (equal-size dense ~6%); FunHashNN
claims lower errors than HashedNets at the same budget.

    python benchmarks/mnist_mlp.py --out docs/results/mnist_mlp.json
    python benchmarks/mnist_mlp.py --methods funhash '{"method": "funhash", "reconstruction": "linear"}'
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from hf_freqcompress import compress
from hf_freqcompress.methods import MethodConfig

from common import (
    accuracy_row,
    alternating_ratio,
    benchmark_parser,
    compress_from_scratch,
    method_config,
    mnist_tensors,
    print_table,
    soft_targets,
    train_classifier,
    train_step,
    write_results,
)

WIDE = (784, 1000, 10)
DEEP = (784, 500, 500, 500, 10)
BUDGETS = ("1/8", "1/64")
DEEP_BUDGET = "1/64"
COLUMNS = ["model", "method", "budget", "stored_values", "test_error_pct", "epochs", "seconds"]


def mlp(sizes: tuple[int, ...], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers[:-2])


def label(sizes: tuple[int, ...]) -> str:
    return f"mlp{'5' if len(sizes) > 3 else ''}-{'-'.join(map(str, sizes))}"


def method_label(config: MethodConfig) -> str:
    """The method's name, plus the options that differ from its defaults (one plot line each)."""
    defaults = type(config)().to_dict()
    changed = [f"{k}={v}" for k, v in config.to_dict().items() if defaults[k] != v]
    return f"{config.method}[{','.join(changed)}]" if changed else config.method


def run(sizes: tuple[int, ...], config: MethodConfig | None, budget: str, data, args,
        teacher_logits: torch.Tensor | None = None, start: nn.Module | None = None) -> tuple[dict[str, Any], nn.Module]:
    """Train one row; returns its table row and the trained model.

    ``start``: a trained dense network to compress (least-squares projection,
    the library's compress-then-fine-tune workflow) instead of a fresh init.
    """
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(args.seed)
    dense_values = sum(a * b for a, b in zip(sizes, sizes[1:]))
    if start is not None:
        model = copy.deepcopy(start)
        stored = compress(model, budget=budget, method=config, exclude=[], seed=args.seed).stored_values
    else:
        model = mlp(sizes, args.dropout)
        stored = compress_from_scratch(model, budget, config, args.seed) if config else dense_values
    torch.manual_seed(args.seed)
    seconds = train_classifier(model, train_x, train_y, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                               batch_size=args.batch_size, seed=args.seed, teacher_logits=teacher_logits,
                               distill_alpha=args.distill_alpha, temperature=args.temperature,
                               label_smoothing=args.label_smoothing)
    method = (method_label(config) if config else "dense") + ("+from_dense" if start is not None else "")
    row = accuracy_row(label(sizes), method + ("+dk" if teacher_logits is not None else ""),
                       budget if config else "1", model, (test_x, test_y), dense_values=dense_values,
                       stored_values=stored, epochs=args.epochs, seconds=seconds)
    print_table([row], COLUMNS)
    return row, model


def step_time_ratio(config: MethodConfig, reference: MethodConfig, budget: str, args) -> dict[str, Any]:
    """Train-step time with ``config`` / with ``reference`` on 784-1000-10, same batch."""
    x, y = torch.randn(args.batch_size, WIDE[0]), torch.randint(0, 10, (args.batch_size,))

    def stepper(method: MethodConfig):
        torch.manual_seed(args.seed)
        model = mlp(WIDE, args.dropout)
        compress_from_scratch(model, budget, method, args.seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        return lambda: train_step(model, optimizer, x, y)

    ratio = alternating_ratio(stepper(reference), stepper(config), args.timing_steps)
    return {"model": label(WIDE), "method": method_label(config), "budget": budget,
            "metric": f"train_step_vs_{method_label(reference)}", "value": round(ratio, 3)}


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--methods", nargs="+", default=["hashednets", "funhash"],
                        help="names, name:key=value,... or JSON configs; the first is the step-time reference")
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), help="784-1000-10 budgets")
    parser.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--label-smoothing", type=float, default=0.1,
                        help="cross-entropy target smoothing, every row (0.1: validation 1.50%% vs 1.63%% at 1/8)")
    parser.add_argument("--timing-steps", type=int, default=20)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense and equal-size rows")
    parser.add_argument("--distill", action="store_true",
                        help="distil the 784-1000-10 compressed and equal-size rows from the dense row (needs it)")
    parser.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the distillation term")
    parser.add_argument("--temperature", type=float, default=4.0, help="distillation temperature")
    parser.add_argument("--from-dense", action="store_true",
                        help="784-1000-10 compressed rows start from the trained dense row (projected), not a fresh init")
    parser.add_argument("--no-deep", action="store_true", help="skip the 5-layer MLP rows")
    parser.add_argument("--validation", action="store_true",
                        help="train on the first 50,000 training digits, report error on the last 10,000 (for tuning)")
    args = parser.parse_args()
    args.epochs = args.epochs or (3 if args.quick else 30)
    if (args.distill or args.from_dense) and args.no_dense:
        parser.error("--distill and --from-dense need the dense row; drop --no-dense")
    torch.set_num_threads(args.threads)
    methods = [method_config(text) for text in args.methods]
    data = mnist_tensors(flatten=True, validation=args.validation)
    rows, teacher, dense_model = [], None, None
    if not args.no_dense:
        dense_row, dense_model = run(WIDE, None, "1", data, args)
        rows.append(dense_row)
        teacher = soft_targets(dense_model, data[0]) if args.distill else None
    start = dense_model if args.from_dense else None
    for budget in args.budgets:
        rows += [run(WIDE, config, budget, data, args, teacher, start)[0] for config in methods]
        if not args.no_dense:
            width = max(1, round(rows[-1]["stored_values"] / (WIDE[0] + WIDE[-1])))
            equal, _ = run((WIDE[0], width, WIDE[-1]), None, budget, data, args, teacher)
            rows.append({**equal, "method": equal["method"].replace("dense", "dense_equal_size"), "budget": budget})
    if not args.no_deep:
        rows += [run(DEEP, config, DEEP_BUDGET, data, args)[0] for config in methods]
    rows += [step_time_ratio(config, methods[0], budget, args) for config in methods[1:] for budget in args.budgets]
    print_table([r for r in rows if "test_error_pct" in r], COLUMNS)
    print_table([r for r in rows if "metric" in r], ["model", "method", "budget", "metric", "value"])
    write_results("mnist_mlp", rows, args.out)


if __name__ == "__main__":
    main()
