#!/usr/bin/env bash
# Idempotent set-up of .venv-executorch: ExecuTorch on-device training for the benchmark's "executorch" system.
# ExecuTorch 1.5.1 brings its own torch requirements, so it gets its own environment, like ONNX Runtime training's
# (bench/setup_ort.sh): the CPU wheel of torch first (so nothing pulls a CUDA build), then executorch. The child
# process bench/executorch_worker.py exports, lowers and runs the training program in this environment.
# Re-running it does nothing once the pins below are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-executorch
PINS="torch==2.13.0 executorch==1.5.1"
PY="$(command -v python3.11 || command -v python3)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo '*' > "$VENV/.gitignore"   # keep the environment out of git without touching the project's .gitignore
stamp="$VENV/.setup-$(echo "$PINS" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q torch==2.13.0      # the CPU wheel first, so nothing pulls a CUDA build
    "$VENV/bin/python" -m pip install -q $PINS
    "$VENV/bin/python" -c "from executorch.extension.training import _load_for_executorch_for_training_from_buffer, get_sgd_optimizer; from torch.export.experimental import _export_forward_backward"
    touch "$stamp"
fi
