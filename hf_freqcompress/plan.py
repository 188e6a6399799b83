"""A compressed model's recipe: what ``compress()`` did, in a form that can be replayed.

Saving records one :class:`CompressionPlan` per ``compress()`` call (the
method config, the report and each layer's allocation); loading replays
the plans on a freshly built skeleton so that every parametrization gets
exactly the layer, allocation, seed and storage dtype it was saved with,
and adopts storage of the saved shapes instead of re-projecting weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .dtypes import float_dtype
from .methods import CompressedWeight, MethodConfig, compressed_weights, get_method, resolve_config
from .report import CompressionReport
from .state import add_reports, get_reports
from .surgery import StoredTensors, Target, restore_parametrizations, targets_by_name

__all__ = ["CompressionPlan", "plans_of", "build_parametrizations", "apply_plans"]


@dataclass(frozen=True)
class CompressionPlan:
    """One ``compress()`` call: method config, its report, and the values planned per layer."""

    config: MethodConfig
    report: CompressionReport
    planned_values: tuple[int, ...]

    @property
    def storage_dtype(self) -> torch.dtype:
        return float_dtype(self.report.storage_dtype, "storage_dtype")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method_config": self.config.to_dict(),
            "report": self.report.to_dict(),
            "planned_values": list(self.planned_values),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "CompressionPlan":
        """Read and validate a plan; ``where`` names it in errors (file and position).

        An unknown method name fails here, naming the installed methods.
        """
        keys = {"method_config", "report", "planned_values"}
        if not isinstance(data, dict) or set(data) != keys:
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{where} must have exactly the keys {sorted(keys)}; got {found}")
        if not isinstance(data["method_config"], dict):
            raise ValueError(f"{where}.method_config must be a JSON object")
        try:
            config = resolve_config(data["method_config"])
        except (ValueError, TypeError) as error:
            raise ValueError(f"{where}: {error}; install the hf-freqcompress version or plugin that saved it") from None
        try:
            report = CompressionReport.from_dict(data["report"])
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{where}.report is malformed ({error!r})") from None
        planned = data["planned_values"]
        if not isinstance(planned, list) or not all(type(v) is int for v in planned):
            raise ValueError(f"{where}.planned_values must be a list of ints")
        if len(planned) != len(report.layers):
            raise ValueError(f"{where} plans {len(planned)} layers but its report lists {len(report.layers)}")
        if report.method != config.method:
            raise ValueError(f"{where}: report method {report.method!r} differs from config method {config.method!r}")
        if not isinstance(report.storage_dtype, str) or type(report.seed) is not int:
            raise ValueError(f"{where}.report needs a storage_dtype name and an int seed")
        float_dtype(report.storage_dtype, f"{where}.report.storage_dtype")
        return cls(config, report, tuple(planned))


def plans_of(model: nn.Module) -> list[CompressionPlan]:
    """The plans of every ``compress()`` call on ``model``, checked against its parametrizations."""
    found: dict[str, CompressedWeight] = {}
    for module_name, _, param_name, parametrization in compressed_weights(model):
        found[f"{module_name}.{param_name}" if module_name else param_name] = parametrization
    plans, reported = [], set()
    for report in get_reports(model):
        names = [layer.name for layer in report.layers]
        missing = [name for name in names if name not in found]
        if missing:
            raise ValueError(
                f"layers {missing} are in the {report.method!r} compression report but no longer compressed: "
                "the model was materialized or edited after compress()"
            )
        chosen = [found[name] for name in names]
        plans.append(CompressionPlan(chosen[0].config, report, tuple(p.planned_values for p in chosen)))
        reported.update(names)
    unreported = sorted(set(found) - reported)
    if unreported:
        raise ValueError(f"compressed layers {unreported} have no compression report; compress them with compress()")
    return plans


def build_parametrizations(
    targets: Sequence[Target],
    config: MethodConfig,
    allocation: Sequence[int],
    seeds: Sequence[int],
    storage_bits: int,
) -> list[CompressedWeight]:
    """One linked parametrization per target: the single build path of ``compress()`` and loading.

    Builds each layer's ``CompressedWeight`` (hash caches included) with its
    planned number of values and hash seed, then lets the method link the layers of one
    call (``prepare_group``, e.g. FunHashNN's shared space) given their
    current weights: real ones are fitted jointly, a skeleton's meta weights
    (loading) only size the linked state, whose values come from the
    checkpoint. The model itself is not touched.
    """
    parametrization_class = get_method(config.method)
    parametrizations = [
        parametrization_class(target.spec(storage_bits), target.kind, config, values, seed, device=target.weight.device)
        for target, values, seed in zip(targets, allocation, seeds, strict=True)
    ]
    parametrization_class.prepare_group(parametrizations, [target.kind.to_canonical(target.weight) for target in targets])
    return parametrizations


def _check_planned(plan: CompressionPlan, targets: Sequence[Target]) -> None:
    """Every recorded layer matches the model's weight and its allocation is one the method accepts."""
    parametrization_class = get_method(plan.config.method)
    bits = torch.finfo(plan.storage_dtype).bits
    for layer, target, values in zip(plan.report.layers, targets, plan.planned_values):
        spec = target.spec(bits)
        if spec.shape != tuple(layer.shape):
            raise ValueError(
                f"the checkpoint compresses {layer.name!r} with shape {tuple(layer.shape)} but the model's "
                f"weight has shape {spec.shape}: the folder was saved from another architecture"
            )
        low = parametrization_class.min_values(spec, plan.config)
        high = parametrization_class.max_values(spec, plan.config)
        if not low <= values <= high:
            raise ValueError(
                f"layer {layer.name!r} is planned {values} values, outside the range [{low}, {high}] "
                f"{plan.config.method!r} accepts for it"
            )


def apply_plans(model: nn.Module, plans: list[CompressionPlan], stored: Mapping[str, StoredTensors]) -> None:
    """Compress ``model`` exactly as ``plans`` record; meant for a fresh skeleton on the meta device.

    ``stored`` maps each weight name to the storage its parametrization
    adopts (shaped like the checkpoint's tensors); nothing is projected.
    Each plan applies entirely or not at all; on failure the caller drops
    the skeleton.
    """
    for plan in plans:
        layers = plan.report.layers
        targets = targets_by_name(model, [(layer.name, layer.kind) for layer in layers])
        _check_planned(plan, targets)
        bits = torch.finfo(plan.storage_dtype).bits
        seeds = [plan.report.seed_of(layer) for layer in layers]
        parametrizations = build_parametrizations(targets, plan.config, plan.planned_values, seeds, bits)
        restore_parametrizations(list(zip(targets, parametrizations)), [stored[layer.name] for layer in layers])
    add_reports(model, [plan.report for plan in plans])
