"""Training recipes: YAML files with a strict, typed schema.

A recipe says everything one fine-tuning run needs (model, compression,
data, optimizer, schedule, distillation, output), so the same file runs on a
laptop CPU and under ``accelerate launch`` on 8 GPUs. The schema is a tree
of dataclasses: a misspelt key is an error that lists the valid keys at that
level, a value of the wrong type names its dotted path, and ``--set
a.b=value`` overrides go through the same checks. Everything that can be
checked without building the model (registered method and regularizers,
data folders, numeric ranges) is checked at load time, before any training.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

__all__ = [
    "Recipe",
    "ModelSection",
    "CompressionSection",
    "DataSection",
    "OptimizerSection",
    "ScheduleSection",
    "TrainingSection",
    "DistillationSection",
    "RegularizerSection",
    "OutputSection",
    "RecipeError",
    "load_recipe",
    "recipe_from_dict",
    "apply_overrides",
    "validate_recipe",
    "check_data_location",
]


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the key and the fix."""


@dataclass
class ModelSection:
    """The dense model to compress (``hf_freqcompress.models.build_model``).

    ``name``: ``timm:<name>[.<tag>]``, ``timm:hf-hub:<repo>`` or ``hf:<repo id or
    local folder>``; ``kwargs`` go to the constructor (timm) or the config
    (transformers). ``pretrained``: unset loads the trained weights wherever
    the name has them (every timm and hf model; the zoo's MNIST networks have
    none); ``false`` builds a random initialisation. ``revision`` /
    ``trust_remote_code`` apply to ``hf:`` models. ``checkpoint``: a
    safetensors state_dict loaded into the dense model afterwards (a local
    fine-tune of the architecture; also the distillation teacher).
    """

    name: str = "timm:mnist_mlp"
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    checkpoint: str | None = None


@dataclass
class CompressionSection:
    """The arguments of ``compress()``; ``options`` are the method's config fields.

    ``calibration_batches`` > 0 fits the compression to that many batches
    (``data.batch_size`` each, a seeded random sample of ``calibration_split``,
    by default the training split): output-aware fits, and with ``strategy:
    sensitivity`` / ``seed_trials`` > 1 the measured budget split and seed
    choice (``compress(calibration=...)``).
    """

    method: str = "hashednets"
    options: dict[str, Any] = field(default_factory=dict)
    budget: str | int | float = "1/16"
    targets: list[str] | None = None
    exclude: list[str] | None = None
    seed: int = 0
    storage_dtype: str | None = None
    init: str = "project"
    calibration_batches: int = 0
    calibration_split: str | None = None
    strategy: str = "proportional"
    seed_trials: int = 1


@dataclass
class DataSection:
    """Where the images come from.

    kind: ``mnist`` (vendored, ``root`` optional), ``image_folder`` (``root``
    holds ``train/`` and ``val/`` class folders, or set ``train_split`` /
    ``eval_split`` to other sub-folder names) or ``hf`` (``root`` is a
    Hugging Face dataset name or path; needs the ``datasets`` extra).
    limit_train / limit_eval: use only the first N examples (quick runs, tests).
    """

    kind: str = "mnist"
    root: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    image_size: int = 224
    batch_size: int = 128
    eval_batch_size: int = 1000
    num_workers: int = 0
    limit_train: int | None = None
    limit_eval: int | None = None
    image_column: str = "image"
    label_column: str = "label"


