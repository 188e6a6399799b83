"""One-shot compression of trained networks: error right after compress() and after one epoch, by calibration variant.

Three MNIST networks are trained once (dense, cached in ``benchmarks/cache``;
``--retrain`` trains them again): the LeNet-5 of the zoo (one large FC
layer), ``mnist_allconv`` (over 99% of the weights in 5x5 and 3x3
convolutions, global average pooling) and ``mnist_resnet`` (basic blocks,
batch norm). Every layer is compressed (``exclude=[]``) at each budget and
the test error measured right away, for these variants:

- ``plain``: proportional split, least-squares weight projection (no data);
- ``output``: proportional split, output-aware projection on the calibration batches;
- ``sensitivity``: the split by measured loss sensitivity, output-aware projection;
- ``calibrated``: ``sensitivity`` plus ``seed_trials`` (4) hash seeds per layer.

``--finetune`` adds one epoch of SGD on the training set after ``plain`` and
``calibrated`` (``epochs`` = 1 in those rows). Calibration: 8 seeded random
batches of 128 training images. ``--seed`` is the hash seed: run once per
seed and merge with ``seeds.py`` for means and spreads.

``--scratch`` instead trains ``mnist_allconv`` from a random initialisation
with each method (``init="preserve_norm"``), the FreshNets paper's setting
of a convolution-dominated network.

    python benchmarks/pretrained.py --seed 0 --finetune --out /tmp/pretrained_s0.json
    python benchmarks/pretrained.py --seed 0 --finetune --variants plain calibrated  # the fine-tuned rows only
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hf_freqcompress import available_methods, compress, get_reports
from hf_freqcompress.models import build_model

from common import (
    accuracy_row,
    benchmark_parser,
    compress_from_scratch,
    mnist_tensors,
    print_table,
    train_classifier,
    write_results,
)

NETS = ("mnist_lenet", "mnist_allconv", "mnist_resnet")
BUDGETS = ("1/2", "1/4", "1/16", "1/64")
VARIANTS = {
    "plain": {},
    "output": {"calibration": True},
    "sensitivity": {"calibration": True, "strategy": "sensitivity"},
    "calibrated": {"calibration": True, "strategy": "sensitivity", "seed_trials": 4},
}
LIGHT_VARIANTS = ("plain", "calibrated")
"""Variants run for methods other than hashednets / freshnets (the full ladder for the two the floors compare)."""
CACHE = Path(__file__).resolve().parent / "cache"
DENSE_EPOCHS = 3
COLUMNS = ["model", "method", "variant", "budget", "stored_values", "test_error_pct", "epochs", "seconds"]


def trained(name: str, data: tuple, retrain: bool) -> nn.Module:
    """The dense network, trained once (Adam, 3 epochs, seed 0) and cached as safetensors."""
    model = build_model(f"timm:{name}")
    path = CACHE / f"{name}.safetensors"
    if path.is_file() and not retrain:
        model.load_state_dict(load_file(path))
        return model.eval()
    train_x, train_y, _, _ = data
    torch.manual_seed(0)
    train_classifier(model, train_x, train_y, epochs=DENSE_EPOCHS, optimizer="adam", lr=1e-3, seed=0)
    CACHE.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model.eval()


def calibration_batches(train_x: torch.Tensor, train_y: torch.Tensor, count: int = 8, size: int = 128) -> list:
    chosen = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1234))[: count * size]
    return [(train_x[chosen[i : i + size]], train_y[chosen[i : i + size]]) for i in range(0, len(chosen), size)]


def _row(name: str, method: str, budget: str, model: nn.Module, data: tuple, variant: str, epochs: int,
         seconds: float, report=None) -> dict:
    dense_values = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    stored = report.stored_values if report else dense_values
    row = accuracy_row(name, method, budget, model, data[2:], dense_values=report.dense_values if report else dense_values,
                       stored_values=stored, epochs=epochs, seconds=seconds)
    row["stored_bits"] = sum(layer.stored_bits for layer in report.layers) if report else stored * 32
    return {**row, "variant": variant}


def one_shot(name: str, dense: nn.Module, data: tuple, args, calibration: list) -> list[dict]:
    train_x, train_y, _, _ = data
    rows = [_row(name, "dense", "1", dense, data, "dense", 0, 0.0)]
    for method in args.methods:
        variants = [v for v in (VARIANTS if method in ("hashednets", "freshnets") else LIGHT_VARIANTS) if v in args.variants]
        for budget in args.budgets:
            for variant in variants:
                options = dict(VARIANTS[variant])
                if options.pop("calibration", False):
                    options["calibration"] = calibration
                model = copy.deepcopy(dense)
                start = time.perf_counter()
                report = compress(model, budget=budget, method=method, exclude=[], seed=args.seed, **options)
                rows.append(_row(name, method, budget, model, data, variant, 0, time.perf_counter() - start, report))
                if args.finetune and variant in LIGHT_VARIANTS:
                    seconds = train_classifier(model, train_x, train_y, epochs=1, lr=0.01, seed=args.seed)
                    rows.append(_row(name, method, budget, model, data, variant, 1, seconds, report))
                print_table(rows[-1:], COLUMNS)
    return rows


def from_scratch(data: tuple, args) -> list[dict]:
    """mnist_allconv trained from a random initialisation with each method at each budget (and dense)."""
    train_x, train_y, _, _ = data
    epochs = args.epochs or (1 if args.quick else 3)
    rows = []
    for method in ["dense", *args.methods]:
        for budget in ["1"] if method == "dense" else args.budgets:
            torch.manual_seed(args.seed)
            model = build_model("timm:mnist_allconv")
            report = compress_report(model, budget, method, args.seed) if method != "dense" else None
            seconds = train_classifier(model, train_x, train_y, epochs=epochs, lr=0.01, seed=args.seed)
            rows.append(_row("mnist_allconv", method, budget, model, data, "scratch", epochs, seconds, report))
            print_table(rows[-1:], COLUMNS)
    return rows


def compress_report(model: nn.Module, budget: str, method: str, seed: int):
    """Compress for training from scratch (``compress_from_scratch``'s init) and return the report."""
    compress_from_scratch(model, budget, method, seed)
    return get_reports(model)[-1]


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--nets", nargs="+", default=list(NETS))
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS))
    parser.add_argument("--methods", nargs="+", default=available_methods())
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="calibration variants to run (default: all; other methods than hashednets / freshnets "
                             "run plain and calibrated only)")
    parser.add_argument("--finetune", action="store_true", help="one epoch of SGD after plain and calibrated")
    parser.add_argument("--scratch", action="store_true", help="train mnist_allconv from scratch with each method")
    parser.add_argument("--retrain", action="store_true", help="train the dense networks again instead of the cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = mnist_tensors(flatten=False)
    if args.quick:
        args.nets, args.budgets, args.methods = args.nets[:1], ["1/16"], ["hashednets"]
    if args.scratch:
        rows = from_scratch(data, args)
    else:
        calibration = calibration_batches(data[0], data[1])
        rows = [row for name in args.nets for row in one_shot(name, trained(name, data, args.retrain), data, args, calibration)]
    print_table(rows, COLUMNS)
    write_results("pretrained", rows, args.out)


if __name__ == "__main__":
    main()
