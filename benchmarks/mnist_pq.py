"""On-the-fly compression (Soulie et al., 2016) on LeNet-300-100 with full MNIST.

Every layer (output layer included) is product-quantized with its own
(sub-vector length d, k centroids), one codebook per layer, codebooks
stored as ``--storage-dtype`` (fp16 by default; test errors are measured
with the codebooks rounded to it, i.e. with what a checkpoint holds). Rows:

- ``dense``: 784-300-100-10 (dropout on the hidden activations while
  training) trained ``epochs`` epochs, then ``reg_epochs`` more at a lower
  learning rate;
- ``pq``: PQ of that dense model (k-means), then with codebook fine-tuning;
- ``pq+reg``: the same continuation with the ``pq_centroid`` penalty of the
  same PQ settings added (only ``lam`` differs), then PQ, then fine-tuning.

Fine-tuning trains codebooks and biases; codes stay fixed. storage_ratio =
bits of the dense fp32 weights / bits stored (packed codes + codebooks).
The last row times k-means (d=4, k=256) on a 4096x4096 matrix.
Deep Compression reports 40x at 1.58% on this network (pruning +
quantization + Huffman coding).

``--validation`` trains on the first 50,000 training images and reports
error on the last 10,000 instead of the test set: the settings were chosen
that way, never on the test set.

    python benchmarks/mnist_pq.py --threads 1 --out docs/results/mnist_pq.json
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import (
    VALIDATION_IMAGES,
    benchmark_parser,
    mnist_tensors,
    print_table,
    round_to_storage,
    soft_targets,
    test_error_pct,
    train_classifier,
    write_results,
)
from torch import nn

from hf_freqcompress import LayerReport, PQConfig, compress
from hf_freqcompress.kmeans import kmeans
from hf_freqcompress.methods.pq import PQLayout, PQWeight
from hf_freqcompress.regularizers import Penalty, get_regularizer
from hf_freqcompress.surgery import select_targets

NAME = "mnist_pq"
MODEL = "lenet-300-100"
_SETTING_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


# -- the experiment -------------------------------------------------------------------
def lenet_300_100(dropout: float) -> nn.Sequential:
    """784-300-100-10 with ReLU; dropout on the hidden activations only acts while training."""
    return nn.Sequential(
        nn.Linear(784, 300), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(300, 100), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(100, 10),
    )  # fmt: skip


def parse_settings(text: str, layers: int) -> list[tuple[int, int]]:
    """``"16x256,5x16,2x8"`` -> one (d, k) per Linear layer, first layer first."""
    matches = [_SETTING_RE.match(part) for part in text.split(",")]
    if len(matches) != layers or not all(matches):
        raise ValueError(f"--layers {text!r} must give one DxK per Linear layer ({layers}), e.g. '16x256,5x16,2x8'")
    return [(int(m.group(1)), int(m.group(2))) for m in matches]


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def dense_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def pq_configs(model: nn.Module, settings: list[tuple[int, int]]) -> dict[str, PQConfig]:
    return {name: PQConfig(subvector=d, k=k, codebooks=1) for name, (d, k) in zip(linear_names(model), settings)}


def product_quantize(model: nn.Module, configs: dict[str, PQConfig], dtype: torch.dtype, seed: int) -> list[LayerReport]:
    """One ``compress()`` per layer with its pinned settings and a budget of exactly their cost."""
    bits = torch.finfo(dtype).bits
    layers = []
    for name, config in configs.items():
        (target,) = select_targets(model, [name], exclude=[])
        budget = PQWeight.min_values(target.spec(bits), config)
        layers += compress(model, budget, config, targets=[name], exclude=[], seed=seed, storage_dtype=dtype).layers
    return layers


def penalty_of(model: nn.Module, configs: dict[str, PQConfig], seed: int, recluster_every: int) -> Penalty:
    """Sum of one ``pq_centroid`` penalty per layer, each with that layer's PQ settings."""
    penalties = [
        get_regularizer("pq_centroid", subvector=c.subvector, k=c.k, codebooks=c.codebooks, targets=[name],
                        exclude=[], recluster_every=recluster_every, seed=seed)
        for name, c in configs.items()
    ]
    return lambda m: sum(penalty(m) for penalty in penalties)


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


def quantize_and_finetune(label: str, base: nn.Module, data, configs: dict[str, PQConfig], args,
                          epochs_so_far: int, seconds_so_far: float, regularizer: str | None) -> list[dict[str, Any]]:
    model = copy.deepcopy(base)
    start = time.perf_counter()
    layers = product_quantize(model, configs, args.storage_dtype, args.seed)
    round_to_storage(model, args.storage_dtype)
    seconds = seconds_so_far + time.perf_counter() - start
    common = {
        "budget": args.layers,
        "dense_values": dense_weights(model),
        "stored_values": sum(layer.stored_values for layer in layers),
        "stored_bits": sum(layer.stored_bits for layer in layers),
        "regularizer": regularizer,
        "storage_dtype": str(args.storage_dtype).removeprefix("torch."),
        "rel_error": round(sum(layer.rel_error for layer in layers) / len(layers), 4),
    }
    rows = [row(label, model, data, epochs=epochs_so_far, seconds=seconds, finetuned=False, **common)]
    teacher = soft_targets(base, data[0]) if args.finetune_distill else None
    if args.finetune_dropout is not None:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = args.finetune_dropout
    seconds += train_classifier(model, data[0], data[1], epochs=args.finetune_epochs, lr=args.finetune_lr,
                                seed=args.seed + 2, optimizer="adam", teacher_logits=teacher,
                                distill_alpha=args.finetune_distill)
    round_to_storage(model, args.storage_dtype)
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


