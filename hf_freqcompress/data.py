"""Datasets that work without a network: vendored MNIST, ImageFolder, HF datasets.

The machines this library is tested on reach package registries only, so the
full MNIST (IDX gzip, 11 MB) is vendored under ``data/mnist`` and parsed here
with the standard library and numpy: no torchvision download path, no
surprise network access, and the checksums pin the exact bytes the published
accuracies were measured on. ImageFolder and Hugging Face ``datasets`` use
timm's transforms, with the model's own mean/std/crop when a timm model is
given, so preprocessing matches what the model was built for.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch.utils.data import TensorDataset

if TYPE_CHECKING:
    import datasets
    from torchvision.datasets import ImageFolder

__all__ = [
    "MNIST_SHA256",
    "MNIST_MEAN",
    "MNIST_STD",
    "find_mnist_root",
    "load_mnist",
    "mnist_dataset",
    "image_folder_dataset",
    "hf_image_dataset",
]

# From data/mnist/README.md; the same files torchvision and most loaders expect.
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "db8f937d487057fb14a9f0fbe97f0bc8d311ab41b750d41e1ff37c43b9e55e19",
    "train-labels-idx1-ubyte.gz": "51fc562b6747b666fbf6e84ce29d43c3cb5f9c388c664d43b33f02095313405a",
    "t10k-images-idx3-ubyte.gz": "cfeddb84311ecf044fc6a5b0f6ee8a24d265d4e83e388400186eb114082f4209",
    "t10k-labels-idx1-ubyte.gz": "e41c74e484045d39b462a7790a4af51301bd9b0b24f0154798d713ec68c45920",
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the standard training-set pixel statistics

ENV_VAR = "HF_FREQCOMPRESS_DATA"
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_CHECKOUT_MNIST = Path(__file__).resolve().parents[1] / "data" / "mnist"
# IDX magic = 0x0000, type code 0x08 (uint8), number of dims; trailing dims every file must have.
_IMAGES = (0x00000803, (28, 28))
_LABELS = (0x00000801, ())


def _missing_files(directory: Path) -> list[str]:
    return [name for name in MNIST_SHA256 if not (directory / name).is_file()]


def find_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """The directory holding the four MNIST IDX files.

    Looked up in order: ``root``; ``$HF_FREQCOMPRESS_DATA`` (a directory that
    contains ``mnist/`` or is the MNIST directory itself); ``./data/mnist``
    under the working directory; the ``data/mnist`` of the source checkout the
    package was imported from (an editable install). An explicit ``root`` or a
    set environment variable is authoritative: if it is wrong that is an
    error, not a silent fallback to another copy the user did not ask for.
    """
    if root is not None:
        candidates = [Path(root)]
    elif os.environ.get(ENV_VAR):
        base = Path(os.environ[ENV_VAR])
        candidates = [base / "mnist", base]
    else:
        candidates = [Path.cwd() / "data" / "mnist", _CHECKOUT_MNIST]
    tried = []
    for candidate in candidates:
        if not candidate.is_dir():
            tried.append(f"{candidate} (no such directory)")
        elif missing := _missing_files(candidate):
            tried.append(f"{candidate} (missing {', '.join(missing)})")
        else:
            return candidate
    raise FileNotFoundError(
        "MNIST IDX files not found; tried: " + "; ".join(tried) + ". Fix: pass root=<directory with the four "
        f"*-ubyte.gz files>, set {ENV_VAR} to it (or to its parent holding mnist/), or run from a clone of "
        "the repository, which vendors data/mnist."
    )


def _read_idx(path: Path, kind: tuple[int, tuple[int, ...]], verify: bool) -> np.ndarray:
    """Parse one gzip IDX file, refusing anything whose checksum, header or length is off.

    The checks exist because a half-copied file otherwise surfaces much later
    as a shape error or a mysteriously low accuracy, far from its cause.
    """
    magic, trailing_dims = kind
    raw = path.read_bytes()
    if verify:
        actual, expected = hashlib.sha256(raw).hexdigest(), MNIST_SHA256[path.name]
        if actual != expected:
            raise ValueError(
                f"{path}: sha256 {actual} does not match the expected {expected}; the file is corrupt or not "
                "the original MNIST, re-copy it from the repository's data/mnist (or pass verify=False)"
            )
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path} is not a complete gzip file ({error}); re-copy it") from None
    ndim = len(trailing_dims) + 1
    header_size = 4 + 4 * ndim
    found_magic = int.from_bytes(data[:4], "big")
    if len(data) >= 4 and found_magic != magic:
        raise ValueError(f"{path} has IDX magic number {found_magic:#010x}, expected {magic:#010x}; wrong file?")
    if len(data) < header_size:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, shorter than its {header_size}-byte IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    if shape[1:] != trailing_dims:
        raise ValueError(f"{path} holds items of shape {shape[1:]}, expected {trailing_dims}")
    payload = memoryview(data)[header_size:]
    expected_bytes = int(np.prod(shape))
    if len(payload) != expected_bytes:
        raise ValueError(f"{path} holds {len(payload)} data bytes, its header promises {expected_bytes}; re-copy it")
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


@functools.lru_cache(maxsize=4)
def _load_cached(split: str, root: Path, verify: bool) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = _SPLIT_PREFIX[split]
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", _IMAGES, verify)
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    labels = _read_idx(labels_path, _LABELS, verify)
    if len(images) != len(labels):
        raise ValueError(f"MNIST {split} split in {root}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path} holds label {labels.max()}, MNIST labels are 0-9; re-copy it")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_mnist(
    split: str = "train", root: str | os.PathLike | None = None, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 28, 28) and int64 labels (N,) of a full MNIST split.

    Files are parsed (and checksummed) once per process and directory, since
    benchmarks load the same split many times; each call returns fresh copies
    so a caller that edits its tensors in place cannot corrupt later calls.
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"unknown MNIST split {split!r}; valid splits: {', '.join(_SPLIT_PREFIX)}")
    images, labels = _load_cached(split, find_mnist_root(root).resolve(), verify)
    return images.clone(), labels.clone()


def mnist_dataset(
    split: str = "train", root: str | os.PathLike | None = None, flatten: bool = False, normalize: bool = True
) -> TensorDataset:
    """Float32 MNIST in [0, 1] as (N, 1, 28, 28), or (N, 784) for MLPs when ``flatten``.

    ``normalize`` standardizes with the usual MNIST mean/std, as the papers'
    baselines do, so results are comparable with theirs.
    """
    images, labels = load_mnist(split, root)
    x = images.float().div_(255.0)
    if normalize:
        x = x.sub_(MNIST_MEAN).div_(MNIST_STD)
    x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
    return TensorDataset(x, labels)


def _image_transform(image_size: int, train: bool, model: torch.nn.Module | None) -> Callable:
    """timm's train or eval pipeline at ``image_size``; mean/std/crop/interpolation from a timm model's config.

    Without a model (or for a non-timm one) timm falls back to ImageNet
    mean/std, its default crop and bicubic resizing.
    """
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({"input_size": (3, image_size, image_size)}, model=model)
    return create_transform(**config, is_training=train)


def image_folder_dataset(
    root: str | os.PathLike, image_size: int = 224, train: bool = True, model: torch.nn.Module | None = None
) -> ImageFolder:
    """A torchvision ImageFolder (``root/<class>/<image>``) yielding (float tensor (3, size, size), class index).

    ``train`` picks timm's augmenting pipeline (random resized crop, flip,
    color jitter) instead of resize + center crop.
    """
    from torchvision.datasets import ImageFolder

    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(
            f"image folder {path} does not exist; pass a directory laid out as <root>/<class name>/<image file>"
        )
    return ImageFolder(str(path), transform=_image_transform(image_size, train, model))


def hf_image_dataset(
    name_or_path: str,
    split: str,
    image_size: int = 224,
    model: torch.nn.Module | None = None,
    image_column: str = "image",
    label_column: str = "label",
) -> datasets.Dataset:
    """A Hugging Face ``datasets`` image split whose items are ``{"pixel_values", "labels"}``.

    The keys follow the transformers convention so the same dataset feeds a
    transformers model or our loop. Transforms are applied lazily with
    ``set_transform`` (nothing is decoded up front); ``split == "train"``
    gets timm's augmenting pipeline. ``datasets`` is an optional dependency.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "hf_image_dataset needs the Hugging Face `datasets` library: pip install 'hf-freqcompress[datasets]'"
        ) from None
    dataset = datasets.load_dataset(name_or_path, split=split)
    for column in (image_column, label_column):
        if column not in dataset.column_names:
            raise ValueError(
                f"dataset {name_or_path!r} ({split}) has no column {column!r}; its columns are "
                f"{dataset.column_names}: pass image_column=/label_column="
            )
    transform = _image_transform(image_size, split == "train", model)

    def apply(batch: dict[str, list]) -> dict[str, list]:
        return {
            "pixel_values": [transform(image.convert("RGB")) for image in batch[image_column]],
            "labels": batch[label_column],
        }

    dataset.set_transform(apply)
    return dataset
