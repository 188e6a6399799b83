"""The attributes this library sets on a user's model, and reading them back.

Kept in a leaf module so that every layer (compress, plans, saving, loading)
can read a model's compression record without importing one another.
"""

from __future__ import annotations

from torch import nn

from .report import CompressionReport

__all__ = ["REPORT_ATTRIBUTE", "RECIPE_ATTRIBUTE", "SOURCE_ATTRIBUTE", "get_reports", "add_reports"]

REPORT_ATTRIBUTE = "hf_freqcompress_reports"
"""The model attribute listing one report per ``compress()`` call; ``materialize`` removes it.

A model may be compressed in several calls on disjoint layers (say FreshNets
on the convolutions, PQ on the fully-connected layers), hence a list."""

RECIPE_ATTRIBUTE = "hf_freqcompress_recipe"
"""Set on timm models built by this library: ``{"name", "kwargs"}``, so a checkpoint can record exactly how
to rebuild the architecture (timm itself does not keep constructor kwargs). ``materialize`` removes it."""

SOURCE_ATTRIBUTE = "hf_freqcompress_source"
"""Set by ``build_model``: ``{"spec", "pretrained", "weights"}``, where the model and its weights came from
(``weights``: the Hub id they were loaded from, None for a random initialisation or a local folder)."""


def get_reports(model: nn.Module) -> list[CompressionReport]:
    """The reports of the ``compress()`` calls applied to ``model``, oldest first."""
    return list(getattr(model, REPORT_ATTRIBUTE, []))


def add_reports(model: nn.Module, reports: list[CompressionReport]) -> None:
    """Append ``reports`` to the model's record."""
    setattr(model, REPORT_ATTRIBUTE, [*get_reports(model), *reports])
