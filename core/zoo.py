"""Bundled real model and data: the CIFAR-10 ResNet-20 and 20 CIFAR-10 test images.

The weights (``assets/resnet20_cifar10``, BSD-2-Clause) and the images
(``assets/cifar10_samples``, MIT) ship with the package, with their licence notices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ASSETS = Path(__file__).resolve().parent / "assets"
RESNET20_WEIGHTS = ASSETS / "resnet20_cifar10" / "resnet20-12fca82f.th"
CIFAR10_SAMPLES = ASSETS / "cifar10_samples"
CIFAR10_MEAN = (0.485, 0.456, 0.406)
CIFAR10_STD = (0.229, 0.224, 0.225)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


class _OptionAShortcut(nn.Module):
    """Parameter-free shortcut: every second pixel, zero channels padded on both sides."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


class BasicBlock(nn.Module):
    """The CIFAR ResNet basic block with an "option A" shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = _OptionAShortcut(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # written like the authors' code: functional ReLU and an in-place residual add
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class CifarResNet(nn.Module):
    """CIFAR-10 ResNet (He et al. 2016, section 4.2) with ``3 * n`` blocks per stage."""

    def __init__(self, num_blocks: tuple[int, int, int] = (3, 3, 3), num_classes: int = 10):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], 1)
        self.layer2 = self._make_layer(32, num_blocks[1], 2)
        self.layer3 = self._make_layer(64, num_blocks[2], 2)
        self.linear = nn.Linear(64, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        out = out.view(out.size(0), -1)
        return self.linear(out)


def resnet20(pretrained: bool = True, weights: str | Path | None = None) -> CifarResNet:
    """Build the CIFAR-10 ResNet-20, by default with the bundled pretrained weights.

    Parameters
    ----------
    pretrained: bool
        Load the bundled weights (test error 8.27 %) when True.
    weights: str or Path, optional
        Another checkpoint in the same format (``{"state_dict": ...}``, ``module.`` prefixes
        allowed).

    Returns
    -------
    CifarResNet
        The model in eval mode. It expects inputs normalised with ``CIFAR10_MEAN`` and
        ``CIFAR10_STD``; it contains no normalisation itself.
    """
    model = CifarResNet((3, 3, 3))
    path = Path(weights) if weights is not None else (RESNET20_WEIGHTS if pretrained else None)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"ResNet-20 weights not found at {path}")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint.get("state_dict", checkpoint)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        model.load_state_dict(state)
    return model.eval()


def normalize_cifar(x: torch.Tensor) -> torch.Tensor:
    """Normalise images in [0, 1] with ``CIFAR10_MEAN`` / ``CIFAR10_STD``."""
    mean = torch.tensor(CIFAR10_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def cifar10_samples() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 20 CIFAR-10 test images, bundled as lossless PNGs.

    Returns
    -------
    tuple of torch.Tensor
        Images of shape (20, 3, 32, 32) with values in [0, 1] (not normalised) and their
        labels of shape (20,).
    """
    from PIL import Image

    files = sorted(CIFAR10_SAMPLES.glob("cifar10_*.png"))
    if not files:
        raise FileNotFoundError(f"no CIFAR-10 samples under {CIFAR10_SAMPLES}")
    images = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0 for f in files]
    labels = [int(f.stem.split("_")[-1]) for f in files]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.long)
