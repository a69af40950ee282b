#!/usr/bin/env bash
# Fill .devcache/ (git-ignored) with what scripts/cuda_bench.sh reads on a GPU machine
# that has neither network nor the weight and data packages: the converted MobileNetV2 ImageNet weights and MNIST,
# written by the loaders themselves with POCKENGINE_CACHE pointing there. The .npz files are then written again
# compressed (np.load reads both kinds) as cache entries of their own, through pockengine.storage.cached_file, which
# records their checksums (an entry that does not match its checksum is rebuilt, which would need the network), so
# that the folder travels in about 25 MB instead of 70.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
mkdir -p .devcache
POCKENGINE_CACHE=.devcache PYTHONPATH=. "$PY" - <<'PYEOF'
from pathlib import Path

import numpy as np

from pockengine.data import load_mnist
from pockengine.models import mobilenet_v2
from pockengine.storage import cached_file

mobilenet_v2(pretrained=True)
load_mnist("train")
for path in Path(".devcache").glob("*.npz"):
    with np.load(path) as data:
        arrays = dict(data)

    def compressed(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    path.unlink()
    cached_file(path, compressed, f"compressed {path.name}")
PYEOF
du -sh .devcache
