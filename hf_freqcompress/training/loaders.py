"""Datasets and data loaders for a recipe's ``data`` section.

The datasets come from :mod:`hf_freqcompress.data`; this module only picks
one, trims it for quick runs and fixes the order. The training order is a
permutation seeded by (seed, epoch), not by a global RNG, so every process
of a distributed run draws the same permutation (accelerate then gives each
rank its own batches of it) and a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .recipe import DataSection

__all__ = ["EpochShuffleSampler", "build_dataset", "build_loaders", "calibration_batches", "unpack_batch"]


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch, a pure function of (seed, epoch).

    The epoch is chosen with :meth:`use_epoch`, deliberately not ``set_epoch``:
    accelerate's loaders call ``set_epoch`` with their own iteration counter,
    which restarts at 0 in a resumed process; the training loop owns the epoch.
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


def _limit(dataset: Dataset, limit: int | None) -> Dataset:
    if limit is None or limit >= len(dataset):  # type: ignore[arg-type]
        return dataset
    return Subset(dataset, range(limit))


def build_dataset(data: DataSection, split: str, train: bool, model: nn.Module | None = None) -> Dataset:
    """The ``split`` of the recipe's dataset, with timm's transforms for ``model`` where images are resized."""
    from .. import data as datasets

    if data.kind == "mnist":
        dataset = datasets.mnist_dataset(split, root=data.root)
    elif data.kind == "image_folder":
        dataset = datasets.image_folder_dataset(Path(data.root) / split, data.image_size, train=train, model=model)
    else:
        dataset = datasets.hf_image_dataset(
            data.root, split, data.image_size, model=model, image_column=data.image_column,
            label_column=data.label_column,
        )
    return _limit(dataset, data.limit_train if train else data.limit_eval)


def build_loaders(
    data: DataSection, seed: int, model: nn.Module | None = None
) -> tuple[DataLoader, DataLoader, EpochShuffleSampler]:
    """(train loader, eval loader, the train sampler whose ``use_epoch`` the loop calls).

    ``data.batch_size`` is per process: with N processes an optimizer step sees N x batch_size examples.
    """
    train_set = build_dataset(data, data.train_split, train=True, model=model)
    eval_set = build_dataset(data, data.eval_split, train=False, model=model)
    sampler = EpochShuffleSampler(len(train_set), seed)
    # A private generator: every new iterator draws a worker base seed from it, and drawing from the
    # global RNG instead would shift dropout's random stream when a resumed run re-creates an iterator.
    train_loader = DataLoader(
        train_set, batch_size=data.batch_size, sampler=sampler, num_workers=data.num_workers, drop_last=False,
        generator=torch.Generator().manual_seed(seed),
    )
    eval_loader = DataLoader(eval_set, batch_size=data.eval_batch_size, shuffle=False, num_workers=data.num_workers)
    return train_loader, eval_loader, sampler


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) from a (x, y) tuple or a ``{"pixel_values", "labels"}`` dict (HF datasets)."""
    if isinstance(batch, dict):
        return batch["pixel_values"], batch["labels"]
    return batch[0], batch[1]


def calibration_batches(
    data: DataSection, split: str, count: int, batch_size: int, seed: int, model: nn.Module | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of ``batch_size`` examples of ``split`` (evaluation transforms), a seeded random
    sample, for ``compress(calibration=...)``: the same batches in every process and run."""
    dataset = build_dataset(data, split, train=False, model=model)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(dataset), generator=generator)[: count * batch_size].tolist()
    loader = DataLoader(Subset(dataset, chosen), batch_size=batch_size, shuffle=False)
    return [unpack_batch(batch) for batch in loader]

