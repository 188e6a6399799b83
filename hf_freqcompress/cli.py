"""The ``hf-freqcompress`` command."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .api import compress
from .methods import available_methods, get_method
from .models import build_model, parse_model_args

__all__ = ["main"]


def _compress_command(args: argparse.Namespace) -> int:
    model = build_model(args.model, **parse_model_args(args.model_arg))
    method = get_method(args.method).config_class.from_dict(parse_model_args(args.option))
    report = compress(
        model,
        budget=args.budget,
        method=method,
        targets=args.targets,
        exclude=args.exclude,
        seed=args.seed,
        storage_dtype=args.storage_dtype,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-freqcompress", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("compress", help="compress a timm or transformers model and print the report")
    sub.add_argument("--model", required=True, help="timm:<name> or hf:<model_type or config dir>")
    sub.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="model/config kwarg, repeatable")
    sub.add_argument("--budget", default="1/16", help="'1/64', 0.05, a value count, or '2MB'")
    sub.add_argument("--method", default="hashednets", choices=available_methods())
    sub.add_argument("--option", action="append", metavar="KEY=VALUE", help="method config option, repeatable")
    sub.add_argument("--targets", nargs="+", help="module name patterns to compress (default: all supported)")
    sub.add_argument("--exclude", nargs="*", help="module name patterns to skip (default: head and tiny layers)")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--storage-dtype", default=None, choices=["float32", "float16", "bfloat16"])
    sub.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.set_defaults(run=_compress_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError) as error:
        print(f"hf-freqcompress: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
