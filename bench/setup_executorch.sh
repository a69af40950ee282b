#!/usr/bin/env bash
# Idempotent set-up of .venv-executorch: ExecuTorch on-device training for the benchmark's "executorch" system.
# ExecuTorch 1.5.1 brings its own torch requirements, so it gets its own environment, like ONNX Runtime training's
# (bench/setup_ort.sh). The child process bench/executorch_worker.py exports, lowers and runs the training program
# in this environment.
set -euo pipefail
exec bash "$(dirname "$0")/peer_venv.sh" .venv-executorch "torch==2.13.0 executorch==1.5.1" \
    "from executorch.extension.training import _load_for_executorch_for_training_from_buffer, get_sgd_optimizer; from torch.export.experimental import _export_forward_backward"
