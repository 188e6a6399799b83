from __future__ import annotations

import gzip
import hashlib
import re
import sys
import types

import pytest
import torch

from hf_freqcompress import data
from hf_freqcompress.data import (
    MNIST_SHA256,
    find_mnist_root,
    hf_image_dataset,
    image_folder_dataset,
    load_mnist,
    mnist_dataset,
)

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
VENDORED = data._CHECKOUT_MNIST


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)


def linked_mnist(directory, skip=()):
    """A cheap MNIST directory: symlinks to the vendored files, except those in ``skip``."""
    directory.mkdir(parents=True)
    for name in MNIST_SHA256:
        if name not in skip:
            (directory / name).symlink_to(VENDORED / name)
    return directory


def test_vendored_files_match_readme_checksums():
    readme = (VENDORED / "README.md").read_text()
    assert dict((name, digest) for digest, name in re.findall(r"([0-9a-f]{64})\s+(\S+\.gz)", readme)) == MNIST_SHA256


@pytest.mark.parametrize("split,counts", [("train", TRAIN_COUNTS), ("test", TEST_COUNTS)])
def test_full_mnist_matches_its_readme(split, counts):
    images, labels = load_mnist(split)
    assert images.shape == (sum(counts), 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (sum(counts),) and labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == counts
    assert int(images.min()) == 0 and int(images.max()) == 255


def test_load_is_cached_and_returns_private_copies(tmp_path):
    root = linked_mnist(tmp_path / "mnist")
    images, labels = load_mnist("test", root=root)
    for path in root.iterdir():
        path.unlink()
        path.write_bytes(b"garbage")
    images[:] = 0
    again, labels_again = load_mnist("test", root=root)  # parsed once: the garbage is never read
    assert int(again.max()) == 255 and torch.equal(labels_again, labels)


def test_mnist_dataset_shapes_and_normalization():
    raw, _ = load_mnist("test")
    x, y = mnist_dataset("test").tensors
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = (raw[0].float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(x[0, 0], expected)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05
    flat, _ = mnist_dataset("test", flatten=True, normalize=False).tensors
    assert flat.shape == (10000, 784) and float(flat.min()) == 0.0 and float(flat.max()) == 1.0
    assert torch.equal(flat[0], raw[0].flatten().float() / 255)


def test_bad_split_names_the_valid_ones():
    with pytest.raises(ValueError, match="'validation'.*train, test"):
        load_mnist("validation")


def test_root_from_argument_env_and_cwd(tmp_path, monkeypatch):
    root = linked_mnist(tmp_path / "mnist")
    assert find_mnist_root(root) == root
    assert find_mnist_root(str(root)) == root
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))  # a parent holding mnist/
    assert find_mnist_root() == root
    monkeypatch.setenv(data.ENV_VAR, str(root))  # the MNIST directory itself
    assert find_mnist_root() == root
    monkeypatch.delenv(data.ENV_VAR)
    monkeypatch.chdir(tmp_path)
    assert find_mnist_root() == VENDORED  # no ./data/mnist: the source checkout
    cwd_root = linked_mnist(tmp_path / "data" / "mnist")
    assert find_mnist_root() == cwd_root


def test_missing_root_errors_list_what_was_tried_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"nowhere \(no such directory\).*pass root="):
        find_mnist_root(tmp_path / "nowhere")
    partial = linked_mnist(tmp_path / "partial", skip={"t10k-labels-idx1-ubyte.gz"})
    with pytest.raises(FileNotFoundError, match=r"partial \(missing t10k-labels-idx1-ubyte.gz\)"):
        find_mnist_root(partial)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "unset"))  # set but wrong: an error, not a fallback
    with pytest.raises(FileNotFoundError, match=r"unset/mnist \(no such directory\); .*unset \(no such"):
        find_mnist_root()
    monkeypatch.delenv(data.ENV_VAR)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "_CHECKOUT_MNIST", tmp_path / "checkout")
    with pytest.raises(FileNotFoundError) as error:
        find_mnist_root()
    assert str(tmp_path / "data" / "mnist") in str(error.value) and str(tmp_path / "checkout") in str(error.value)
    assert data.ENV_VAR in str(error.value)


def idx(magic: int, *dims: int, payload: bytes) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return gzip.compress(header + payload)


TRUNCATED_GZIP = (VENDORED / "t10k-labels-idx1-ubyte.gz").read_bytes()[:-100]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("t10k-labels-idx1-ubyte.gz", TRUNCATED_GZIP, "is not a complete gzip file"),
        ("t10k-labels-idx1-ubyte.gz", b"not gzip at all", "is not a complete gzip file"),
        ("t10k-labels-idx1-ubyte.gz", gzip.compress(b"\x00\x00\x08"), "is truncated"),
        ("t10k-images-idx3-ubyte.gz", idx(0x801, 4, payload=bytes(4)), "magic number 0x00000801, expected 0x00000803"),
        ("t10k-images-idx3-ubyte.gz", idx(0x803, 1, 27, 27, payload=bytes(729)), r"\(27, 27\), expected \(28, 28\)"),
        ("t10k-labels-idx1-ubyte.gz", idx(0x801, 5, payload=b"\x01\x02"), "holds 2 data bytes, its header promises 5"),
        ("t10k-labels-idx1-ubyte.gz", idx(0x801, 10000, payload=bytes(9999) + b"\x0c"), "label 12"),
    ],
    ids=["truncated-gzip", "not-gzip", "short-header", "wrong-magic", "wrong-dims", "short-payload", "bad-label"],
)
def test_corrupt_files_give_errors_naming_the_file(tmp_path, name, content, message):
    root = linked_mnist(tmp_path / "mnist", skip={name})
    (root / name).write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(root / name)) + ".*" + message):
        load_mnist("test", root=root, verify=False)


def test_checksum_mismatch_names_file_expected_and_actual(tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    root = linked_mnist(tmp_path / "mnist", skip={name})
    content = gzip.compress((VENDORED / name).read_bytes())
    (root / name).write_bytes(content)
    actual = hashlib.sha256(content).hexdigest()
    with pytest.raises(ValueError, match=f"{re.escape(str(root / name))}: sha256 {actual} .* {MNIST_SHA256[name]}"):
        load_mnist("test", root=root)


@pytest.fixture
def tiny_image_folder(tmp_path):
    from PIL import Image

    for label, color in (("cat", (255, 255, 255)), ("dog", (0, 0, 0))):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 30), color).save(tmp_path / label / f"{i}.png")
    return tmp_path


def test_image_folder_default_transforms(tiny_image_folder):
    dataset = image_folder_dataset(tiny_image_folder, image_size=32, train=False)
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 4
    items = [dataset[i] for i in range(4)]
    assert [label for _, label in items] == [0, 0, 1, 1]
    assert all(image.shape == (3, 32, 32) and image.dtype == torch.float32 for image, _ in items)
    white = torch.tensor([(1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    assert torch.allclose(items[0][0], white.view(3, 1, 1).expand(3, 32, 32), atol=1e-4)  # ImageNet mean/std
    train_image, _ = image_folder_dataset(tiny_image_folder, image_size=24, train=True)[2]
    assert train_image.shape == (3, 24, 24)


def test_image_folder_uses_the_timm_models_config(tiny_image_folder):
    import timm

    model = timm.create_model("test_vit", pretrained=False)  # its config normalizes with mean = std = 0.5
    image, label = image_folder_dataset(tiny_image_folder, image_size=16, train=False, model=model)[0]
    assert image.shape == (3, 16, 16) and label == 0
    assert torch.allclose(image, torch.ones(3, 16, 16), atol=1e-4)


def test_image_folder_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing")) + " does not exist"):
        image_folder_dataset(tmp_path / "missing")


def test_hf_image_dataset_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match=re.escape("pip install 'hf-freqcompress[datasets]'")):
        hf_image_dataset("some/dataset", split="train")


class FakeSplit:
    """The two members of a `datasets.Dataset` that hf_image_dataset relies on."""

    def __init__(self, batch):
        self.batch, self.column_names, self.transform = batch, list(batch), None

    def set_transform(self, transform):
        self.transform = transform


def test_hf_image_dataset_applies_timm_transforms_lazily(monkeypatch):
    from PIL import Image

    loaded = FakeSplit({"img": [Image.new("L", (20, 20), 255)], "y": [3]})
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda name, split: loaded))
    dataset = hf_image_dataset("local/dir", split="validation", image_size=8, image_column="img", label_column="y")
    assert dataset is loaded and dataset.transform is not None
    out = dataset.transform(loaded.batch)
    assert out["labels"] == [3] and out["pixel_values"][0].shape == (3, 8, 8)  # grayscale converted to RGB
    with pytest.raises(ValueError, match=r"no column 'image'.*\['img', 'y'\]"):
        hf_image_dataset("local/dir", split="validation")
