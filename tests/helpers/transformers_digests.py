"""Load compressed checkpoints with transformers' Auto classes in this (fresh) process; print their logits' digests.

    python tests/helpers/transformers_digests.py INPUTS SPEC

INPUTS is a safetensors file of model inputs named ``<family>.<argument>``
(``gpt2.input_ids``); SPEC is a JSON file ``{label: [auto class, folder or
Hub repo id, family]}``. Imports hf_freqcompress first (what registers the
quantizer), then prints one JSON object ``{label: sha256 of the logits}``.
"""

from __future__ import annotations

import json
import sys

import torch
import transformers
from safetensors.torch import load_file

import hf_freqcompress  # noqa: F401  (registers the hf_freqcompress quantizer)
from logit_digests import tensor_digest


def model_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits a model family returns (CLIP's are per image)."""
    with torch.no_grad():
        out = model(**inputs)
    logits = getattr(out, "logits", None)
    return out.logits_per_image if logits is None else logits


def family_inputs(tensors: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    return {key.partition(".")[2]: value for key, value in tensors.items() if key.startswith(f"{family}.")}


def main() -> None:
    tensors = load_file(sys.argv[1])
    with open(sys.argv[2], encoding="utf-8") as file:
        spec = json.load(file)
    digests = {}
    for label, (auto_class, source, family) in spec.items():
        model = getattr(transformers, auto_class).from_pretrained(source)
        digests[label] = tensor_digest(model_logits(model, family_inputs(tensors, family)))
    print(json.dumps(digests))


if __name__ == "__main__":
    main()
