"""Fine-tuning compressed models with accelerate, driven by YAML recipes.

    from hf_freqcompress.training import load_recipe, train
    result = train(load_recipe("recipes/mnist_hashednets_quick.yaml", ["training.epochs=2"]))

or ``hf-freqcompress train RECIPE`` (``accelerate launch -m hf_freqcompress.cli train RECIPE`` for many processes).
"""

from __future__ import annotations

from .evaluation import evaluate
from .loaders import EpochShuffleSampler, build_dataset, build_loaders, unpack_batch
from .losses import NamedPenalty, TrainingLoss, distillation_loss
from .loop import TrainResult, resolve_resume, save_model, train
from .metrics import MetricsLog
from .recipe import Recipe, RecipeError, apply_overrides, load_recipe, recipe_from_dict, validate_recipe

__all__ = [
    "Recipe",
    "RecipeError",
    "load_recipe",
    "recipe_from_dict",
    "apply_overrides",
    "validate_recipe",
    "train",
    "TrainResult",
    "resolve_resume",
    "save_model",
    "evaluate",
    "TrainingLoss",
    "NamedPenalty",
    "distillation_loss",
    "EpochShuffleSampler",
    "build_dataset",
    "build_loaders",
    "unpack_batch",
    "MetricsLog",
]
