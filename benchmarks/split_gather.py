"""When splitting a hashed gather and its scatter over CPU threads pays: the size threshold of ``methods/parallel.py``.

Each row rebuilds a HashedNets-style weight of N values from a table of N/8
(signed, budget 1/16), forward (``gather_rows``) and backward (the scatter),
once on one thread and once split into one range per thread, alternating the
two, and prints split / one thread. Global hashing (random buckets over the
whole table, every range with its own full-size gradient table) is the
harder case; cache-local layers (``locality``) split at least as well.

With ``--models``, the same question inside a whole train step (``perf.py``'s
workloads at 1/16): the dense step, the compressed step at the default
threshold and the compressed step with every rebuild on one thread, called
in turn in one process, so that machine drift, which moves separate runs by
10% here, hits all three alike. Rows: each compressed step / dense, and
split / one thread.

    python benchmarks/split_gather.py --threads 2
    python benchmarks/split_gather.py --threads 2 --models resnet18 vgg11_bn --methods hashednets freshnets
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from common import alternating_ratio, benchmark_parser, interleaved_medians, method_config, print_table, write_results
from hf_freqcompress import compress
from hf_freqcompress.methods import gather, parallel
from perf import WORKLOADS, build, stepper

SIZES = tuple(2**p for p in range(16, 24))
CALLS = 4  # rebuilds per timing, so small sizes still time milliseconds
ONE_THREAD = 2**62  # a threshold no layer reaches: every rebuild on the calling thread


def with_threshold(min_values_per_thread: int, fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` run with ``parallel.MIN_VALUES_PER_THREAD`` set to ``min_values_per_thread``, restored after."""

    def run() -> None:
        default = parallel.MIN_VALUES_PER_THREAD
        parallel.MIN_VALUES_PER_THREAD = min_values_per_thread
        try:
            fn()
        finally:
            parallel.MIN_VALUES_PER_THREAD = default

    return run


def split_vs_one_thread(values: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(values)
    table = torch.randn(values // 8, generator=generator).requires_grad_()
    index = torch.randint(0, values // 8, (values,), generator=generator, dtype=torch.int32)
    upstream = torch.randn(values, generator=generator)

    def rebuild() -> None:
        for _ in range(CALLS):
            torch.autograd.grad(gather.gather_rows(table, index), table, upstream)

    ratio = alternating_ratio(with_threshold(ONE_THREAD, rebuild), with_threshold(1, rebuild), repeats)
    ranges = len(parallel.split_rows(values, 1, 1, torch.device("cpu")))
    return {"model": f"{values} values", "method": f"{torch.get_num_threads()} threads", "budget": "1/16",
            "metric": "split_vs_one_thread", "value": round(ratio, 2), "ranges_at_default": ranges}


def train_step_rows(model: str, method: str, repeats: int) -> list[dict]:
    """Dense, split and one-thread compressed train steps of ``perf.py``'s workload, called in turn."""
    workload = next(w for w in WORKLOADS if w.model == model)
    torch.manual_seed(0)
    dense = build(workload)
    compressed = copy.deepcopy(dense)
    compress(compressed, budget="1/16", method=method_config(method))
    dense_step, compressed_step = stepper(dense, workload), stepper(compressed, workload)
    dense_s, split_s, one_thread_s = interleaved_medians(
        (dense_step, with_threshold(parallel.MIN_VALUES_PER_THREAD, compressed_step),
         with_threshold(ONE_THREAD, compressed_step)), repeats)
    row = {"model": model, "method": method, "budget": "1/16", "dense_train_step_seconds": round(dense_s, 3)}
    return [{**row, "metric": "train_step_ratio_split", "value": round(split_s / dense_s, 3)},
            {**row, "metric": "train_step_ratio_one_thread", "value": round(one_thread_s / dense_s, 3)},
            {**row, "metric": "split_vs_one_thread", "value": round(split_s / one_thread_s, 3)}]


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--models", nargs="+", choices=[w.model for w in WORKLOADS],
                        help="time whole train steps of these perf.py workloads instead of bare rebuilds")
    parser.add_argument("--methods", nargs="+", default=["hashednets", "freshnets"], help="with --models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.models:
        rows = [row for method in args.methods for model in args.models
                for row in train_step_rows(model, method, args.repeats)]
        print_table(rows, ["model", "method", "metric", "value", "dense_train_step_seconds"])
    else:
        rows = [split_vs_one_thread(values, args.repeats) for values in SIZES]
        print_table(rows, ["model", "method", "metric", "value", "ranges_at_default"])
    write_results("split_gather", rows, args.out)


if __name__ == "__main__":
    main()
