"""The model card (README.md) of a checkpoint folder, with huggingface_hub's ModelCard.

Metadata follows the Hub's model card spec so the repo is searchable and
linked to its base: ``base_model`` with ``base_model_relation: quantized``,
``library_name`` (``transformers`` for transformers models, which load with
``AutoModelFor*`` after ``import hf_freqcompress``; ``hf-freqcompress`` for
timm models, which only this library loads), ``pipeline_tag``, tags and the
base's license when known. The body shows the report tables and how to load.

The generated body sits between two HTML comments. Pushing to a repo whose
README already exists merges instead of replacing (:func:`merge_cards`): the
user's metadata and text stay, this library's own keys and tags are updated,
and only the text between the markers is regenerated.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn

from .state import SOURCE_ATTRIBUTE

if TYPE_CHECKING:
    from .checkpoint import CheckpointConfig

__all__ = ["build_card", "merge_cards", "infer_base_model", "infer_license"]

BEGIN = "<!-- hf-freqcompress: generated section, rewritten on every push; edit outside these markers -->"
END = "<!-- hf-freqcompress: end of generated section -->"
OWNED_KEYS = ("library_name", "base_model", "base_model_relation", "pipeline_tag")
"""Metadata this library sets on every push; every other key belongs to whoever edits the card."""

_TRANSFORMERS_TASKS = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "text2text-generation"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text-classification"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token-classification"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "question-answering"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "fill-mask"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image-classification"),
    ("AutoModelForZeroShotImageClassification", "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES",
     "zero-shot-image-classification"),
    ("AutoModel", "MODEL_MAPPING_NAMES", "feature-extraction"),
)
"""(auto class, transformers' class-name mapping, Hub pipeline tag), most specific first."""


def transformers_usage(class_name: str) -> tuple[str, str | None]:
    """The class a user loads ``class_name`` with (its AutoModelFor* class if one builds it) and its pipeline tag."""
    from transformers.models.auto import modeling_auto

    for auto_class, mapping, pipeline_tag in _TRANSFORMERS_TASKS:
        for names in getattr(modeling_auto, mapping, {}).values():
            if class_name in ((names,) if isinstance(names, str) else names):
                return auto_class, pipeline_tag
    return class_name, None


def build_card(
    config: "CheckpointConfig",
    name: str,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    metrics: dict[str, float] | None = None,
    license: str | None = None,
) -> ModelCard:
    """The card for a folder described by ``config``; ``name`` (repo id or folder) goes in the load snippets."""
    base = config.base_model
    architecture = base.get("name") or base.get("class")
    methods = sorted({plan.config.method for plan in config.plans})
    is_transformers = base["library"] == "transformers"
    loader, pipeline_tag = transformers_usage(base["class"]) if is_transformers else (None, None)
    data = ModelCardData(
        library_name="transformers" if is_transformers else "hf-freqcompress",
        tags=["hf-freqcompress", "compressed", "model-compression", base["library"], *methods],
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,
        pipeline_tag=pipeline_tag,
        license=license,
        datasets=datasets,
        metrics=sorted(metrics) if metrics else None,
    )
    sections = [
        f"# {name.rstrip('/').rpartition('/')[2]}",
        f"A `{architecture}` ({base['library']}) compressed with hf-freqcompress "
        f"({', '.join(methods)}); the checkpoint stores only the compressed numbers.",
        *(_report_section(plan.report) for plan in config.plans),
    ]
    if metrics:
        rows = "\n".join(f"| {key} | {value:.4g} |" for key, value in sorted(metrics.items()))
        sections.append(f"## Metrics\n\n| metric | value |\n|---|---|\n{rows}")
    sections.append(_usage_section(name, loader))
    body = "\n\n".join([BEGIN, *sections, END])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _report_section(report: Any) -> str:
    return (
        f"## {report.method} at budget {report.budget}\n\n"
        f"{report.dense_values:,} weights -> {report.stored_values:,} stored values "
        f"({report.ratio:.1f}x, {report.stored_bytes:,} bytes as {report.storage_dtype}, seed {report.seed}).\n\n"
        f"```text\n{report.table()}\n```"
    )


def _usage_section(name: str, transformers_class: str | None) -> str:
    ours = (
        "```python\nfrom hf_freqcompress import from_pretrained, materialize\n\n"
        f'model = from_pretrained("{name}")\n'
        "plain = materialize(model)  # optional: dense weights, a plain model for export\n```"
    )
    if transformers_class is None:
        return f"## Load\n\n{ours}"
    return (
        "## Load\n\nWith transformers (the import registers the `hf_freqcompress` quantizer; without it "
        "transformers skips the compression and the compressed layers come out randomly initialised):\n\n"
        f"```python\nimport hf_freqcompress\nfrom transformers import {transformers_class}\n\n"
        f'model = {transformers_class}.from_pretrained("{name}")\n```\n\n'
        f"Or with hf-freqcompress's own loader:\n\n{ours}"
    )


def merge_cards(existing: str, generated: ModelCard) -> ModelCard:
    """``generated`` merged into the README text ``existing`` (a card someone may have edited on the Hub).

    Metadata: the existing keys stay, this library's keys (:data:`OWNED_KEYS`)
    take the generated values, tags are the union. Body: the text between the
    markers is replaced by the generated one; a body without the markers is
    the user's own and is kept whole.
    """
    try:
        theirs = ModelCard(existing, ignore_metadata_errors=False)
    except (ValueError, yaml.YAMLError) as error:
        reason = " ".join(str(error).split())
        raise ValueError(
            f"the repo's README.md has invalid metadata ({reason}); fix it on the Hub or pass replace_card=True"
        ) from None
    ours = generated.data.to_dict()
    merged = {**ours, **theirs.data.to_dict()}
    merged.update({key: ours[key] for key in OWNED_KEYS if ours.get(key) is not None})
    merged["tags"] = list(dict.fromkeys([*(theirs.data.tags or []), *(ours.get("tags") or [])]))
    body = theirs.text
    if BEGIN in body and END in body:
        before, _, rest = body.partition(BEGIN)
        after = rest.partition(END)[2]
        generated_section = generated.text[generated.text.index(BEGIN):generated.text.index(END) + len(END)]
        body = before + generated_section + after
    return ModelCard(f"---\n{ModelCardData(**merged).to_yaml()}\n---\n{body}")


def infer_base_model(model: nn.Module) -> str | None:
    """The Hub id of the dense model ``model`` was compressed from, when the model knows it.

    ``build_model`` records where the weights came from; otherwise a
    transformers model's ``config._name_or_path`` counts when it is a Hub repo
    id (not a local path) and the model was not itself loaded compressed.
    """
    source = getattr(model, SOURCE_ATTRIBUTE, None)
    if source is not None:
        return source.get("weights")
    if getattr(getattr(model, "hf_quantizer", None), "loaded", False):
        return None
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(name, str) or not name or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def infer_license(model: nn.Module, base_model: str | None) -> str | None:
    """The base's license when it is known locally: timm's ``pretrained_cfg`` of the weights ``base_model`` names."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if base_model is not None and cfg.get("hf_hub_id") == base_model:
        return cfg.get("license")
    return None
