"""Weight recompute: the default path's gradients, rebuilt weights not kept, clean hooks, DDP, compile, recipes."""

from __future__ import annotations

import copy
import gc
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hf_freqcompress
from conftest import tiny_gpt2
from hf_freqcompress.methods import compressed_weights
from hf_freqcompress.recompute import disable_weight_recompute, enable_weight_recompute, is_weight_recompute_enabled
from hf_freqcompress.training import load_recipe, train

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "helpers" / "recompute_worker.py"
METHODS = [*hf_freqcompress.available_methods(), {"method": "funhash", "shared_space": True}]
"""Every method, plus a space shared by all layers (a Parameter that another layer's parametrization owns)."""


def convnet(dtype: torch.dtype = torch.float32, method: str | dict = "hashednets") -> nn.Module:
    """Convolutions and linear layers, so every method finds layers it compresses."""
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10),
    ).to(dtype)
    hf_freqcompress.compress(model, budget="1/4", method=method, exclude=[])
    return model


def resnet18(method: str = "freshnets") -> nn.Module:
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    hf_freqcompress.compress(model, budget="1/16", method=method)
    return model


def gpt2() -> nn.Module:
    model = tiny_gpt2()
    hf_freqcompress.compress(model, budget="1/8", method="hashednets")
    return model