@dataclass
class OptimizerSection:
    """``sgd`` (momentum, nesterov) or ``adamw``."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class ScheduleSection:
    """Learning-rate schedule per optimizer step: ``cosine``, ``linear`` (to 0) or ``constant``, after a linear warmup."""

    name: str = "cosine"
    warmup_steps: int = 0


@dataclass
class TrainingSection:
    """Loop settings.

    max_steps: cap on optimizer steps (the schedule's length); None: epochs decide.
    stop_after_steps: interrupt after this many optimizer steps, save state and
        exit without changing the schedule (resume later with ``--resume``).
    checkpoint_every_steps: ``save_state`` every N optimizer steps (0: only when stopped).
    mixed_precision: ``no``, ``fp16`` or ``bf16`` (an accelerate config or
        ``accelerate launch --mixed_precision`` overrides it).
    max_grad_norm: clip gradients to this norm (None: no clipping).
    cpu: train on CPU even when a GPU is present (always so on machines without one).
    compression_loss_weight: coefficient of the methods' own training penalties.
    label_smoothing: the cross-entropy's target smoothing (timm's ``--smoothing``);
        on MNIST MLPs 0.1 cut HashedNets' error at 1/8 (docs/results/mnist_mlp.md).
    weight_recompute: rebuild each compressed weight again in backward instead of
        keeping it from forward (``hf_freqcompress.recompute``): same gradients,
        about one dense layer of weights alive at a time instead of all of them,
        for a second rebuild per layer and step.
    """

    epochs: int = 1
    max_steps: int | None = None
    stop_after_steps: int | None = None
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    mixed_precision: str = "no"
    seed: int = 0
    log_every_steps: int = 50
    checkpoint_every_steps: int = 0
    eval_every_epochs: int = 1
    compression_loss_weight: float = 1.0
    label_smoothing: float = 0.0
    cpu: bool = False
    weight_recompute: bool = False


@dataclass
class DistillationSection:
    """Knowledge distillation from the dense model as it was before ``compress()``.

    loss = (1 - alpha) * cross_entropy + alpha * T^2 * KL(teacher_T || student_T)
    (Hinton et al., 2015), with logits softened by ``temperature`` T.
    """

    enabled: bool = False
    alpha: float = 0.5
    temperature: float = 4.0


@dataclass
class RegularizerSection:
    """A model-level penalty from ``hf_freqcompress.regularizers``, added to the loss times ``weight``."""

    name: str = ""
    weight: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputSection:
    """``dir``: metrics.jsonl, checkpoints/ (``save_state``) and model/ (``save_pretrained``) go here.

    log_with: accelerate trackers (``tensorboard``, ``wandb``, ...); trackers
    that are not installed are skipped with a warning.
    """

    dir: str = "runs/recipe"
    log_with: list[str] = field(default_factory=list)
    overwrite: bool = False
    save_model: bool = True


@dataclass
class Recipe:
    name: str = "recipe"
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    compression: CompressionSection = field(default_factory=CompressionSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    distillation: DistillationSection = field(default_factory=DistillationSection)
    regularizers: list[RegularizerSection] = field(default_factory=list)
    output: OutputSection = field(default_factory=OutputSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- parsing ---------------------------------------------------------------------------------------


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _convert(value: Any, hint: Any, path: str) -> Any:
    """Check ``value`` against the type ``hint`` (dataclass, list, dict, union, scalar), naming ``path`` on error."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, path)
            except RecipeError:
                continue
        raise RecipeError(f"{path}: {value!r} is not a {_type_name(hint)}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise RecipeError(f"{path}: expected true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise RecipeError(f"{path}: expected an integer, got {value!r}")
    if not isinstance(value, hint):
        raise RecipeError(f"{path}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, data: Any, path: str) -> Any:
    where = path or "the recipe"
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise RecipeError(f"unknown key(s) {unknown} in {where}; valid keys: {names}")
    values = {key: _convert(value, hints[key], f"{path}.{key}" if path else key) for key, value in data.items()}
    return cls(**values)


def recipe_from_dict(data: dict[str, Any], validate: bool = True) -> Recipe:
    """A :class:`Recipe` from its dict form (unknown keys and wrong types are :class:`RecipeError`).

    ``validate=False`` checks the schema only, not the installation (registered
    methods, data on disk): for tooling that inspects recipes of methods this
    installation lacks.
    """
    recipe = _build(Recipe, data, "")
    if validate:
        validate_recipe(recipe)
    return recipe


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``["training.epochs=3", "compression.budget=1/64"]`` to a recipe dict (values parsed as YAML)."""
    result = _deep_copy(data)
    for override in overrides or []:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {override!r} must look like section.key=value")
        parts = key.split(".")
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {override!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return result


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, validate: bool = True) -> Recipe:
    """Read a recipe YAML file, apply ``--set`` overrides, validate it (see :func:`recipe_from_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist; recipes/ holds the shipped ones")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    try:
        return recipe_from_dict(apply_overrides(data, overrides), validate)
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from None


# -- checks that need no model -------------------------------------------------------------------

_CHOICES = {
    "data.kind": ("mnist", "image_folder", "hf"),
    "optimizer.name": ("sgd", "adamw"),
    "schedule.name": ("cosine", "linear", "constant"),
    "training.mixed_precision": ("no", "fp16", "bf16"),
    "compression.strategy": ("proportional", "sensitivity"),
}
_POSITIVE = (
    "data.batch_size", "data.eval_batch_size", "data.image_size", "training.epochs",
    "training.gradient_accumulation_steps", "training.log_every_steps", "training.eval_every_epochs",
    "data.limit_train", "data.limit_eval", "training.max_steps", "training.stop_after_steps",
    "compression.seed_trials",
)


def _get(recipe: Recipe, dotted: str) -> Any:
    value: Any = recipe
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _check_calibration(section: CompressionSection) -> None:
    if section.calibration_batches < 0:
        raise RecipeError(f"compression.calibration_batches must be >= 0 (0: none), got {section.calibration_batches}")
    if not section.calibration_batches and (section.strategy == "sensitivity" or section.seed_trials > 1):
        raise RecipeError(
            "compression.strategy: sensitivity and compression.seed_trials > 1 measure the model on real inputs: "
            "set compression.calibration_batches (e.g. 8)"
        )


def validate_recipe(recipe: Recipe) -> None:
    """Refuse what would fail later: unknown choices, unregistered methods, missing data, bad ranges."""
    from ..methods import available_methods, get_method
    from ..regularizers import available_regularizers

    for key, choices in _CHOICES.items():
        if _get(recipe, key) not in choices:
            raise RecipeError(f"{key}: {_get(recipe, key)!r} is not one of {list(choices)}")
    for key in _POSITIVE:
        value = _get(recipe, key)
        if value is not None and value < 1:
            raise RecipeError(f"{key} must be >= 1, got {value}")
    if recipe.optimizer.lr <= 0:
        raise RecipeError(f"optimizer.lr must be > 0, got {recipe.optimizer.lr}")
    if not 0.0 <= recipe.distillation.alpha <= 1.0 or recipe.distillation.temperature <= 0:
        raise RecipeError("distillation.alpha must be in [0, 1] and distillation.temperature > 0")
    if not 0.0 <= recipe.training.label_smoothing < 1.0:
        raise RecipeError(f"training.label_smoothing must be in [0, 1), got {recipe.training.label_smoothing}")
    _check_calibration(recipe.compression)
    method = recipe.compression.method
    if method not in available_methods():
        raise RecipeError(
            f"compression.method {method!r} is not registered in this installation; available: {available_methods()}"
        )
    try:
        get_method(method).config_class.from_dict(recipe.compression.options)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"compression.options: {error}") from None
    for i, regularizer in enumerate(recipe.regularizers):
        if regularizer.name not in available_regularizers():
            raise RecipeError(
                f"regularizers[{i}].name {regularizer.name!r} is unknown; available: {available_regularizers()}"
            )
    check_data_location(recipe.data)


def check_data_location(data: DataSection) -> None:
    """Fail now, naming the key, if the recipe's data cannot be found (MNIST files, image folders)."""
    from ..data import find_mnist_root

    if data.kind == "mnist":
        try:
            find_mnist_root(data.root)
        except FileNotFoundError as error:
            raise RecipeError(f"data.root: {error}") from None
    elif data.kind == "image_folder":
        if data.root is None:
            raise RecipeError("data.root is required for data.kind=image_folder (a folder with train/ and val/)")
        for split in (data.train_split, data.eval_split):
            if not (Path(data.root) / split).is_dir():
                raise RecipeError(
                    f"data.root: image folder {Path(data.root) / split} does not exist; expected "
                    f"<root>/<split>/<class>/<image> (set data.train_split / data.eval_split to the folder names)"
                )
    elif data.root is None:
        raise RecipeError("data.root is required for data.kind=hf (a Hugging Face dataset name or local path)")
