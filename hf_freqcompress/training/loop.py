"""Fine-tune a compressed model with accelerate: one loop for 1 CPU, many CPUs and many GPUs.

``train(recipe)`` builds the dense model, keeps a frozen copy as the
distillation teacher when asked, compresses it, and trains the stored values
with the recipe's optimizer and schedule. ``accelerate.Accelerator`` owns
everything distributed (DDP on GPUs, gloo on CPUs, FSDP, mixed precision,
gradient accumulation), so the loop is the same under ``python`` and under
``accelerate launch``. Methods' training schedules run through
:func:`hf_freqcompress.on_train_step` after each optimizer step and
:func:`hf_freqcompress.finalize` at the end; their loss terms through
:class:`~hf_freqcompress.training.losses.TrainingLoss`. The loop names no method.

Everything that can reject the run (recipe, data location, the budget
planner, an occupied output folder) is checked before the first step.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from ..api import compress, finalize, on_train_step
from ..models import build_model
from ..recompute import enable_weight_recompute
from ..regularizers import get_regularizer
from ..report import CompressionReport
from .evaluation import evaluate
from .loaders import build_loaders, calibration_batches, unpack_batch
from .losses import NamedPenalty, TrainingLoss
from .metrics import MetricsLog, available_trackers
from .recipe import Recipe, RecipeError, validate_recipe

__all__ = ["TrainResult", "Progress", "train", "save_model", "resolve_resume", "CHECKPOINTS", "MODEL_DIR", "SUMMARY"]

CHECKPOINTS = "checkpoints"
"""``save_state`` folders go to ``<output.dir>/checkpoints/step_<N>``."""
MODEL_DIR = "model"
"""The final ``save_pretrained`` folder: ``<output.dir>/model``."""
SUMMARY = "summary.json"


class Progress:
    """Where the loop is (optimizer steps, epoch, batches into it); saved with ``save_state``."""

    def __init__(self) -> None:
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0

    def state_dict(self) -> dict[str, int]:
        return {"global_step": self.global_step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.global_step, self.epoch, self.batches_in_epoch = (
            int(state["global_step"]), int(state["epoch"]), int(state["batches_in_epoch"])
        )


@dataclass
class TrainResult:
    """What a run produced; ``model`` is the unwrapped compressed model (same object on every rank)."""

    recipe: Recipe
    accelerator: Accelerator
    model: nn.Module
    report: CompressionReport
    metrics: dict[str, float]
    global_step: int
    stopped: bool
    seconds: float
    output_dir: Path
    model_dir: Path | None


def _load_dense_checkpoint(model: nn.Module, path: str) -> None:
    """Load a safetensors state_dict (the trained dense model) before compressing; never unpickles."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise RecipeError(f"model.checkpoint: {path} does not exist (a .safetensors state_dict of the dense model)")
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    if missing or unexpected:
        raise RecipeError(
            f"model.checkpoint {path} does not fit {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def _build_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    spec = recipe.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.name == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov and spec.momentum > 0,
            weight_decay=spec.weight_decay,
        )
    return torch.optim.AdamW(params, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay)


