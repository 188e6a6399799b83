"""The model card (README.md) of a checkpoint folder, with huggingface_hub's ModelCard.

Metadata follows the Hub's model card spec (library_name, tags, base_model,
datasets, metrics) so the repo is searchable; the body shows what was
compressed (the report tables) and the two lines that load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData

if TYPE_CHECKING:
    from .checkpoint import CheckpointConfig

__all__ = ["build_card"]


def build_card(
    config: "CheckpointConfig",
    name: str,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    metrics: dict[str, float] | None = None,
) -> ModelCard:
    """The card for a folder described by ``config``; ``name`` (repo id or folder) goes in the load snippet."""
    base = config.base_model
    architecture = base.get("name") or base.get("class")
    methods = sorted({plan.config.method for plan in config.plans})
    data = ModelCardData(
        library_name="hf-freqcompress",
        tags=["hf-freqcompress", "model-compression", base["library"], *methods],
        base_model=base_model,
        datasets=datasets,
        metrics=sorted(metrics) if metrics else None,
    )
    sections = [
        f"# {name.rstrip('/').rpartition('/')[2]}",
        f"A `{architecture}` ({base['library']}) compressed with hf-freqcompress "
        f"({', '.join(methods)}); the checkpoint stores only the compressed numbers.",
    ]
    for plan in config.plans:
        report = plan.report
        sections.append(
            f"## {report.method} at budget {report.budget}\n\n"
            f"{report.dense_values:,} weights -> {report.stored_values:,} stored values "
            f"({report.ratio:.1f}x, {report.stored_bytes:,} bytes as {report.storage_dtype}, seed {report.seed}).\n\n"
            f"```text\n{report.table()}\n```"
        )
    if metrics:
        rows = "\n".join(f"| {key} | {value:.4g} |" for key, value in sorted(metrics.items()))
        sections.append(f"## Metrics\n\n| metric | value |\n|---|---|\n{rows}")
    sections.append(
        "## Load\n\n```python\nfrom hf_freqcompress import from_pretrained, materialize\n\n"
        f'model = from_pretrained("{name}")\n'
        "plain = materialize(model)  # optional: dense weights, a plain model for export\n```"
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
