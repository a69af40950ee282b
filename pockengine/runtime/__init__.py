"""Runtimes that train with an exported pockengine step without PyTorch (pockengine.runtime.onnx: onnxruntime).

Nothing here imports torch or pockengine's compiler: a device needs only numpy, onnxruntime and safetensors."""

from __future__ import annotations

import os
from pathlib import Path

METADATA_KEY = "pockengine"  # the exported model's metadata entry: what each input is (JSON)
FROZEN_PREFIX = "frozen:"  # in the init file: the full tensor of a partially trained parameter


def init_path(model_path: str | os.PathLike) -> Path:
    """Where the initial values of an exported model's carried inputs lie: `<model>.init.safetensors`."""
    path = Path(model_path)
    return path.with_name(path.stem + ".init.safetensors")
