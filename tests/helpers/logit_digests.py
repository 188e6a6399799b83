"""Load checkpoint folders in this (fresh) process and print the SHA-256 of each one's logits.

    python tests/helpers/logit_digests.py SHAPE FOLDER [FOLDER ...]

SHAPE is the input shape as comma-separated ints; the input is
``torch.randn(shape, generator=manual_seed(1))``. Prints one JSON object
``{folder: sha256 hex of the float logits' bytes}``.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch

from hf_freqcompress import from_pretrained


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes: equal digests mean bit-identical values."""
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


def logit_digest(model: torch.nn.Module, x: torch.Tensor) -> str:
    """SHA-256 of the model's logits on ``x``: equal digests mean bit-identical outputs."""
    with torch.no_grad():
        out = model(x)
    return tensor_digest(getattr(out, "logits", out))


def fixed_input(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def main() -> None:
    shape = tuple(int(n) for n in sys.argv[1].split(","))
    x = fixed_input(shape)
    print(json.dumps({folder: logit_digest(from_pretrained(folder), x) for folder in sys.argv[2:]}))


if __name__ == "__main__":
    main()
