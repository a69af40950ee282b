#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch 2.13.0 (CPU) first, then everything else.
# Re-running it does nothing once the requirement files are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY="$(command -v python3.11 || command -v python3)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.pockengine-setup-$(cat requirements.txt requirements-nodeps.txt pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    "$VENV/bin/python" -m pip install -q -r requirements.txt
    "$VENV/bin/python" -m pip install -q --no-deps -r requirements-nodeps.txt
    "$VENV/bin/python" -m pip install -q --no-deps -e .
    "$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
    touch "$stamp"
fi
