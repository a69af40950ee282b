#!/usr/bin/env bash
# The whole test suite, as CI runs it: the library's tests (tests/) and the benchmark's (bench/tests/), on one
# pytest-xdist worker per core (at most 8; POCKENGINE_TEST_WORKERS overrides, 0 runs in this process). Arguments go
# to pytest: `bash scripts/test.sh -m "not slow"` is the fast tier for local work (leaves out the tests marked slow:
# real models, the benchmark's smoke test, the large parity families, the install test).
# `--dist loadgroup` keeps the tests of one `xdist_group` (those sharing an expensive fixture or cached run) on one
# worker, so that it is built once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cores="$(nproc)"
workers="${POCKENGINE_TEST_WORKERS:-$(( cores < 8 ? cores : 8 ))}"
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadgroup "$@"
