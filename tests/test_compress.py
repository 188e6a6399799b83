from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from hf_freqcompress import (
    LayerKind,
    available_methods,
    compress,
    enable_weight_recompute,
    get_reports,
    materialize,
    register_layer_kind,
)
from hf_freqcompress.surgery import classifier_names

from conftest import tiny_gpt2


def test_report_fields_and_exact_budget(mlp):
    report = compress(mlp, budget="1/8", exclude=[])
    dense = 64 * 128 + 128 * 64 + 64 * 10
    assert report.dense_values == dense
    assert report.stored_values == dense // 8
    assert report.stored_bytes == report.stored_values * 4
    assert [row.name for row in report.layers] == ["1.weight", "3.weight", "5.weight"]
    assert all(0 <= row.rel_error <= 1.5 for row in report.layers)
    text = str(report)
    assert "1.weight" in text and "total" in text
    assert report.to_dict()["stored_values"] == report.stored_values
    assert get_reports(mlp) == [report]


def test_storage_dtype_sets_bytes_and_byte_budgets(mlp):
    report = compress(mlp, budget="2KB", exclude=[], storage_dtype="float16")
    assert report.stored_values == 1000
    assert report.stored_bytes == 2000


def test_default_skips_head_and_small_layers(mlp):
    mlp.add_module("tiny", nn.Linear(4, 4))  # 16 weights, under the default floor
    report = compress(mlp, budget="1/8")
    assert [row.name for row in report.layers] == ["1.weight", "3.weight"]


def test_targets_and_exclude_patterns(mlp):
    report = compress(copy.deepcopy(mlp), budget="1/8", targets=["3"])
    assert [row.name for row in report.layers] == ["3.weight"]
    report = compress(copy.deepcopy(mlp), budget="1/8", targets=r"[13]", exclude=["1"])
    assert [row.name for row in report.layers] == ["3.weight"]
    report = compress(copy.deepcopy(mlp), budget="1/8", targets=["*"], exclude=["5"])
    assert [row.name for row in report.layers] == ["1.weight", "3.weight"]


def test_container_pattern_selects_layers_below_it():
    model = nn.Sequential(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), nn.Linear(64, 10))
    report = compress(model, budget="1/4", targets=["0"])
    assert [row.name for row in report.layers] == ["0.0.weight", "0.1.weight"]


def test_trainable_numbers_are_exactly_the_stored_values(mlp):
    report = compress(mlp, budget="1/16", exclude=[])
    trainable = sum(p.numel() for name, p in mlp.named_parameters() if name.endswith("weight.original"))
    assert trainable == report.stored_values
    assert not any(name.endswith(".weight") for name, _ in mlp.named_parameters())
    assert not any(key.endswith(".weight") for key in mlp.state_dict())


def state_snapshot(model: nn.Module):
    return {name: (id(p), p.detach().clone()) for name, p in model.named_parameters()}, type(model[1])


def test_failure_leaves_model_exactly_as_it_was(mlp, monkeypatch):
    before_params, before_type = state_snapshot(mlp)
    from hf_freqcompress.methods import hashednets

    calls = {"n": 0}
    original_project = hashednets.HashedNetsWeight.project

    def failing_project(self, weight):
        calls["n"] += 1
        if calls["n"] == 3:  # the last of three layers fails after two were registered
            raise RuntimeError("boom")
        return original_project(self, weight)

    monkeypatch.setattr(hashednets.HashedNetsWeight, "project", failing_project)
    with pytest.raises(RuntimeError, match="boom"):
        compress(mlp, budget="1/8", exclude=[])
    after_params, after_type = state_snapshot(mlp)
    assert after_type is before_type is nn.Linear
    assert not any(parametrize.is_parametrized(m) for m in mlp.modules())
    assert before_params.keys() == after_params.keys()
    for name, (identity, value) in before_params.items():
        assert after_params[name][0] == identity, name
        assert torch.equal(after_params[name][1], value), name
    assert get_reports(mlp) == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="nope"), "unknown method 'nope'"),
        (dict(budget=0), ">= 1"),
        (dict(budget=1.5), r"\(0, 1\]"),
        (dict(budget="0/7"), r"\(0, 1\]"),
        (dict(budget=2), "smallest feasible budget is 3"),
        (dict(budget="1/100000"), r"smallest feasible budget is 1/\d+"),
        (dict(targets=["nothing_here"]), "matches no module"),
        (dict(targets=["0"]), "matches only layers that are excluded or not compressible"),  # nn.Flatten
        (dict(init="zeros"), "unknown init 'zeros'"),
    ],
)
def test_bad_input_errors(mlp, kwargs, match):
    kwargs = {"budget": "1/8", "exclude": [], **kwargs}
    with pytest.raises(ValueError, match=match):
        compress(mlp, **kwargs)
    assert not any(parametrize.is_parametrized(m) for m in mlp.modules())


def test_unsupported_layer_named_explicitly():
    model = nn.Sequential(nn.Embedding(100, 32), nn.Linear(32, 32))
    with pytest.raises(ValueError, match=r"layer '0' \(Embedding\) is not a supported layer kind"):
        compress(model, budget="1/4", targets=["0"])


def test_register_layer_kind_makes_a_layer_compressible():
    class Bilinearish(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(16, 32))

        def forward(self, x):
            return x @ self.weight.t()

    register_layer_kind(LayerKind("test_bilinearish", Bilinearish))
    model = nn.Sequential(Bilinearish())
    report = compress(model, budget=64, exclude=[])
    assert report.layers[0].kind == "test_bilinearish"
    assert model(torch.randn(2, 32)).shape == (2, 16)


