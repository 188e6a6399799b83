"""On-the-fly compression (Soulie et al., 2016) on LeNet-300-100 with full MNIST.

Rows, all with every layer (output layer included) product-quantized with the
same fixed (sub-vector length d, k centroids, one codebook per layer):

- ``dense``: 784-300-100-10 trained ``epochs + reg_epochs`` epochs;
- ``pq``: PQ of that dense model (k-means), then with codebook fine-tuning;
- ``pq+reg``: the dense model at ``epochs`` trained ``reg_epochs`` more with
  the ``pq_centroid`` penalty (same schedule as the dense continuation, only
  ``lam`` differs), then PQ, then with codebook fine-tuning.

Fine-tuning trains codebooks and biases; codes stay fixed. storage_ratio =
bits of the dense fp32 weights / bits stored (packed codes + codebooks).
The last row times k-means (d=4, k=256) on a 4096x4096 matrix.
Deep Compression reports 40x at 1.58% on this network (pruning +
quantization + Huffman coding).

    python benchmarks/mnist_pq.py --out docs/results/mnist_pq.json
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hf_freqcompress import PQConfig, compress
from hf_freqcompress.kmeans import kmeans
from hf_freqcompress.methods.pq import PQLayout, PQWeight
from hf_freqcompress.regularizers import get_regularizer
from hf_freqcompress.surgery import select_targets

from common import benchmark_parser, mnist_tensors, print_table, test_error_pct, train_classifier, write_results

NAME = "mnist_pq"
MODEL = "lenet-300-100"


# -- the experiment -------------------------------------------------------------------
def lenet_300_100() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def dense_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def pq_cost_values(model: nn.Module, config: PQConfig) -> int:
    """Stored values (fp32) the fixed PQ settings need for every layer: the budget we pass."""
    return sum(PQWeight.min_values(t.spec(32), config) for t in select_targets(model, exclude=[]))


def lam_schedule(lam: float, total_steps: int) -> Callable[[int], float]:
    """Geometric ramp from lam/100 to lam over the first half of training, then lam.

    Weights first drift toward the centroids while the task loss still
    dominates, then snap to them while the learning rate is still large
    enough to move them (the cosine schedule reaches 0 at the end).
    """
    half = max(total_steps // 2, 1)
    return lambda step: lam * 100.0 ** (min(step / half, 1.0) - 1.0)


def row(label: str, model: nn.Module, data, *, dense_values: int, stored_bits: int, stored_values: int,
        budget: Any, epochs: int, seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "method": label,
        "budget": budget,
        "dense_values": dense_values,
        "stored_values": stored_values,
        "stored_bits": stored_bits,
        "storage_ratio": round(32 * dense_values / stored_bits, 2),
        "test_error_pct": test_error_pct(model, data[2], data[3]),
        "epochs": epochs,
        "seconds": round(seconds, 1),
        **extra,
    }


def quantize_and_finetune(label: str, base: nn.Module, data, config: PQConfig, args, epochs_so_far: int,
                          seconds_so_far: float, regularizer: str | None) -> list[dict[str, Any]]:
    model = copy.deepcopy(base)
    budget = pq_cost_values(model, config)
    start = time.perf_counter()
    report = compress(model, budget, config, exclude=[], seed=args.seed)
    seconds = seconds_so_far + time.perf_counter() - start
    common = dict(budget=budget, dense_values=report.dense_values, stored_values=report.stored_values,
                  stored_bits=sum(layer.stored_bits for layer in report.layers), regularizer=regularizer,
                  subvector=config.subvector, k=config.k,
                  rel_error=round(sum(layer.rel_error for layer in report.layers) / len(report.layers), 4))
    rows = [row(label, model, data, epochs=epochs_so_far, seconds=seconds, finetuned=False, **common)]
    seconds += train_classifier(model, data[0], data[1], epochs=args.finetune_epochs, lr=args.finetune_lr,
                                seed=args.seed + 2, optimizer="adam")
    rows.append(row(label, model, data, epochs=epochs_so_far + args.finetune_epochs, seconds=seconds,
                    finetuned=True, **common))
    return rows


def kmeans_speed_row(args) -> dict[str, Any]:
    weight = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(args.seed))
    layout = PQLayout.of((4096, 4096), 4, 256, 1)
    start = time.perf_counter()
    kmeans(layout.subvectors(weight), 256, generator=torch.Generator().manual_seed(args.seed), iterations=20)
    return {"model": "linear-4096x4096", "method": "pq", "budget": "d=4,k=256", "metric": "compress_seconds",
            "value": round(time.perf_counter() - start, 2)}


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--data", type=Path, help="MNIST IDX gzip folder (default: the vendored copy)")
    parser.add_argument("--subvector", type=int, default=4, help="PQ sub-vector length d")
    parser.add_argument("--k", type=int, default=8, help="PQ centroids per codebook")
    parser.add_argument("--lam", type=float, default=1.0, help="regularizer weight (ramped up from lam/100)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--finetune-lr", type=float, default=1e-3, help="Adam learning rate of codebook fine-tuning")
    parser.add_argument("--reg-epochs", type=int, help="epochs of each branch (with / without the penalty)")
    parser.add_argument("--finetune-epochs", type=int, help="codebook fine-tuning epochs after PQ")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.epochs = args.epochs or (2 if args.quick else 10)
    args.reg_epochs = args.reg_epochs or (1 if args.quick else 10)
    args.finetune_epochs = args.finetune_epochs or (1 if args.quick else 3)
    # Pixels are scaled, not standardized (as in the Caffe LeNet recipes): the
    # blank border stays exactly 0, so quantization error on weights that only
    # ever see blank pixels costs nothing instead of adding up into a bias shift.
    data = mnist_tensors(flatten=True, normalize=False, root=args.data)
    config = PQConfig(subvector=args.subvector, k=args.k, codebooks=1)

    torch.manual_seed(args.seed)
    base = lenet_300_100()
    base_seconds = train_classifier(base, data[0], data[1], epochs=args.epochs, lr=args.lr, seed=args.seed)
    branch_epochs = args.epochs + args.reg_epochs

    # The two branches share the first `epochs` and the continuation schedule; only the penalty differs.
    dense = copy.deepcopy(base)
    dense_seconds = base_seconds + train_classifier(dense, data[0], data[1], epochs=args.reg_epochs,
                                                    lr=args.lr / 10, seed=args.seed + 1)
    regularized = copy.deepcopy(base)
    steps = args.reg_epochs * math.ceil(len(data[0]) / 128)
    penalty = get_regularizer("pq_centroid", subvector=args.subvector, k=args.k, codebooks=1, exclude=[],
                              recluster_every=math.ceil(len(data[0]) / 128), seed=args.seed)
    lam = lam_schedule(args.lam, steps)
    reg_seconds = base_seconds + train_classifier(regularized, data[0], data[1], epochs=args.reg_epochs,
                                                  lr=args.lr / 10, seed=args.seed + 1,
                                                  extra_loss=lambda step: lam(step) * penalty(regularized))
    n = dense_weights(dense)
    rows = [row("dense", dense, data, dense_values=n, stored_bits=32 * n, stored_values=n, budget="dense",
                epochs=branch_epochs, seconds=dense_seconds)]
    rows += quantize_and_finetune("pq", dense, data, config, args, branch_epochs, dense_seconds, None)
    rows += quantize_and_finetune("pq+reg", regularized, data, config, args, branch_epochs, reg_seconds,
                                  f"pq_centroid(lam={args.lam})")
    speed = kmeans_speed_row(args)

    print_table(rows, ["method", "finetuned", "subvector", "k", "stored_bits", "storage_ratio", "rel_error",
                       "test_error_pct", "epochs", "seconds"])
    print(f"k-means d=4 k=256 on a 4096x4096 matrix ({args.threads} threads): {speed['value']} s")
    write_results(NAME, [*rows, speed], args.out)


if __name__ == "__main__":
    main()
