#!/usr/bin/env bash
# Idempotent set-up of .venv-ort: ONNX Runtime on-device training for the benchmark's "ort" system.
# onnxruntime-training-cpu 1.19.2 (its last release) needs onnx==1.16.2 (newer onnx writes IR version 14, which it
# rejects) and imports torch in onnxruntime.training, so this environment is kept apart from .venv: the main venv
# exports the ONNX model, this one builds the training artifacts and runs the steps (bench/ort_worker.py).
# Re-running it does nothing once the pins below are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-ort
PINS="torch==2.13.0 onnxruntime-training-cpu==1.19.2 onnx==1.16.2 numpy==1.26.4 protobuf==4.25.8"
PY="$(command -v python3.11 || command -v python3)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo '*' > "$VENV/.gitignore"   # keep the environment out of git without touching the project's .gitignore
stamp="$VENV/.setup-$(echo "$PINS" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q torch==2.13.0      # the CPU wheel first, so nothing pulls a CUDA build
    "$VENV/bin/python" -m pip install -q $PINS
    "$VENV/bin/python" -c "import onnxruntime.training.api, onnxruntime.training.artifacts, onnx; assert onnx.__version__ == '1.16.2'"
    touch "$stamp"
fi