def pair(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The model on the default path, and a deep copy with recompute enabled."""
    return model, enable_weight_recompute(copy.deepcopy(model))


def loss_of(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1)  # dropout draws the same masks on both paths
    out = model(inputs)
    return (out.logits if hasattr(out, "logits") else out).float().square().mean()


def gradients(model: nn.Module, *batches: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of every parameter after one backward per batch (accumulated), by name; None ones left out."""
    model.zero_grad(set_to_none=True)
    for inputs in batches:
        loss_of(model, inputs).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs (max {float((a[key] - b[key]).abs().max())})"


def stored_parameter_names(model: nn.Module) -> set[str]:
    """Trainable numbers of the compressed layers (an empty ``original`` of a layer reading a shared space has none)."""
    return {
        name for name, p in model.named_parameters() if ".parametrizations." in name and p.requires_grad and p.numel()
    }


def no_hooks_pushed() -> bool:
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is None


class LiveStorage(TorchDispatchMode):
    """Every storage an op allocates while active (not the model's parameters and buffers), tracked weakly.

    ``live_bytes()`` is what is still allocated; ``peak`` the most that was
    allocated at once when an op returned.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.known = {StorageWeakRef(t.untyped_storage()) for t in [*model.parameters(), *model.buffers()]}
        self.sizes: dict[StorageWeakRef, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.layout is torch.strided:
                ref = StorageWeakRef(tensor.untyped_storage())
                if ref not in self.known:
                    self.sizes.setdefault(ref, tensor.untyped_storage().nbytes())
        self.peak = max(self.peak, self.live_bytes())
        return out

    def live_bytes(self) -> int:
        self.sizes = {ref: size for ref, size in self.sizes.items() if not ref.expired()}
        return sum(self.sizes.values())


EAGER_KERNELS = {"HF_FREQCOMPRESS_KERNELS": "eager"}
"""The library's own compiled hashing kernels cannot run under a dispatch mode (the memory probe) and cost
each fresh process a compile: those tests use its eager kernels, which give the same integers."""


@pytest.fixture
def eager_kernels(monkeypatch):
    for key, value in EAGER_KERNELS.items():
        monkeypatch.setenv(key, value)


def training_memory(model: nn.Module, inputs: torch.Tensor) -> tuple[int, int]:
    """(bytes allocated in forward and still held for backward, peak bytes over forward + backward)."""
    loss_of(model, inputs).backward()  # lazily built caches are not what is measured
    model.zero_grad(set_to_none=False)
    probe = LiveStorage(model)
    with probe:
        loss = loss_of(model, inputs)
        gc.collect()
        held = probe.live_bytes()
        loss.backward()
    return held, probe.peak


def dense_weight_bytes(model: nn.Module) -> list[int]:
    return [module.weight.numel() * module.weight.element_size() for _, module, _, _ in compressed_weights(model)]


# -- gradients ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m if isinstance(m, str) else "funhash_shared_space")
def test_gradients_equal_the_default_path_for_every_method(method, dtype):
    """Bit for bit, for every stored parameter (original, reconstruction nets, scales, codebooks, shared spaces)."""
    default, recompute = pair(convnet(dtype, method))
    inputs = torch.randn(4, 8, 4, 4, dtype=dtype)
    expected = gradients(default, inputs)
    assert stored_parameter_names(default) <= expected.keys()
    assert_identical(gradients(recompute, inputs), expected)
    assert torch.equal(recompute(inputs), default(inputs))


@pytest.mark.parametrize(
    "build, inputs",
    [
        (lambda: resnet18("freshnets"), lambda: torch.randn(2, 3, 32, 32)),
        (gpt2, lambda: torch.randint(0, 128, (2, 16))),
    ],
    ids=["timm_resnet18_freshnets", "gpt2_hashednets"],
)
def test_gradients_equal_on_timm_and_transformers_models(build, inputs):
    default, recompute = pair(build())
    batch = inputs()
    assert_identical(gradients(recompute, batch), gradients(default, batch))


def test_gradient_accumulation_over_two_backward_passes():
    default, recompute = pair(convnet())
    first, second = torch.randn(4, 8, 4, 4), torch.randn(4, 8, 4, 4)
    assert_identical(gradients(recompute, first, second), gradients(default, first, second))


def test_backward_rebuilds_under_the_forward_autocast_state():
    """Forward under bf16 autocast, backward outside it: the rebuild in backward runs under autocast again.

    binary_stack's rebuild multiplies matrices (its selection), which autocast runs in bf16.
    """
    default, recompute = pair(convnet(method="binary_stack"))
    inputs = torch.randn(4, 8, 4, 4)
    grads = []
    for model in (default, recompute):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model, inputs)
        loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert_identical(grads[1], grads[0])


def test_composes_with_activation_checkpointing_and_save_on_cpu():
    """Tensors the layer saves besides its weight still go to the saved-tensor hooks around it."""
    default, recompute = pair(convnet())
    inputs = torch.randn(4, 8, 4, 4)
    expected = gradients(default, inputs)

    def checkpointed(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(model, batch, use_reentrant=False).square().mean()

    for loss_fn in (checkpointed, lambda model, batch: loss_of(model, batch)):
        recompute.zero_grad(set_to_none=True)
        with torch.autograd.graph.save_on_cpu():
            loss_fn(recompute, inputs).backward()
        assert_identical({n: p.grad for n, p in recompute.named_parameters() if p.grad is not None}, expected)


def test_parametrize_cached_and_no_grad_take_the_plain_rebuild(monkeypatch):
    """cached() keeps every weight on purpose: recompute stands aside; eval rebuilds once, no hook, no bookkeeping.

    Two models built alike, not a deep copy: parametrize's cache is keyed by
    the module its property was created for, which a deep copy shares.
    """
    from hf_freqcompress import recompute as module

    default = convnet()
    torch.manual_seed(0)
    recompute = enable_weight_recompute(convnet())
    inputs = torch.randn(4, 8, 4, 4)
    with parametrize.cached():
        expected = gradients(default, inputs)
        assert_identical(gradients(recompute, inputs), expected)
    monkeypatch.setattr(module, "_Rebuild", None)  # any recompute bookkeeping would now fail
    monkeypatch.setattr(module, "_ModuleCall", None)
    with torch.no_grad():
        assert torch.equal(recompute(inputs), default(inputs))
    with torch.inference_mode():
        assert torch.equal(recompute(inputs), default(inputs))


# -- memory ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hashed_resnet18() -> nn.Module:
    return resnet18("hashednets")


SCATTER_WORKSPACE = 16 * 2**20
"""What a hashed layer's backward allocates besides its weight and gradient, whatever the layer's size: one
piece's int32 index (methods/gather.py's _PIECE_VALUES), the eager fold's int64 temporaries of one chunk and
the per-thread gradient tables."""


def test_rebuilt_weights_are_not_kept_for_backward(eager_kernels, hashed_resnet18):
    """After forward only activations stay; backward holds about two dense layers at a time (W and its gradient)."""
    default, recompute = pair(copy.deepcopy(hashed_resnet18))
    dense = timm.create_model("resnet18", pretrained=False, num_classes=10)
    inputs = torch.randn(2, 3, 32, 32)
    weights = dense_weight_bytes(default)
    activations, _ = training_memory(dense, inputs)
    held_default, peak_default = training_memory(default, inputs)
    held, peak = training_memory(recompute, inputs)
    assert held_default >= activations + 0.9 * sum(weights)  # the probe sees the rebuilt weights
    assert peak_default >= sum(weights)
    assert held <= activations * 1.05 + 2**16
    assert peak <= held + 2.5 * max(weights) + SCATTER_WORKSPACE


def test_streamed_inference_keeps_one_rebuilt_weight_and_cached_keeps_all(eager_kernels, hashed_resnet18):
    """inference_mode without cached(): each weight is freed after its layer; cached(): all stay (module docstring)."""
    model = enable_weight_recompute(copy.deepcopy(hashed_resnet18))
    weights = dense_weight_bytes(model)
    rebuilt: dict[StorageWeakRef, int] = {}
    peaks = []

    def record(chain: nn.Module, args, weight: torch.Tensor) -> None:
        rebuilt[StorageWeakRef(weight.untyped_storage())] = weight.untyped_storage().nbytes()
        peaks.append(sum(size for ref, size in rebuilt.items() if not ref.expired()))

    for _, module, name, _ in compressed_weights(model):
        module.parametrizations[name].register_forward_hook(record)
    inputs = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        model(inputs)
        streamed = max(peaks)
        peaks.clear()
        with parametrize.cached():
            model(inputs)
            model(inputs)  # rebuilt once, then read from the cache
    assert streamed == max(weights)
    assert max(peaks) == sum(weights) and len(peaks) == len(weights)


# -- hooks ----------------------------------------------------------------------------------------------


def hook_counts(model: nn.Module) -> list[tuple[int, int, int]]:
    return [
        (len(m._forward_pre_hooks), len(m._forward_hooks), len(m._forward_hooks_always_called)) for m in model.modules()
    ]


def test_enable_is_idempotent_and_disable_restores_the_default_model():
    default, model = pair(convnet())
    before = hook_counts(default)
    assert not is_weight_recompute_enabled(default) and is_weight_recompute_enabled(model)
    assert enable_weight_recompute(model) is model
    assert hook_counts(model) == hook_counts(enable_weight_recompute(copy.deepcopy(default)))
    assert disable_weight_recompute(model) is model and disable_weight_recompute(model) is model
    assert not is_weight_recompute_enabled(model)
    assert hook_counts(model) == before
    assert all(type(module.parametrizations[name]) is parametrize.ParametrizationList
               for _, module, name, _ in compressed_weights(model))
    inputs = torch.randn(4, 8, 4, 4)
    assert_identical(gradients(model, inputs), gradients(default, inputs))


def test_enable_on_a_model_without_compressed_layers_is_an_error(mlp):
    with pytest.raises(ValueError, match="no compressed layer.*compress"):
        enable_weight_recompute(mlp)
    assert not is_weight_recompute_enabled(mlp)


def test_a_forward_that_raises_leaves_no_hook_pushed(monkeypatch):
    from hf_freqcompress import recompute as module

    default, model = pair(convnet())
    with pytest.raises(RuntimeError):
        model(torch.randn(4, 3, 4, 4))  # wrong channel count: the first convolution raises
    assert no_hooks_pushed() and module._call_stack() == []
    _, first, name, parametrization = compressed_weights(model)[1]
    monkeypatch.setattr(parametrization, "reconstruct", lambda original: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model(torch.randn(4, 8, 4, 4))  # the rebuild itself raises
    assert no_hooks_pushed() and module._call_stack() == []
    monkeypatch.undo()
    inputs = torch.randn(4, 8, 4, 4)
    assert_identical(gradients(model, inputs), gradients(default, inputs))


def test_a_saved_tensor_changed_in_place_is_still_an_error():
    """Autograd does not check the version of tensors that saved-tensor hooks pack; recompute checks it itself."""
    def double_input(module: nn.Module, args: tuple[torch.Tensor], output: torch.Tensor) -> None:
        args[0].mul_(2)  # the input the linear layer saved for its weight gradient

    default, recompute = pair(convnet())
    for model in (default, recompute):
        model[5].register_forward_hook(double_input)
        loss = loss_of(model, torch.randn(4, 8, 4, 4))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


# -- torch.compile, DDP, recipes ------------------------------------------------------------------------


def saved_bytes_of_compiled_step(model: nn.Module, inputs: torch.Tensor) -> int:
    """Bytes the compiled forward saves for backward, parameters and buffers not counted."""
    known = {StorageWeakRef(t.untyped_storage()) for t in [*model.parameters(), *model.buffers()]}
    saved: dict[StorageWeakRef, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        ref = StorageWeakRef(tensor.untyped_storage())
        if ref not in known:
            saved[ref] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of(model, inputs)
    loss.backward()
    return sum(saved.values())


def test_torch_compile_recomputes_the_rebuild_in_the_compiled_backward(mlp):
    """The rebuild is traced inside torch.utils.checkpoint: the compiled forward saves no rebuilt weight.

    aot_eager runs the same ops with and without recompute, so gradients match
    bit for bit. (inductor works too, to rounding: it fuses the recomputed
    rebuild into other kernels of the backward; its compile time is too long
    for this suite.)
    """
    torch._dynamo.reset()
    hf_freqcompress.compress(mlp, budget="1/4", method="hashednets", exclude=[])
    default, recompute = pair(mlp)
    inputs = torch.randn(4, 64)
    compiled_default, compiled = (torch.compile(m, backend="aot_eager") for m in (default, recompute))
    assert_identical(gradients(compiled, inputs), gradients(compiled_default, inputs))
    consumed = sum(dense_weight_bytes(default)[1:])  # the first layer's input needs no gradient: W is not saved
    saved_default = saved_bytes_of_compiled_step(compiled_default, inputs)
    assert saved_default >= consumed
    assert saved_bytes_of_compiled_step(compiled, inputs) <= saved_default - consumed
    torch._dynamo.reset()


def load_worker():
    spec = importlib.util.spec_from_file_location("recompute_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    return worker


def test_ddp_two_processes_equal_one_process_on_the_default_path(tmp_path, eager_kernels):
    """torchrun, 2 gloo ranks, recompute on, each rank half of every batch == one process averaging the halves."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(tmp_path)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["world_size"] for r in range(2)] == [2, 2]

    worker = load_worker()
    model = worker.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=worker.LR)
    for inputs, labels in worker.batches():
        total = None
        for rank in range(worker.WORLD):  # DDP: every rank's gradient / world size, summed by all-reduce
            model.zero_grad(set_to_none=True)
            worker.step(model, inputs.chunk(worker.WORLD)[rank], labels.chunk(worker.WORLD)[rank])
            grads = [p.grad / worker.WORLD for p in model.parameters()]
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
        for p, grad in zip(model.parameters(), total):
            p.grad = grad
        optimizer.step()
    expected = {k: v.detach() for k, v in model.state_dict().items()}
    for rank in range(2):
        assert_identical(load_file(str(tmp_path / f"rank{rank}.safetensors")), expected)


def test_recipe_switch_trains_to_the_same_model(tmp_path):
    """training.weight_recompute=true: recompute is on in the run, and the trained stored values are the same."""
    recipe = ROOT / "tests" / "recipes" / "tiny_mnist.yaml"
    results = {}
    for switch in ("false", "true"):
        overrides = [f"output.dir={tmp_path / switch}", "training.epochs=1", "training.max_steps=3",
                     "output.save_model=false", f"training.weight_recompute={switch}"]
        try:
            results[switch] = train(load_recipe(recipe, overrides))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
    assert is_weight_recompute_enabled(results["true"].model)
    assert not is_weight_recompute_enabled(results["false"].model)
    assert results["true"].global_step == 3
    assert_identical(results["true"].model.state_dict(), results["false"].model.state_dict())
