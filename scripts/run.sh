#!/usr/bin/env bash
# The main job on embedded defaults: fine-tune the real MobileNetV2 (ImageNet weights) on real MNIST images.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pockengine train "$@"
