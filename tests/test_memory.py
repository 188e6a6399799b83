"""Compressed in memory, not only on disk: what a compressed model keeps resident with default options."""

from __future__ import annotations

import pytest
import torch

from hf_freqcompress import available_methods, compress, finalize, from_pretrained, get_reports, save_pretrained
from hf_freqcompress.models import build_model

PER_LAYER_SLACK = 256
"""Bytes of bookkeeping a layer may keep besides its stored numbers (a schedule counter, a small basis)."""


def _resident(model: torch.nn.Module) -> int:
    """Bytes of every distinct tensor storage the model holds (parameters and buffers, persistent or not)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


def _untargeted(model: torch.nn.Module) -> int:
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return sum(t.numel() * t.element_size() for name, t in tensors if ".parametrizations." not in name)


def _bound(model: torch.nn.Module) -> int:
    reports = get_reports(model)
    layers = sum(len(report.layers) for report in reports)
    return _untargeted(model) + 2 * sum(report.stored_bytes for report in reports) + PER_LAYER_SLACK * layers


@pytest.mark.parametrize("method", available_methods())
def test_default_options_keep_no_dense_size_state(tmp_path, method):
    model = build_model("timm:mnist_lenet").eval()
    dense = _resident(model)
    report = compress(model, budget="1/64", method=method, exclude=[])
    x = torch.randn(2, 1, 28, 28)
    model(x)
    if not report.training_values:  # binary_stack trains latents and selection logits until finalize()
        assert _resident(model) <= _bound(model)
    finalize(model)
    model(x)
    assert _resident(model) <= _bound(model) < dense / 10
    loaded = from_pretrained(save_pretrained(model, tmp_path / "ckpt"))
    loaded(x)
    assert _resident(loaded) <= _bound(loaded)
