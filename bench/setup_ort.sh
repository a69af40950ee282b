#!/usr/bin/env bash
# Idempotent set-up of .venv-ort: ONNX Runtime on-device training for the benchmark's "ort" system.
# onnxruntime-training-cpu 1.19.2 (its last release) needs onnx==1.16.2 (newer onnx writes IR version 14, which it
# rejects) and imports torch in onnxruntime.training, so this environment is kept apart from .venv: the main venv
# exports the ONNX model, this one builds the training artifacts and runs the steps (bench/ort_worker.py).
set -euo pipefail
exec bash "$(dirname "$0")/peer_venv.sh" .venv-ort \
    "torch==2.13.0 onnxruntime-training-cpu==1.19.2 onnx==1.16.2 numpy==1.26.4 protobuf==4.25.8" \
    "import onnxruntime.training.api, onnxruntime.training.artifacts, onnx; assert onnx.__version__ == '1.16.2'"