def _lr_factor(name: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if name == "linear":
            return 1.0 - progress
        return 1.0

    return factor


def _check_output_dir(directory: Path, overwrite: bool, resuming: bool) -> None:
    occupied = (directory / MetricsLog.FILE_NAME).exists() or (directory / MODEL_DIR).exists()
    if occupied and not (overwrite or resuming):
        raise RecipeError(
            f"output.dir {directory} already holds a run; pass --set output.overwrite=true, "
            "another --set output.dir=..., or --resume to continue it"
        )


def resolve_resume(path: str | Path) -> Path:
    """A ``save_state`` folder, or a run's output folder (then its newest checkpoint)."""
    path = Path(path)
    checkpoints = path / CHECKPOINTS
    if checkpoints.is_dir():
        steps = sorted(checkpoints.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        if not steps:
            raise FileNotFoundError(f"--resume {path}: {checkpoints} holds no step_<N> checkpoint")
        return steps[-1]
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: no such save_state folder or run folder")
    return path


def save_model(accelerator: Accelerator, model: nn.Module, directory: Path, metrics: dict[str, float]) -> Path:
    """The final save: a ``save_pretrained`` folder of the compressed model, written by the main process."""
    from ..hub import save_pretrained

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        bare = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        card_metrics = {k: v for k, v in metrics.items() if k in ("eval_accuracy", "eval_loss")}
        save_pretrained(bare, directory, overwrite=True, metrics=card_metrics)
    accelerator.wait_for_everyone()
    return directory


def _penalties(recipe: Recipe) -> list[NamedPenalty]:
    return [NamedPenalty(r.name, r.weight, get_regularizer(r.name, **r.options)) for r in recipe.regularizers]


@dataclass
class _Run:
    """Everything one training run works on, passed between its steps."""

    recipe: Recipe
    accelerator: Accelerator
    model: nn.Module  # as prepared by accelerate (maybe wrapped)
    bare_model: nn.Module
    report: CompressionReport
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_loader: Any
    eval_loader: Any
    sampler: Any
    loss_fn: TrainingLoss
    progress: Progress
    metrics_log: MetricsLog
    output_dir: Path
    total_steps: int
    steps_per_epoch: int
    stopped: bool = False
    eval_metrics: dict[str, float] = field(default_factory=dict)
    window: dict[str, torch.Tensor] = field(default_factory=dict)
    window_batches: int = 0
    bar: Any = None


def train(recipe: Recipe, resume_from: str | Path | None = None) -> TrainResult:
    """Compress the recipe's model, fine-tune it, evaluate it and save it; see the module docstring."""
    validate_recipe(recipe)
    output_dir = Path(recipe.output.dir)
    _check_output_dir(output_dir, recipe.output.overwrite, resume_from is not None)
    resume_dir = resolve_resume(resume_from) if resume_from is not None else None
    trackers = available_trackers(recipe.output.log_with)
    accelerator = _accelerator(recipe, output_dir, trackers)
    set_seed(recipe.training.seed)
    model, teacher, report = _compressed_model(recipe)
    run = _prepare(recipe, accelerator, model, teacher, report, output_dir, resume_dir)
    if trackers:
        accelerator.init_trackers(recipe.name, config=_flat(recipe.to_dict()))
    _announce(run)
    start = time.perf_counter()
    run.bar = tqdm(total=run.total_steps, initial=run.progress.global_step,
                   disable=not accelerator.is_local_main_process, desc=recipe.name, dynamic_ncols=True)
    while run.progress.global_step < run.total_steps and not run.stopped:
        _run_epoch(run)
    run.bar.close()
    seconds = time.perf_counter() - start
    model_dir = _finish(run, seconds) if not run.stopped else None
    if run.stopped:
        accelerator.print(f"{recipe.name}: stopped after {run.progress.global_step} steps; resume with --resume {output_dir}")
    accelerator.end_training()
    return TrainResult(recipe, accelerator, run.bare_model, report, run.eval_metrics, run.progress.global_step,
                       run.stopped, seconds, output_dir, model_dir)


def _accelerator(recipe: Recipe, output_dir: Path, trackers: list[str]) -> Accelerator:
    settings = recipe.training
    return Accelerator(
        # Without cpu=True accelerate treats torchrun's processes on an accelerator-less machine as
        # independent runs; with it, they form one gloo process group (multi-CPU data parallel).
        cpu=settings.cpu or not torch.accelerator.is_available(),
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        mixed_precision=settings.mixed_precision,
        log_with=trackers or None,
        project_dir=str(output_dir),
    )


def _compressed_model(recipe: Recipe) -> tuple[nn.Module, nn.Module | None, CompressionReport]:
    """The recipe's model with its weights, the dense teacher (when distilling), compressed; recompute if asked."""
    source, spec = recipe.model, recipe.compression
    model = build_model(
        source.name, pretrained=source.pretrained, revision=source.revision,
        trust_remote_code=source.trust_remote_code, **source.kwargs,
    )
    if source.checkpoint:
        _load_dense_checkpoint(model, source.checkpoint)
    teacher = copy.deepcopy(model) if recipe.distillation.enabled else None
    calibration = calibration_batches(
        recipe.data, spec.calibration_split or recipe.data.train_split, spec.calibration_batches,
        recipe.data.batch_size, spec.seed, model,
    ) if spec.calibration_batches else None
    try:
        report = compress(
            model, budget=spec.budget, method={"method": spec.method, **spec.options}, targets=spec.targets,
            exclude=spec.exclude, seed=spec.seed, storage_dtype=spec.storage_dtype, init=spec.init,
            calibration=calibration, strategy=spec.strategy, seed_trials=spec.seed_trials,
        )
    except ValueError as error:
        raise RecipeError(f"compression: {error}") from None
    if recipe.training.weight_recompute:
        enable_weight_recompute(model)
    return model, teacher, report


def _prepare(
    recipe: Recipe, accelerator: Accelerator, model: nn.Module, teacher: nn.Module | None,
    report: CompressionReport, output_dir: Path, resume_dir: Path | None,
) -> _Run:
    """Loaders, loss, optimizer and schedule, prepared by accelerate; the state restored when resuming."""
    settings = recipe.training
    train_loader, eval_loader, sampler = build_loaders(recipe.data, settings.seed, model)
    loss_fn = TrainingLoss(
        teacher=teacher.to(accelerator.device) if teacher is not None else None,
        alpha=recipe.distillation.alpha if teacher is not None else 0.0,
        temperature=recipe.distillation.temperature,
        compression_weight=settings.compression_loss_weight,
        label_smoothing=settings.label_smoothing,
        penalties=_penalties(recipe),
    )
    optimizer = _build_optimizer(recipe, model)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / settings.gradient_accumulation_steps)
    total_steps = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    # Stepped by the loop once per optimizer step (not prepared: accelerate would step it once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(recipe.schedule.name, recipe.schedule.warmup_steps, total_steps)
    )
    progress = Progress()
    accelerator.register_for_checkpointing(scheduler, progress)
    for penalty in loss_fn.penalties:
        if hasattr(penalty.fn, "state_dict") and hasattr(penalty.fn, "load_state_dict"):
            accelerator.register_for_checkpointing(penalty.fn)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
    return _Run(recipe, accelerator, model, accelerator.unwrap_model(model), report, optimizer, scheduler,
                train_loader, eval_loader, sampler, loss_fn, progress, MetricsLog(accelerator, output_dir),
                output_dir, total_steps, steps_per_epoch)


