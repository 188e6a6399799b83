"""The ``hf-freqcompress`` command."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .api import INITS, compress
from .hub import describe_folder, push_folder, save_pretrained
from .methods import available_methods, get_method
from .models import build_model, model_source, parse_model_args

__all__ = ["main"]


def _describe_source(source: dict, random_init: bool) -> str:
    if not source["pretrained"]:
        why = "as asked: --random-init" if random_init else "it has no pretrained weights"
        return f"base model: {source['spec']}, randomly initialised ({why})"
    return f"base model: {source['spec']}, trained weights from {source['weights'] or 'the local folder'}"


def _compress_command(args: argparse.Namespace) -> int:
    model = build_model(
        args.model, pretrained=False if args.random_init else None, revision=args.revision,
        trust_remote_code=args.trust_remote_code, **parse_model_args(args.model_arg),
    )
    print(_describe_source(model_source(model), args.random_init), file=sys.stderr if args.json else sys.stdout)
    method = get_method(args.method).config_class.from_dict(parse_model_args(args.option))
    report = compress(
        model,
        budget=args.budget,
        method=method,
        targets=args.targets,
        exclude=args.exclude,
        seed=args.seed,
        storage_dtype=args.storage_dtype,
        init=args.init,
        calibration=_calibration(args, model) if args.calibration else None,
        strategy=args.strategy,
        seed_trials=args.seed_trials,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    if args.out:
        folder = save_pretrained(model, args.out, overwrite=args.overwrite)
        print(f"saved to {folder}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _calibration(args: argparse.Namespace, model) -> list:
    """``--calibration-batches`` seeded random batches of ``--calibration`` data, for compress(calibration=...)."""
    from .training.loaders import calibration_batches

    section = _eval_data(args.calibration, args.calibration_split or _TRAIN_SPLITS[_data_kind(args.calibration)], args)
    return calibration_batches(section, section.eval_split, args.calibration_batches, args.batch_size, args.seed, model)


def _push_command(args: argparse.Namespace) -> int:
    url = push_folder(
        args.dir, args.repo_id, private=args.private or None, revision=args.revision, replace_card=args.replace_card
    )
    print(url)
    return 0


def _info_command(args: argparse.Namespace) -> int:
    print(describe_folder(args.dir))
    return 0


def _train_command(args: argparse.Namespace) -> int:
    from .training import load_recipe, train

    recipe = load_recipe(args.recipe, args.set)
    result = train(recipe, resume_from=args.resume)
    if args.json and result.accelerator.is_main_process:
        print(json.dumps({"steps": result.global_step, "stopped": result.stopped, **result.metrics}))
    return 0


_EVAL_SPLITS = {"mnist": "test", "image_folder": "val", "hf": "validation"}
_TRAIN_SPLITS = {"mnist": "train", "image_folder": "train", "hf": "train"}


def _data_kind(data: str) -> str:
    return "mnist" if data == "mnist" else "hf" if data.startswith("hf:") else "image_folder"


def _eval_data(data: str, split: str | None, args: argparse.Namespace):
    """``mnist``, ``hf:<dataset>`` or an ImageFolder root -> the recipe data section to evaluate on."""
    from .training.recipe import DataSection, check_data_location

    kind = _data_kind(data)
    root = {"mnist": None, "hf": data[3:], "image_folder": data}[kind]
    section = DataSection(
        kind=kind, root=root, eval_split=split or _EVAL_SPLITS[kind], train_split=split or _EVAL_SPLITS[kind],
        image_size=args.image_size, eval_batch_size=args.batch_size, limit_eval=getattr(args, "limit", None),
    )
    check_data_location(section)
    return section


def _eval_command(args: argparse.Namespace) -> int:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from .hub import from_pretrained
    from .training import build_dataset, evaluate

    section = _eval_data(args.data, args.split, args)
    model = from_pretrained(args.dir)
    dataset = build_dataset(section, section.eval_split, train=False, model=model)
    accelerator = Accelerator()
    model, loader = accelerator.prepare(model, DataLoader(dataset, batch_size=section.eval_batch_size))
    metrics = evaluate(model, loader, accelerator)
    if accelerator.is_main_process:
        print(json.dumps({"model": str(args.dir), "data": args.data, "split": section.eval_split, **metrics}))
    return 0


def _add_compress(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("compress", help="compress a timm or transformers model and print the report")
    sub.add_argument("--model", required=True,
                     help="timm:<name>[.<tag>], timm:hf-hub:<repo> or hf:<repo id or folder>; its trained weights load")
    sub.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="model/config kwarg, repeatable")
    sub.add_argument("--random-init", action="store_true",
                     help="build a randomly initialised model instead of loading weights (hf:<model_type> works offline)")
    sub.add_argument("--revision", help="branch, tag or commit of an hf: model on the Hub")
    sub.add_argument("--trust-remote-code", action="store_true", help="allow an hf: model's own code (auto_map)")
    sub.add_argument("--budget", default="1/16", help="'1/64', 0.05, a value count, or '2MB'")
    sub.add_argument("--method", default="hashednets", choices=available_methods())
    sub.add_argument("--option", action="append", metavar="KEY=VALUE", help="method config option, repeatable")
    sub.add_argument("--targets", nargs="+", help="module name patterns to compress (default: all supported)")
    sub.add_argument("--exclude", nargs="*", help="module name patterns to skip (default: head and tiny layers)")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--storage-dtype", default=None, choices=["float32", "float16", "bfloat16"])
    sub.add_argument("--init", default="project", choices=INITS,
                     help="preserve_norm: keep each layer's weight norm (for models trained from scratch)")
    _add_calibration(sub)
    sub.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.add_argument("--out", metavar="DIR", help="save the compressed model to this checkpoint folder")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint folder at --out")
    sub.set_defaults(run=_compress_command)


def _add_calibration(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--calibration", metavar="DATA",
                     help="fit to real inputs: 'mnist', an ImageFolder root or hf:<dataset> (see compress(calibration=))")
    sub.add_argument("--calibration-split", help="split of --calibration (default: its training split)")
    sub.add_argument("--calibration-batches", type=int, default=8, help="batches of --batch-size for calibration")
    sub.add_argument("--batch-size", type=int, default=64, help="calibration batch size")
    sub.add_argument("--image-size", type=int, default=224, help="input size for ImageFolder / hf calibration data")
    sub.add_argument("--strategy", default="proportional", choices=["proportional", "sensitivity"],
                     help="budget split; sensitivity needs --calibration")
    sub.add_argument("--seed-trials", type=int, default=1, help="hash seeds tried per layer (needs --calibration)")


def _add_others(commands: argparse._SubParsersAction) -> None:
    push = commands.add_parser("push", help="upload a saved checkpoint folder to a Hub repo (created if needed)")
    push.add_argument("dir", help="folder written by save_pretrained or compress --out")
    push.add_argument("repo_id", help="user/name on the Hub (HF_ENDPOINT and HF_TOKEN apply)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", default=None, help="branch to commit to")
    push.add_argument("--replace-card", action="store_true",
                      help="upload the folder's README.md as it is instead of merging it into the repo's card")
    push.set_defaults(run=_push_command)

    train = commands.add_parser(
        "train", help="compress, fine-tune, evaluate and save as a YAML recipe says (see recipes/README.md)"
    )
    train.add_argument("recipe", help="recipe YAML file, e.g. recipes/mnist_hashednets_quick.yaml")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. training.epochs=3")
    train.add_argument("--resume", metavar="DIR", help="continue from a save_state folder or a run's output.dir")
    train.add_argument("--json", action="store_true", help="print the final metrics as one JSON line")
    train.set_defaults(run=_train_command)

    evaluate = commands.add_parser("eval", help="accuracy of a saved checkpoint folder on a dataset")
    evaluate.add_argument("dir", help="folder written by save_pretrained or train (<output.dir>/model)")
    evaluate.add_argument("--data", required=True, help="'mnist', an ImageFolder root, or hf:<dataset name or path>")
    evaluate.add_argument("--split", help="split / sub-folder (default: test for mnist, val, validation for hf)")
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.add_argument("--image-size", type=int, default=224, help="input size for ImageFolder / hf data")
    evaluate.add_argument("--limit", type=int, help="evaluate only the first N examples")
    evaluate.set_defaults(run=_eval_command)

    info = commands.add_parser("info", help="validate a checkpoint folder and print what it holds")
    info.add_argument("dir", help="folder written by save_pretrained or compress --out")
    info.set_defaults(run=_info_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-freqcompress", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_compress(commands)
    _add_others(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"hf-freqcompress: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
