"""The accelerate training loop: distributed agreement, exact resume, distillation, hooks, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from torch import nn

from hf_freqcompress import from_pretrained
from hf_freqcompress.cli import main as cli_main
from hf_freqcompress.methods import CompressedWeight
from hf_freqcompress.training import MetricsLog, TrainingLoss, distillation_loss, load_recipe, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "recipes" / "tiny_mnist.yaml"
WORKER = ROOT / "tests" / "helpers" / "train_worker.py"


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each run builds its own Accelerator; accelerate keeps process-wide singletons between them."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny(tmp_path: Path, *overrides: str, name: str = "run"):
    return load_recipe(TINY, [f"output.dir={tmp_path / name}", *overrides])


def stored(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs (max {float((a[key] - b[key]).abs().max())})"


# -- distributed -------------------------------------------------------------------------------------


def test_two_processes_agree_on_every_stored_value(tmp_path):
    """torchrun with 2 gloo processes: world size really 2, every stored tensor bitwise equal across ranks."""
    dump = tmp_path / "dump"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
        str(WORKER), str(TINY), str(dump), f"output.dir={tmp_path / 'run'}", "training.epochs=1",
    ]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    infos = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(2)]
    assert [i["world_size"] for i in infos] == [2, 2]
    assert [i["rank"] for i in infos] == [0, 1]
    assert infos[0]["steps"] == 8  # 512 examples / (2 ranks x 32): each rank saw half the data
    assert infos[0]["eval_examples"] == 256 and infos[0]["eval_accuracy"] == infos[1]["eval_accuracy"]
    rank0, rank1 = (load_file(str(dump / f"rank{r}.safetensors")) for r in range(2))
    assert any("parametrizations.weight.original" in k for k in rank0)
    assert_identical(rank0, rank1)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


# -- resume ------------------------------------------------------------------------------------------


def test_resume_from_save_state_matches_an_uninterrupted_run(tmp_path):
    """Stop mid-epoch 2 with dropout on; resuming gives bit-identical stored values (data order, RNG, optimizer)."""
    whole = train(tiny(tmp_path, name="whole"))
    assert whole.global_step == 32 and not whole.stopped
    first = train(tiny(tmp_path, "training.stop_after_steps=21", name="parts"))
    assert first.stopped and first.global_step == 21 and first.model_dir is None
    assert (tmp_path / "parts" / "checkpoints" / "step_21").is_dir()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    resumed = train(tiny(tmp_path, name="parts"), resume_from=tmp_path / "parts")
    assert resumed.global_step == 32
    assert_identical(stored(whole.model), stored(resumed.model))
    assert resumed.metrics == whole.metrics


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """2 x 16 accumulated equals one batch of 32: the loop steps and schedules per optimizer step."""
    plain = train(tiny(tmp_path, "training.epochs=1", "model.kwargs.drop_rate=0.0", name="plain"))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accumulated = train(tiny(tmp_path, "training.epochs=1", "model.kwargs.drop_rate=0.0", "data.batch_size=16",
                             "training.gradient_accumulation_steps=2", name="accumulated"))
    assert plain.global_step == accumulated.global_step == 16
    for key, value in stored(plain.model).items():
        torch.testing.assert_close(stored(accumulated.model)[key], value, rtol=1e-4, atol=1e-5)


# -- distillation and method hooks -------------------------------------------------------------------


def test_distillation_term_is_in_the_loss_and_the_teacher_gets_no_gradient():
    torch.manual_seed(0)
    student, teacher = nn.Linear(8, 4), nn.Linear(8, 4)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    inputs, labels = torch.randn(16, 8), torch.randint(0, 4, (16,))
    loss_fn = TrainingLoss(teacher=teacher, alpha=0.3, temperature=2.0)
    loss, terms = loss_fn(student, student, inputs, labels)
    kd = distillation_loss(student(inputs), teacher(inputs), 2.0)
    ce = nn.functional.cross_entropy(student(inputs), labels)
    assert float(kd.detach()) > 0
    torch.testing.assert_close(loss, 0.7 * ce + 0.3 * kd)
    torch.testing.assert_close(terms["loss_distill"], kd.detach())
    loss.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    # the teacher term pulls the student toward the teacher: with alpha=1 the loss is the KL alone
    only_kd, _ = TrainingLoss(teacher=teacher, alpha=1.0, temperature=2.0)(student, student, inputs, labels)
    torch.testing.assert_close(only_kd, kd)


def test_label_smoothing_mixes_uniform_targets_into_the_task_loss():
    torch.manual_seed(0)
    model, inputs, labels = nn.Linear(8, 4), torch.randn(16, 8), torch.randint(0, 4, (16,))
    smoothed, _ = TrainingLoss(label_smoothing=0.2)(model, model, inputs, labels)
    log_probs = model(inputs).log_softmax(-1)
    expected = 0.8 * nn.functional.nll_loss(log_probs, labels) - 0.2 * log_probs.mean(-1).mean()
    torch.testing.assert_close(smoothed, expected)
    plain, _ = TrainingLoss()(model, model, inputs, labels)
    assert smoothed.detach().item() != pytest.approx(plain.detach().item())


def test_recipe_label_smoothing_reaches_the_loss(tmp_path):
    def first_task_loss(*overrides: str) -> float:
        recipe = tiny(tmp_path, "training.max_steps=1", "training.log_every_steps=1", *overrides, name=str(overrides))
        return next(r["loss_task"] for r in MetricsLog.read(train(recipe).output_dir) if "loss_task" in r)

    assert first_task_loss("training.label_smoothing=0.5") != pytest.approx(first_task_loss())


def test_distillation_recipe_logs_the_teacher_term(tmp_path):
    result = train(tiny(tmp_path, "distillation.enabled=true", "training.max_steps=8"))
    rows = [r for r in MetricsLog.read(result.output_dir) if "loss_distill" in r]
    alpha = result.recipe.distillation.alpha
    assert rows and all(r["loss_distill"] > 0 for r in rows)  # the student does not match the teacher exactly
    for row in rows:  # the logged total is the mix of the two terms, so the teacher term really entered the loss
        assert abs(row["loss"] - ((1 - alpha) * row["loss_task"] + alpha * row["loss_distill"])) < 1e-4


def test_method_hooks_run_through_the_parametrizations(tmp_path, monkeypatch):
    """on_train_step after every optimizer step, finalize once, regularization() in the loss: no method names."""
    steps: list[int] = []
    finalized: list[str] = []
    monkeypatch.setattr(CompressedWeight, "on_train_step", lambda self, step: steps.append(step))
    monkeypatch.setattr(CompressedWeight, "finalize", lambda self: finalized.append(self.spec.name))
    monkeypatch.setattr(CompressedWeight, "regularization", lambda self, original: original.pow(2).sum())
    result = train(tiny(tmp_path, "training.epochs=1", "training.compression_loss_weight=0.001"))
    layers = len(finalized)
    assert layers == 2 and steps == [s for s in range(1, 17) for _ in range(layers)]
    assert all(r["loss_compression"] > 0 for r in MetricsLog.read(result.output_dir) if "loss" in r)


def test_recipe_regularizer_is_added_to_the_loss(tmp_path):
    """A penalty named in the recipe (here on the head, which this recipe leaves dense) joins the loss."""
    recipe = tiny(tmp_path, "training.max_steps=4", "training.log_every_steps=2", "compression.targets=[features]",
                  "regularizers=[{name: pq_centroid, weight: 0.01, options: {subvector: 4, k: 4, targets: [head]}}]")
    rows = [r for r in MetricsLog.read(train(recipe).output_dir) if "loss" in r]
    assert rows and all(r["loss_pq_centroid"] > 0 for r in rows)
    assert all(r["loss"] > r["loss_task"] for r in rows)


# -- outputs -----------------------------------------------------------------------------------------


def test_saved_model_reloads_and_cli_eval_reproduces_the_accuracy(tmp_path, capsys):
    result = train(tiny(tmp_path, "training.epochs=1"))
    reloaded = from_pretrained(result.model_dir)
    x = torch.randn(4, 1, 28, 28)
    result.model.eval()
    torch.testing.assert_close(reloaded(x), result.model(x), rtol=0, atol=0)
    capsys.readouterr()
    assert cli_main(["eval", str(result.model_dir), "--data", "mnist", "--limit", "256"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["eval_examples"] == 256
    assert printed["eval_accuracy"] == pytest.approx(result.metrics["eval_accuracy"])
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["report"]["stored_values"] == result.report.stored_values


def test_bf16_mixed_precision_runs_on_cpu(tmp_path):
    result = train(tiny(tmp_path, "training.mixed_precision=bf16", "training.max_steps=4"))
    assert result.accelerator.mixed_precision == "bf16"
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values())


# -- bad input fails before any training -------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.epoch=2", "valid keys: ['epochs'"),
        ("data.root=/no/such/mnist", "data.root: MNIST IDX files not found"),
        ("compression.budget=1", "smallest feasible budget is 2"),
        ("training.epochs=two", "training.epochs: expected an integer"),
        ("optimizer.name=lbfgs", "optimizer.name: 'lbfgs' is not one of"),
        ("training.label_smoothing=1.0", "training.label_smoothing must be in [0, 1), got 1.0"),
    ],
)
def test_bad_recipe_fails_before_training(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    code = cli_main(["train", str(TINY), "--set", f"output.dir={out}", "--set", override])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists(), "nothing may be written before the recipe is accepted"


def test_unregistered_method_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"compression.method 'nosuchmethod' is not registered.*available"):
        tiny(tmp_path, "compression.method=nosuchmethod")


def test_occupied_output_dir_needs_overwrite_or_resume(tmp_path):
    train(tiny(tmp_path, "training.max_steps=2"))
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny(tmp_path, "training.max_steps=2", "output.overwrite=false"))