def _announce(run: _Run) -> None:
    accelerator, settings = run.accelerator, run.recipe.training
    accelerator.print(run.report)
    accelerator.print(
        f"training {run.recipe.name}: {run.total_steps} optimizer steps ({settings.epochs} epoch(s) x "
        f"{run.steps_per_epoch}), {accelerator.num_processes} process(es) on {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}"
    )


def _run_epoch(run: _Run) -> None:
    """Train the rest of the current epoch (from where a resume left it); evaluate when it ends."""
    progress, accelerator = run.progress, run.accelerator
    epoch = progress.epoch
    run.sampler.use_epoch(epoch)
    loader = run.train_loader
    if progress.batches_in_epoch:
        loader = accelerator.skip_first_batches(run.train_loader, progress.batches_in_epoch)
    run.model.train()
    for batch in loader:
        _train_batch(run, batch)
        if accelerator.sync_gradients and _after_optimizer_step(run, epoch):
            return
    progress.epoch, progress.batches_in_epoch = epoch + 1, 0
    if (epoch + 1) % run.recipe.training.eval_every_epochs == 0 and progress.global_step < run.total_steps:
        run.eval_metrics = evaluate(run.model, run.eval_loader, accelerator)
        run.metrics_log.log(run.eval_metrics, progress.global_step, epoch)


