#!/usr/bin/env bash
# The whole test suite, as CI runs it: the library's tests (tests/) and the benchmark's (bench/tests/). Arguments go
# to pytest: `bash scripts/test.sh -m "not slow"` is the fast tier for local work (leaves out the tests marked slow:
# real models, the benchmark's smoke test, the large parity families, the install test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
