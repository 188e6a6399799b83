"""Each method's MNIST recipe, run end to end by the library's training loop.

For every ``recipes/mnist_<method>.yaml`` whose method this installation has
(``available_methods()``), run ``hf_freqcompress.training.train`` exactly as
``hf-freqcompress train`` does (compress, fine-tune, evaluate on the 10k test
set, save) and report test error against stored values. Unlike the paper
benchmarks, nothing here is tuned per row: the rows are the recipes users get.
``seconds`` is the wall time of the fine-tuning loop (evaluation and saving
excluded).

    python benchmarks/recipes.py --out docs/results/recipes.json
    python benchmarks/recipes.py --quick      # 1 epoch per recipe
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState

from hf_freqcompress.methods import available_methods
from hf_freqcompress.training import load_recipe, train

from common import benchmark_parser, other_values, print_table, write_results

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "mnist_"
QUICK_EPOCHS = 1


def method_recipes() -> list[Path]:
    """recipes/mnist_<method>.yaml for the registered methods (the README's quick recipe is not a method row)."""
    methods = set(available_methods())
    return [p for p in sorted((ROOT / "recipes").glob(f"{PREFIX}*.yaml")) if p.stem[len(PREFIX):] in methods]


def run(path: Path, epochs: int | None, seed: int, out_dir: Path) -> dict:
    overrides = [f"output.dir={out_dir / path.stem}", f"training.seed={seed}", f"compression.seed={seed}"]
    if epochs is not None:
        overrides.append(f"training.epochs={epochs}")
    recipe = load_recipe(path, overrides)
    result = train(recipe)
    AcceleratorState._reset_state(reset_partial_state=True)  # the next recipe builds a fresh Accelerator
    GradientState._reset_state()
    report = result.report
    return {
        "model": recipe.model.name.removeprefix("timm:"),
        "method": recipe.compression.method,
        "budget": str(recipe.compression.budget),
        "dense_values": report.dense_values,
        "stored_values": report.stored_values,
        "stored_bits": sum(layer.stored_bits for layer in report.layers),
        "other_values": other_values(result.model),
        "test_error_pct": round(result.metrics["eval_error_pct"], 2),
        "epochs": recipe.training.epochs,
        "seconds": round(result.seconds, 1),
        "recipe": f"recipes/{path.name}",
    }


def main() -> None:
    parser = benchmark_parser(__doc__)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in method_recipes():
            rows.append(run(path, epochs, args.seed, Path(tmp)))
            print_table(rows, ["model", "method", "budget", "stored_values", "test_error_pct", "epochs", "seconds"])
    write_results("recipes", rows, args.out)


if __name__ == "__main__":
    main()