def load_data(args) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, eval_x, eval_y): the test set, or with --validation the last 10k training images."""
    # Pixels are scaled, not standardized (as in the Caffe LeNet recipes): the
    # blank border stays exactly 0, so quantization error on weights that only
    # ever see blank pixels costs nothing instead of adding up into a bias shift.
    return mnist_tensors(flatten=True, normalize=False, root=args.data, validation=args.validation)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--data", type=Path, help="MNIST IDX gzip folder (default: the vendored copy)")
    parser.add_argument("--layers", default="16x256,5x16,2x8",
                        help="PQ settings DxK (sub-vector length x centroids) per Linear layer, first layer first")
    parser.add_argument("--storage-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                        help="dtype of the stored codebooks")
    parser.add_argument("--dropout", type=float, default=0.2, help="dropout on the hidden activations")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate of the dense epochs")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay of the dense epochs")
    parser.add_argument("--reg-lr", type=float, default=0.01, help="SGD learning rate of both continuations")
    parser.add_argument("--lam", type=float, default=0.1, help="regularizer weight (ramped up from lam/100)")
    parser.add_argument("--finetune-lr", type=float, default=1e-3, help="Adam learning rate of codebook fine-tuning")
    parser.add_argument("--finetune-dropout", type=float,
                        help="dropout on the hidden activations while fine-tuning codebooks (default: --dropout)")
    parser.add_argument("--finetune-distill", type=float, default=0.0, metavar="ALPHA",
                        help="fine-tune against the unquantized model's logits: (1 - ALPHA) CE + ALPHA KD (T 4)")
    parser.add_argument("--reg-epochs", type=int, help="epochs of each continuation (with / without the penalty)")
    parser.add_argument("--finetune-epochs", type=int, help="codebook fine-tuning epochs after PQ")
    parser.add_argument("--validation", action="store_true",
                        help="train on 50k training images, report error on the other 10k (for choosing settings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.epochs = args.epochs or (2 if args.quick else 30)
    args.reg_epochs = args.reg_epochs or (1 if args.quick else 10)
    args.finetune_epochs = args.finetune_epochs or (1 if args.quick else 3)
    args.storage_dtype = getattr(torch, args.storage_dtype)
    data = load_data(args)

    torch.manual_seed(args.seed)
    base = lenet_300_100(args.dropout)
    configs = pq_configs(base, parse_settings(args.layers, len(linear_names(base))))
    base_seconds = train_classifier(base, data[0], data[1], epochs=args.epochs, lr=args.lr,
                                    weight_decay=args.weight_decay, seed=args.seed)
    branch_epochs = args.epochs + args.reg_epochs

    # The two branches share the first `epochs` and the continuation schedule; only the penalty differs.
    dense = copy.deepcopy(base)
    dense_seconds = base_seconds + train_classifier(dense, data[0], data[1], epochs=args.reg_epochs,
                                                    lr=args.reg_lr, seed=args.seed + 1)
    regularized = copy.deepcopy(base)
    steps_per_epoch = math.ceil(len(data[0]) / 128)
    penalty = penalty_of(regularized, configs, args.seed, recluster_every=steps_per_epoch)
    lam = lam_schedule(args.lam, args.reg_epochs * steps_per_epoch)
    reg_seconds = base_seconds + train_classifier(regularized, data[0], data[1], epochs=args.reg_epochs,
                                                  lr=args.reg_lr, seed=args.seed + 1,
                                                  extra_loss=lambda step: lam(step) * penalty(regularized))
    n = dense_weights(dense)
    rows = [row("dense", dense, data, dense_values=n, stored_bits=32 * n, stored_values=n, budget="dense",
                epochs=branch_epochs, seconds=dense_seconds)]
    rows += quantize_and_finetune("pq", dense, data, configs, args, branch_epochs, dense_seconds, None)
    rows += quantize_and_finetune("pq+reg", regularized, data, configs, args, branch_epochs, reg_seconds,
                                  f"pq_centroid(lam={args.lam})")
    speed = kmeans_speed_row(args)

    print_table(rows, ["method", "finetuned", "budget", "stored_bits", "storage_ratio", "rel_error",
                       "test_error_pct", "epochs", "seconds"])
    print(f"k-means d=4 k=256 on a 4096x4096 matrix ({args.threads} threads): {speed['value']} s")
    if args.validation:
        print(f"(--validation: test_error_pct is the error on the last {VALIDATION_IMAGES} training images)")
    write_results(NAME, [*rows, speed], args.out)


if __name__ == "__main__":
    main()
