"""Datasets that work without a network: vendored MNIST, ImageFolder, HF datasets.

The machines this library is tested on reach package registries only, so the
full MNIST (IDX gzip, 11 MB) is vendored under ``data/mnist`` and parsed here
with the standard library: no torchvision download path, no surprise
network access. ImageFolder and Hugging Face ``datasets`` use timm's
transforms when a timm model is given, so the preprocessing matches the model.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "MNIST_SHA256",
    "find_mnist_root",
    "load_mnist",
    "mnist_dataset",
    "image_folder_dataset",
    "hf_image_dataset",
]

MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "db8f937d487057fb14a9f0fbe97f0bc8d311ab41b750d41e1ff37c43b9e55e19",
    "train-labels-idx1-ubyte.gz": "51fc562b6747b666fbf6e84ce29d43c3cb5f9c388c664d43b33f02095313405a",
    "t10k-images-idx3-ubyte.gz": "cfeddb84311ecf044fc6a5b0f6ee8a24d265d4e83e388400186eb114082f4209",
    "t10k-labels-idx1-ubyte.gz": "e41c74e484045d39b462a7790a4af51301bd9b0b24f0154798d713ec68c45920",
}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_MEAN, _STD = 0.1307, 0.3081
_ENV = "HF_FREQCOMPRESS_DATA"


def find_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """Where the MNIST IDX files are: ``root``, $HF_FREQCOMPRESS_DATA, ./data/mnist, or the source checkout."""
    candidates: list[Path] = []
    if root is not None:
        candidates.append(Path(root))
    elif os.environ.get(_ENV):
        base = Path(os.environ[_ENV])
        candidates += [base / "mnist", base]
    else:
        candidates += [Path.cwd() / "data" / "mnist", Path(__file__).resolve().parents[1] / "data" / "mnist"]
    for candidate in candidates:
        if (candidate / "train-images-idx3-ubyte.gz").is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"MNIST IDX files not found (tried: {tried}); pass root=<dir with train-images-idx3-ubyte.gz>, "
        f"set {_ENV}, or run from a clone of the repository, which vendors data/mnist"
    )


def _read_idx(path: Path, verify: bool) -> np.ndarray:
    """Parse one gzip IDX file (magic 0x0803 images / 0x0801 labels), checking size and checksum."""
    if not path.is_file():
        raise FileNotFoundError(f"missing MNIST file {path}")
    raw = path.read_bytes()
    if verify:
        actual = hashlib.sha256(raw).hexdigest()
        expected = MNIST_SHA256[path.name]
        if actual != expected:
            raise ValueError(f"{path} has sha256 {actual}, expected {expected}: the file is corrupt, re-copy it")
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError) as error:
        raise ValueError(f"{path} is not a complete gzip file ({error}); re-copy it") from None
    if len(data) < 8:
        raise ValueError(f"{path} is truncated: {len(data)} bytes of IDX data")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise ValueError(f"{path} is not a uint8 IDX file (magic bytes {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = data[4 + 4 * ndim :]
    if len(payload) != int(np.prod(shape)):
        raise ValueError(f"{path} holds {len(payload)} bytes, its header promises {int(np.prod(shape))}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


@functools.lru_cache(maxsize=4)
def _load_cached(split: str, root: Path, verify: bool) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = _SPLIT_PREFIX[split]
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", verify)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", verify)
    if len(images) != len(labels):
        raise ValueError(f"MNIST {split} in {root}: {len(images)} images but {len(labels)} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_mnist(
    split: str = "train", root: str | os.PathLike | None = None, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 28, 28) and int64 labels (N,) of the full MNIST split, parsed once per process."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"unknown MNIST split {split!r}; valid splits: {sorted(_SPLIT_PREFIX)}")
    images, labels = _load_cached(split, find_mnist_root(root).resolve(), verify)
    return images.clone(), labels.clone()


def mnist_dataset(
    split: str = "train", root: str | os.PathLike | None = None, flatten: bool = False, normalize: bool = True
) -> TensorDataset:
    """Float32 MNIST as (N, 1, 28, 28), or (N, 784) with ``flatten``, standardized by default."""
    images, labels = load_mnist(split, root)
    x = images.float().div_(255.0)
    if normalize:
        x = (x - _MEAN) / _STD
    x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
    return TensorDataset(x, labels)


def _image_transform(image_size: int, train: bool, model: torch.nn.Module | None):
    from timm.data import create_transform, resolve_data_config

    if model is not None:
        config = resolve_data_config({"input_size": (3, image_size, image_size)}, model=model)
    else:
        config = {"input_size": (3, image_size, image_size)}
    return create_transform(**config, is_training=train)


def image_folder_dataset(
    root: str | os.PathLike, image_size: int = 224, train: bool = True, model: torch.nn.Module | None = None
):
    """torchvision ImageFolder with timm's train/eval transforms (the model's mean/std when given)."""
    from torchvision.datasets import ImageFolder

    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder {path} does not exist; expected <root>/<class>/<image> files")
    return ImageFolder(str(path), transform=_image_transform(image_size, train, model))


def hf_image_dataset(
    name_or_path: str,
    split: str,
    image_size: int = 224,
    model: torch.nn.Module | None = None,
    image_column: str = "image",
    label_column: str = "label",
):
    """A Hugging Face ``datasets`` image dataset yielding (tensor, label) with timm's transforms."""
    try:
        import datasets
    except ImportError:
        raise ImportError("Hugging Face datasets is not installed: pip install 'hf-freqcompress[datasets]'") from None
    dataset = datasets.load_dataset(name_or_path, split=split)
    for column in (image_column, label_column):
        if column not in dataset.column_names:
            raise ValueError(f"dataset {name_or_path!r} has no column {column!r}; columns: {dataset.column_names}")
    transform = _image_transform(image_size, split == "train", model)

    def apply(batch):
        return {
            "pixel_values": [transform(image.convert("RGB")) for image in batch[image_column]],
            "labels": batch[label_column],
        }

    dataset.set_transform(apply)
    return dataset
