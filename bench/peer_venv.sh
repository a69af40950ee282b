#!/usr/bin/env bash
# Idempotent set-up of a benchmark peer's own virtual environment (ONNX Runtime training, ExecuTorch): peers that
# pin their own torch or onnx are kept apart from .venv. Usage: peer_venv.sh VENV "PINS" "PYTHON CHECK".
# The CPU wheel of torch is installed first, so nothing pulls a CUDA build; re-running does nothing once the pins
# are unchanged (a stamp named by their hash).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$1" PINS="$2" CHECK="$3"
PY="$(command -v python3.11 || command -v python3)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo '*' > "$VENV/.gitignore"   # keep the environment out of git without touching the project's .gitignore
stamp="$VENV/.setup-$(echo "$PINS" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    "$VENV/bin/python" -m pip install -q $PINS
    "$VENV/bin/python" -c "$CHECK"
    touch "$stamp"
fi
