#!/usr/bin/env bash
# pockengine on a CUDA GPU, on a machine where it is not installed and nothing can be downloaded: run from the
# repository root with a CUDA build of torch on the path. Prints the versions and the GPU, runs the CUDA tests
# (tests/test_cuda.py), then `python -m bench --workload mobilenetv2 --device cuda` (results in
# docs/benchmarks/cuda). With $OUT set, the test log, the results and the benchmark's worker logs are copied there.
#
# The MobileNetV2 weights and MNIST come from $POCKENGINE_CACHE (default: .devcache/, filled by scripts/devcache.sh).
# Extra arguments go to the benchmark (e.g. --scheme sparse,bias_only or --steps 5 when time is short).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export POCKENGINE_CACHE="${POCKENGINE_CACHE:-$PWD/.devcache}"
export HF_HUB_OFFLINE=1
PY="${PYTHON:-$(command -v python || command -v python3)}"
OUT="${OUT:-}"
[ -n "$OUT" ] && mkdir -p "$OUT"
start=$SECONDS
stamp() { echo "=== $1 (at $((SECONDS - start)) s)"; }

stamp "versions"
"$PY" - <<'PYEOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
for name in ("transformers", "peft", "numpy", "yaml", "safetensors", "matplotlib", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError:
        print(name, "MISSING")
PYEOF
nvidia-smi || echo "nvidia-smi not found"
ls -la "$POCKENGINE_CACHE"

stamp "CUDA tests"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee ${OUT:+"$OUT/pytest.log"}
tests=${PIPESTATUS[0]}

stamp "benchmark"
timeout 400 "$PY" -m bench --workload mobilenetv2 --device cuda "$@"
bench=$?

if [ -n "$OUT" ]; then
    cp -r docs/benchmarks/cuda "$OUT/results" 2>/dev/null
    cp -r .cache/bench/full-cuda/mobilenetv2/logs "$OUT/bench-logs" 2>/dev/null
fi
stamp "done: tests exit $tests, benchmark exit $bench"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
