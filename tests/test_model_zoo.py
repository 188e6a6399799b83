"""compress() on the architectures users bring: timm and transformers, built from configs."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.nn.utils import parametrize

from hf_freqcompress import compress
from hf_freqcompress.methods import compressed_weights

from conftest import tiny_gpt2, tiny_hf_resnet, tiny_hf_vit


def timm_model(name, **kwargs):
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def without_zero_init(model: torch.nn.Module) -> torch.nn.Module:
    """timm and transformers zero-init some heads and residual BN scales, which blocks gradients at step 0."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 1 and not param.any():
                param.normal_(0.0, 0.02)
    return model


IMAGE = torch.randn(2, 3, 32, 32)
TOKENS = torch.randint(0, 128, (2, 16))

ZOO = {
    "resnet18": (timm_model("resnet18"), IMAGE),
    "resnet50": (timm_model("resnet50"), IMAGE),
    "vit_tiny": (timm_model("vit_tiny_patch16_224", img_size=32), IMAGE),
    "vit_base": (timm_model("vit_base_patch16_224", img_size=32), IMAGE),
    "vgg11": (timm_model("vgg11"), IMAGE),
    "vgg16_bn": (timm_model("vgg16_bn"), IMAGE),
    "hf_vit": (tiny_hf_vit, IMAGE),
    "hf_resnet": (tiny_hf_resnet, IMAGE),
    "hf_gpt2": (tiny_gpt2, TOKENS),
}


def output_of(model, inputs):
    out = model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("name", list(ZOO))
def test_compress_train_step(name):
    factory, inputs = ZOO[name]
    model = without_zero_init(factory())
    dense_weights = {id(p) for p in model.parameters()}
    report = compress(model, budget="1/64", method="hashednets")
    assert report.dense_values > 0
    # the budget is met to within 1% and never exceeded
    assert report.stored_values <= report.dense_values // 64
    assert report.stored_values >= 0.99 * (report.dense_values // 64)

    # the stored values are exactly the trainable numbers of the targeted layers
    compressed = compressed_weights(model)
    assert len(compressed) == len(report.layers)
    stored = [module.parametrizations[param].original for _, module, param, _ in compressed]
    assert sum(t.numel() for t in stored) == report.stored_values
    assert all(t.requires_grad for t in stored)

    # no targeted layer keeps a dense weight anywhere: no float tensor of the dense size is left
    for (_, module, param, _), row in zip(compressed, report.layers):
        original = module.parametrizations[param].original
        assert param not in module._parameters
        leftovers = [t for t in [*module.parameters(), *module.buffers()] if t is not original]
        assert not any(t.is_floating_point() and t.numel() >= row.dense_values for t in leftovers)
        assert not any(id(t) in dense_weights and t.numel() >= row.dense_values for t in leftovers)
    state = model.state_dict()
    for row in report.layers:
        assert row.name not in state

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [t.detach().clone() for t in stored]
    output_of(model, inputs).float().pow(2).mean().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in stored)
    optimizer.step()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(t) for t in stored} <= optimized
    assert any(not torch.equal(b, t) for b, t in zip(before, stored))
    with parametrize.cached():
        assert torch.isfinite(output_of(model, inputs)).all()