def _train_batch(run: _Run, batch: Any) -> None:
    """Forward, backward and (at accumulation boundaries) the optimizer step; the loss terms are summed up."""
    accelerator, settings = run.accelerator, run.recipe.training
    inputs, labels = unpack_batch(batch)
    with accelerator.accumulate(run.model):
        loss, terms = run.loss_fn(run.model, run.bare_model, inputs, labels, accelerator.autocast)
        accelerator.backward(loss)
        if accelerator.sync_gradients and settings.max_grad_norm is not None:
            accelerator.clip_grad_norm_(run.model.parameters(), settings.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.progress.batches_in_epoch += 1
    for key, value in terms.items():  # tensors: no device sync until a log step
        run.window[key] = run.window[key] + value if key in run.window else value
    run.window_batches += 1


def _after_optimizer_step(run: _Run, epoch: int) -> bool:
    """Schedules, logging and checkpoints after an optimizer step; True when the run must leave the epoch."""
    progress, settings = run.progress, run.recipe.training
    run.scheduler.step()
    progress.global_step += 1
    on_train_step(run.bare_model, progress.global_step)
    run.bar.update(1)
    if progress.global_step % settings.log_every_steps == 0 or progress.global_step == run.total_steps:
        _log_window(run, epoch)
    if settings.checkpoint_every_steps and progress.global_step % settings.checkpoint_every_steps == 0:
        _save_state(run)
    if settings.stop_after_steps is not None and progress.global_step >= settings.stop_after_steps:
        run.stopped = progress.global_step < run.total_steps
        if run.stopped:
            _save_state(run)
            return True
    return progress.global_step >= run.total_steps


def _log_window(run: _Run, epoch: int) -> None:
    means = run.accelerator.reduce(torch.stack(list(run.window.values())).float() / run.window_batches, "mean")
    averaged = dict(zip(run.window, means.tolist()))
    averaged["lr"] = run.scheduler.get_last_lr()[0]
    run.metrics_log.log(averaged, run.progress.global_step, epoch)
    run.bar.set_postfix(loss=f"{averaged['loss']:.4f}")
    run.window, run.window_batches = {}, 0


def _save_state(run: _Run) -> None:
    run.accelerator.save_state(str(run.output_dir / CHECKPOINTS / f"step_{run.progress.global_step}"))


def _finish(run: _Run, seconds: float) -> Path | None:
    """Close the schedules, evaluate, save the model and the summary; the saved folder (None: not saved)."""
    accelerator, progress = run.accelerator, run.progress
    finalize(run.bare_model)
    run.eval_metrics = evaluate(run.model, run.eval_loader, accelerator)
    run.metrics_log.log({**run.eval_metrics, "train_seconds": seconds}, progress.global_step, progress.epoch)
    accelerator.print(
        f"{run.recipe.name}: test accuracy {run.eval_metrics['eval_accuracy']:.2f}% "
        f"({run.eval_metrics['eval_examples']} examples) after {progress.global_step} steps, {seconds:.1f}s"
    )
    model_dir = None
    if run.recipe.output.save_model:
        model_dir = save_model(accelerator, run.model, run.output_dir / MODEL_DIR, run.eval_metrics)
        accelerator.print(f"saved the compressed model to {model_dir}")
    if accelerator.is_main_process:
        summary = {
            "recipe": run.recipe.name, "steps": progress.global_step, "seconds": seconds,
            "processes": accelerator.num_processes, **run.eval_metrics, "report": run.report.to_dict(),
        }
        (run.output_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return model_dir


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Tracker configs take flat scalars: ``{"optimizer.lr": 0.05, ...}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat
