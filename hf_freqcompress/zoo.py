"""Small MNIST networks that build by name beside timm's models.

Recipes, tests and the README's first command train on MNIST on a laptop CPU,
so they need networks far smaller than anything timm ships. They follow timm's
conventions (``num_classes``, ``get_classifier()``, a ``pretrained_cfg``) and
are looked up by name before timm's registry (:data:`ZOO_MODELS`), so
``timm:mnist_mlp`` works in recipes and on the command line and
``save_pretrained`` / ``from_pretrained`` rebuild them through the same path
as a ResNet, without registering anything in timm's global registry.

- ``mnist_mlp``: LeNet-300-100 (784-300-100-10), the MLP of the HashedNets,
  FunHashNN and PQ papers' MNIST experiments (266k weights).
- ``mnist_lenet``: LeNet-5 as in Caffe (conv 20 5x5, conv 50 5x5, fc 500, fc
  10; 431k weights), for the convolutional methods (FreshNets, binary_stack).
- ``mnist_allconv``: convolutions only (5x5 and 3x3 kernels) and global
  average pooling before a small head: over 99% of the weights are in
  convolutions, the setting FreshNets was designed for.
- ``mnist_resnet``: a small residual network (basic blocks, batch norm,
  1x1 shortcut convolutions), the shape of most vision backbones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["MnistMLP", "MnistLeNet", "MnistAllConv", "MnistResNet", "MNIST_PRETRAINED_CFG", "ZOO_MODELS", "create_zoo_model"]

MNIST_PRETRAINED_CFG: dict[str, Any] = {
    "input_size": (1, 28, 28),
    "mean": (0.1307,),
    "std": (0.3081,),
    "num_classes": 10,
    "crop_pct": 1.0,
    "interpolation": "bilinear",
}
"""What timm's ``resolve_data_config`` reads: MNIST's size and the normalization data.py applies."""


class _MnistClassifier(nn.Module):
    """Shared timm conventions: ``num_classes``, ``num_features``, ``get_classifier()``, a ``pretrained_cfg``."""

    def __init__(self, architecture: str, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.pretrained_cfg = {**MNIST_PRETRAINED_CFG, "architecture": architecture, "num_classes": num_classes}
        self.head: nn.Linear

    @property
    def num_features(self) -> int:
        """Width of the features the head reads (timm's attribute; its Hub config records it)."""
        return self.head.in_features

    def get_classifier(self) -> nn.Module:
        return self.head


class MnistMLP(_MnistClassifier):
    """784-300-100-10 with ReLU; takes (N, 1, 28, 28) images (or anything with 784 values per row)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, hidden: tuple[int, ...] = (300, 100),
                 drop_rate: float = 0.0) -> None:
        super().__init__("mnist_mlp", num_classes, in_chans)
        widths = [in_chans * 28 * 28, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in zip(widths, widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU(), nn.Dropout(drop_rate)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MnistLeNet(_MnistClassifier):
    """LeNet-5 (Caffe variant): two 5x5 conv + max-pool stages, fc 500, fc ``num_classes``."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__("mnist_lenet", num_classes, in_chans)
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(50 * 4 * 4, 500), nn.ReLU(), nn.Dropout(drop_rate),
        )
        self.head = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MnistAllConv(_MnistClassifier):
    """conv 5x5/2 (32), conv 3x3 (64), max-pool, conv 5x5 (64), conv 3x3 (128), global average pool, fc."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__("mnist_allconv", num_classes, in_chans)
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 5, padding=2), nn.ReLU(),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(drop_rate),
        )
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus the (1x1-projected where shapes change) input, then relu."""

    def __init__(self, width_in: int, width_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width_out)
        self.conv2 = nn.Conv2d(width_out, width_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width_out)
        self.shortcut = nn.Identity()
        if stride != 1 or width_in != width_out:
            self.shortcut = nn.Sequential(nn.Conv2d(width_in, width_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(width_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.shortcut(x))


class MnistResNet(_MnistClassifier):
    """stem conv 3x3 (16), two stages of two basic blocks (32, then 64 at stride 2), global average pool, fc."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__("mnist_resnet", num_classes, in_chans)
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            _BasicBlock(16, 32, 1), _BasicBlock(32, 32, 1), _BasicBlock(32, 64, 2), _BasicBlock(64, 64, 1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(drop_rate),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ZOO_MODELS: dict[str, type[_MnistClassifier]] = {
    "mnist_mlp": MnistMLP,
    "mnist_lenet": MnistLeNet,
    "mnist_allconv": MnistAllConv,
    "mnist_resnet": MnistResNet,
}
"""Name -> class of the networks built here (checked before timm's registry)."""


def create_zoo_model(name: str, pretrained: bool = False, **kwargs: Any) -> _MnistClassifier:
    """Build zoo network ``name`` with ``kwargs``; these networks have no pretrained weights."""
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; build it with pretrained=False and train it")
    return ZOO_MODELS[name](**kwargs)
