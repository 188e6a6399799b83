"""Cache-local hashing: rebuild time of one large layer per ``locality``, against a clone of its dense weight.

The layer is vgg11_bn's (timm) pre-logits conv, 4096 x 512 x 7 x 7 = 102.8M
weights, the one that dominates vgg11_bn's train step in ``perf.py``: at 1/16
its signed table is 51 MB, larger than the CPU caches, so global per-weight
hashing misses the cache once per weight in the gather and again in the
backward's scatter. Each row rebuilds it forward and backward (the upstream
gradient is built once, outside the clock) and reports the median seconds and
the ratio to ``clone()`` of the dense weight (a fresh tensor, what every
rebuilt weight must write), alternating the two.

    python benchmarks/locality.py --threads 1 --methods hashednets freshnets --localities 0 16384 65536
"""

from __future__ import annotations

import torch
from torch import nn

from hf_freqcompress import compress

from common import alternating_ratio, benchmark_parser, median_seconds, method_config, print_table, write_results

SHAPE = (4096, 512, 7, 7)


def rebuild_rows(method: str, locality: int, budget: str, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    layer = nn.Conv2d(SHAPE[1], SHAPE[0], SHAPE[2:])
    config = method_config(f"{method}:locality={locality}")
    compress(nn.Sequential(layer), budget=budget, exclude=[], method=config)
    upstream = torch.ones(SHAPE)
    dense = torch.randn(SHAPE)

    def rebuild() -> None:
        layer.weight.backward(upstream)

    seconds = median_seconds(rebuild, repeats)
    row = {"model": "conv-" + "x".join(map(str, SHAPE)), "method": method, "locality": locality, "budget": budget}
    return [{**row, "metric": "rebuild_seconds", "value": round(seconds, 3)},
            {**row, "metric": "reconstruct_vs_clone", "value": round(alternating_ratio(dense.clone, rebuild, repeats), 2)}]


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--budget", default="1/16")
    parser.add_argument("--methods", nargs="+", default=["hashednets", "freshnets"])
    parser.add_argument("--localities", nargs="+", type=int, default=[0, 4096, 16384, 65536, 262144])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for method in args.methods for locality in args.localities
            for row in rebuild_rows(method, locality, args.budget, args.repeats)]
    print_table(rows, ["model", "method", "locality", "budget", "metric", "value"])
    write_results("locality", rows, args.out)


if __name__ == "__main__":
    main()