def test_compressing_twice_is_refused(mlp):
    compress(mlp, budget="1/8", exclude=[])
    with pytest.raises(ValueError, match="already compressed"):
        compress(mlp, budget="1/8", exclude=[])


def test_disjoint_second_compress_is_allowed_and_reported(mlp):
    compress(mlp, budget="1/8", targets=["1"])
    compress(mlp, budget="1/4", targets=["3"])
    assert [r.layers[0].name for r in get_reports(mlp)] == ["1.weight", "3.weight"]


def test_non_float_weight_is_refused():
    model = nn.Sequential(nn.Linear(64, 64))
    model[0].weight = nn.Parameter(torch.ones(64, 64, dtype=torch.int32), requires_grad=False)
    with pytest.raises(ValueError, match="int32 weight; only floating-point"):
        compress(model, budget="1/8", exclude=[])


def test_tied_weights_are_refused_with_names():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(ValueError, match=r"lm_head.weight' is shared \(tied\) with \['transformer.wte.weight'\]"):
        compress(model, budget="1/8", targets=["lm_head"])


def test_classifier_found_generically():
    import timm

    assert classifier_names(timm.create_model("resnet18", pretrained=False, num_classes=5)) == {"fc"}
    assert classifier_names(tiny_gpt2()) == {"lm_head"}
    plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert classifier_names(plain) == {"2"}


def test_materialize_gives_plain_model_with_same_outputs(mlp):
    compress(mlp, budget="1/8", exclude=[])
    x = torch.randn(3, 64)
    expected = mlp(x)
    materialize(mlp)
    assert type(mlp[1]) is nn.Linear
    assert not hasattr(mlp, "hf_freqcompress_reports")
    assert torch.allclose(mlp(x), expected)
    assert {name for name, _ in mlp.named_parameters()} == {"1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"}
    assert list(mlp.buffers()) == []


def test_parametrize_cached_agrees(mlp):
    compress(mlp, budget="1/8", exclude=[])
    x = torch.randn(3, 64)
    expected = mlp(x)
    with parametrize.cached():
        assert torch.allclose(mlp(x), expected)


@pytest.mark.parametrize("method", available_methods())
def test_torch_compile_traces_every_method_in_one_graph(method):
    """fullgraph=True fails on any graph break in a reconstruction; aot_eager traces autograd without a C compiler."""
    eager = _conv_and_linear()
    compress(eager, budget="1/8", method=method, exclude=[])
    compiled = copy.deepcopy(eager)
    x = torch.randn(2, 3, 8, 8)
    expected, got = eager(x), torch.compile(compiled, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(got, expected)
    expected.square().sum().backward()
    got.square().sum().backward()
    grads = {name: p.grad for name, p in eager.named_parameters() if p.grad is not None}
    assert grads, "no stored tensor received a gradient"
    for name, p in compiled.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], msg=name)


def test_same_seed_same_model_other_seed_other_model(mlp):
    a, b, c = copy.deepcopy(mlp), copy.deepcopy(mlp), copy.deepcopy(mlp)
    compress(a, budget="1/8", exclude=[], seed=1)
    compress(b, budget="1/8", exclude=[], seed=1)
    compress(c, budget="1/8", exclude=[], seed=2)
    assert torch.equal(a[1].weight, b[1].weight)
    assert not torch.equal(a[1].weight, c[1].weight)


def _conv_and_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(32 * 4 * 4, 64))


@pytest.mark.parametrize(
    "method",
    ["hashednets", "freshnets", "funhash", {"method": "funhash", "reconstruction": "linear"},
     {"method": "funhash", "reconstruction": "sum"}, "freqreg", "pq", "binary_stack"],
    ids=str,
)
def test_preserve_norm_gives_every_layer_its_dense_norm(method):
    model = _conv_and_linear()
    dense = {name: m.weight.detach().norm() for name, m in model.named_modules() if hasattr(m, "weight")}
    projected = copy.deepcopy(model)
    compress(projected, budget="1/16", method=method, exclude=[])
    compress(model, budget="1/16", method=method, exclude=[], init="preserve_norm")
    shrunk = False
    for name, norm in dense.items():
        rebuilt = getattr(model, name).weight.detach().norm()
        torch.testing.assert_close(rebuilt, norm, rtol=1e-4, atol=0)
        shrunk |= bool(getattr(projected, name).weight.detach().norm() < 0.9 * norm)
    assert shrunk, "the projection of a random init should shrink some layer (else this test shows nothing)"


def test_preserve_norm_refuses_a_fixed_g_on_a_shared_space_and_leaves_the_model(mlp):
    before = copy.deepcopy(mlp.state_dict())
    method = {"method": "funhash", "reconstruction": "sum", "shared_space": True}
    with pytest.raises(ValueError, match="cannot be rescaled per layer"):
        compress(mlp, budget="1/8", method=method, exclude=[], init="preserve_norm")
    assert not any(parametrize.is_parametrized(m) for m in mlp.modules())
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


def test_materialize_after_training_leaves_a_plain_trainable_model(mlp):
    compress(mlp, budget="1/8", exclude=[])
    enable_weight_recompute(mlp)
    mlp(torch.randn(4, 64)).sum().backward()  # every stored tensor now has a gradient of its own shape
    materialize(mlp)
    assert not any(mlp[i]._forward_pre_hooks or mlp[i]._forward_hooks for i in (1, 3, 5))
    assert all(p.grad is None or p.grad.shape == p.shape for p in mlp.parameters())
    mlp(torch.randn(4, 64)).sum().backward()
    assert all(p.grad.shape == p.shape for p in mlp.parameters())
    assert not [name for name in vars(mlp) if name.startswith("hf_freqcompress")]
