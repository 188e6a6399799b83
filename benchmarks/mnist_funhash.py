"""FunHashNN vs HashedNets on MNIST MLPs, trained side by side in one run.

The claim under test (Shi et al., 2016): at the same number of stored values,
U hashes plus a learned reconstruction net g (``funhash``) reach a lower test
error than one hash (``hashednets``). Every compressed row uses the same
seeds, epochs, optimizer and batches; the output layer is compressed too
(``exclude=[]``), as in both papers. Also printed: the train-step time ratio
funhash / hashednets on the same network and batch.

    PYTHONPATH=. python benchmarks/mnist_funhash.py --out docs/results/mnist_funhash.json
    PYTHONPATH=. python benchmarks/mnist_funhash.py --quick   # minutes, same code path
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_freqcompress import FunHashConfig, compress
from hf_freqcompress.data import load_mnist

NETWORKS = {"mlp-784-1000-10": (784, 1000, 10), "mlp5-784-500-500-500-10": (784, 500, 500, 500, 10)}


@dataclass(frozen=True)
class Run:
    """One row to train: a network, a method (None = dense) and a budget."""

    network: str
    method: str
    budget: str
    config: Any = None


def load_flat_mnist(root: Path | None, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened images scaled to [0, 1] and int64 labels."""
    images, labels = load_mnist(split, root)
    return images.reshape(-1, 784).float() / 255, labels


def build_mlp(sizes: tuple[int, ...], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def prepare(run: Run, seed: int) -> tuple[nn.Module, dict[str, int]]:
    """The network of ``run``, compressed as it says, and its value counts."""
    model = build_mlp(NETWORKS[run.network], seed)
    weights = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    others = sum(m.bias.numel() for m in model if isinstance(m, nn.Linear))
    if run.method == "dense":
        return model, {"dense_values": weights, "stored_values": weights, "stored_bits": 32 * weights,
                       "other_values": others}
    report = compress(model, run.budget, run.config or run.method, exclude=[], seed=seed)
    return model, {"dense_values": report.dense_values, "stored_values": report.stored_values,
                   "stored_bits": report.stored_bytes * 8, "other_values": others}


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        wrong = sum(int((model(x).argmax(1) != y).sum()) for x, y in zip(images.split(2000), labels.split(2000)))
    model.train()
    return 100.0 * wrong / len(labels)


def train(run: Run, data: dict[str, tuple[torch.Tensor, torch.Tensor]], args: argparse.Namespace) -> dict[str, Any]:
    model, counts = prepare(run, args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    images, labels = data["train"]
    order = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for _ in range(args.epochs):
        for batch in torch.randperm(len(labels), generator=order).split(args.batch_size):
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    error = evaluate(model, *data["test"])
    row = {"model": run.network, "method": run.method, "budget": run.budget, **counts,
           "test_error_pct": round(error, 2), "epochs": args.epochs, "seconds": round(seconds, 1)}
    if run.config is not None:
        row["config"] = run.config.to_dict()
    print(f"  {run.network} {run.method} {run.budget}: {error:.2f}% error in {seconds:.0f}s", flush=True)
    return row


def step_time_ratio(network: str, budget: str, config: FunHashConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Median train-step time funhash / hashednets, interleaved so load changes hit both alike."""
    models = {name: prepare(Run(network, name, budget, cfg), args.seed)[0]
              for name, cfg in (("hashednets", None), ("funhash", config))}
    optimizers = {name: torch.optim.Adam(model.parameters()) for name, model in models.items()}
    x = torch.rand(args.batch_size, NETWORKS[network][0])
    y = torch.randint(0, 10, (args.batch_size,))
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(args.timing_steps + 3):
        for name, model in models.items():
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            if step >= 3:  # warm-up
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["funhash"] / medians["hashednets"]
    print(f"  train step {network} {budget}: funhash {1e3 * medians['funhash']:.1f} ms, "
          f"hashednets {1e3 * medians['hashednets']:.1f} ms, ratio {ratio:.2f}", flush=True)
    return {"model": network, "method": "funhash", "budget": budget, "metric": "train_step_ratio",
            "value": round(ratio, 3), "config": config.to_dict(),
            "funhash_ms": round(1e3 * medians["funhash"], 2), "hashednets_ms": round(1e3 * medians["hashednets"], 2)}


def plan(args: argparse.Namespace) -> list[Run]:
    funhash = FunHashConfig()  # U = 4, mlp g (the authors' G3), one space per layer
    runs = [Run("mlp-784-1000-10", "dense", "1")]
    for budget in ("1/64", "1/8"):
        runs += [Run("mlp-784-1000-10", "hashednets", budget), Run("mlp-784-1000-10", "funhash", budget, funhash)]
    runs += [Run("mlp5-784-500-500-500-10", "hashednets", "1/64"),
             Run("mlp5-784-500-500-500-10", "funhash", "1/64", funhash)]
    # ablations at 1/64: a learned linear g, multiple hashing alone (fixed sum), one space for all layers
    ablations = [FunHashConfig(reconstruction="linear"), FunHashConfig(reconstruction="sum"),
                 FunHashConfig(shared_space=True)]
    ablations += [FunHashConfig.from_dict(json.loads(variant)) for variant in args.variants]
    runs += [Run("mlp-784-1000-10", "funhash", "1/64", config) for config in ablations]
    return runs


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | method | options (vs funhash defaults U=4, mlp g) | budget | stored values | test error % | epochs | seconds |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for row in rows:
        if "test_error_pct" in row:
            defaults = FunHashConfig().to_dict()
            options = ", ".join(f"{k}={v}" for k, v in row.get("config", {}).items() if defaults.get(k) != v)
            lines.append(f"| {row['model']} | {row['method']} | {options} | {row['budget']} | "
                         f"{row['stored_values']:,} | {row['test_error_pct']:.2f} | {row['epochs']} | {row['seconds']} |")
    for row in rows:
        if "metric" in row:
            lines.append(f"\n{row['metric']} {row['model']} {row['budget']}: funhash / hashednets = {row['value']:.2f} "
                         f"({row['funhash_ms']} ms / {row['hashednets_ms']} ms per step)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 epoch on 10k training images")
    parser.add_argument("--out", type=Path, help="write the JSON rows here")
    parser.add_argument("--data", type=Path, default=None, help="folder with the MNIST IDX .gz files (default: vendored)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared, loaded CPU")
    parser.add_argument("--timing-steps", type=int, default=30)
    parser.add_argument("--variants", nargs="*", default=[],
                        help='extra funhash configs at 1/64 on 784-1000-10, as JSON: \'{"reconstruction": "linear"}\'')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = {split: load_flat_mnist(args.data, split) for split in ("train", "test")}
    if args.quick:
        args.epochs, args.timing_steps = 1, 10
        data["train"] = tuple(t[:10_000] for t in data["train"])
    rows = [train(run, data, args) for run in plan(args)]
    rows += [step_time_ratio("mlp-784-1000-10", budget, FunHashConfig(), args) for budget in ("1/64", "1/8")]
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"benchmark": "mnist_funhash", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
