"""Compressed models run under ``torch.compile`` as one graph, with eager's outputs and gradients.

``torch.compile(model)`` is how users speed up training (and how perf.py's
``--compile`` rows time it), so every registered method must trace through
``torch.nn.utils.parametrize`` without graph breaks. The ``aot_eager``
backend runs dynamo and AOT autograd (where breaks and tracing errors
happen) without inductor's C++ build, so the test needs no compiler.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_freqcompress import available_methods, compress


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


@pytest.mark.parametrize("method", available_methods())
def test_compiled_compressed_model_matches_eager(method):
    torch.manual_seed(0)
    model = small_net()
    compress(model, budget="1/4", method=method, exclude=[])
    x = torch.randn(4, 3, 8, 8)
    eager = model(x)
    eager.square().sum().backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert eager_grads, "nothing to compare: no stored tensor got a gradient"
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break fails
    out = compiled(x)
    out.square().sum().backward()

    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-6)
