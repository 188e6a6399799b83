from __future__ import annotations

import gzip
import shutil

import pytest
import torch

from hf_freqcompress.data import find_mnist_root, image_folder_dataset, load_mnist, mnist_dataset

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.parametrize("split,counts", [("train", TRAIN_COUNTS), ("test", TEST_COUNTS)])
def test_full_mnist_matches_its_readme(split, counts):
    images, labels = load_mnist(split)
    assert images.shape == (sum(counts), 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == counts
    assert int(images.max()) == 255 and int(images.min()) == 0


def test_mnist_dataset_shapes_and_normalization():
    x, y = mnist_dataset("test").tensors
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1) < 0.1
    flat, _ = mnist_dataset("test", flatten=True, normalize=False).tensors
    assert flat.shape == (10000, 784) and float(flat.max()) == 1.0


def copy_mnist(target):
    target.mkdir(parents=True)
    for path in find_mnist_root().iterdir():
        shutil.copy(path, target / path.name)
    return target


def test_root_from_env_and_argument(tmp_path, monkeypatch):
    copy = copy_mnist(tmp_path / "mnist")
    assert find_mnist_root(copy) == copy
    monkeypatch.setenv("HF_FREQCOMPRESS_DATA", str(tmp_path))
    assert find_mnist_root() == copy
    monkeypatch.setenv("HF_FREQCOMPRESS_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_mnist_root()


def test_bad_split_and_corrupt_files(tmp_path):
    with pytest.raises(ValueError, match="valid splits"):
        load_mnist("validation")
    copy = copy_mnist(tmp_path / "mnist")
    labels = copy / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-100])
    with pytest.raises(ValueError, match="sha256"):
        load_mnist("test", root=copy)
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz is not a complete gzip"):
        load_mnist("test", root=copy, verify=False)
    labels.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x01\x02"))
    with pytest.raises(ValueError, match="holds 2 bytes, its header promises 5"):
        load_mnist("test", root=copy, verify=False)


def test_image_folder_with_timm_transforms(tmp_path):
    from PIL import Image

    for label, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 30), color).save(tmp_path / label / f"{i}.png")
    dataset = image_folder_dataset(tmp_path, image_size=32, train=False)
    image, label = dataset[3]
    assert image.shape == (3, 32, 32) and label == 1
    assert dataset.classes == ["cat", "dog"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder_dataset(tmp_path / "missing")
