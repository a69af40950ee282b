#!/usr/bin/env bash
# The numbers of docs/results.md: runs the main job (scripts/run.sh: MobileNetV2 -> MNIST, the scheme searched
# under 8 MB against full fine-tuning, 300 steps each, tested on MNIST's test split), then copies each run's small
# records (summary, settings, metrics log, the search's report and scheme file, the machine's load as each run
# started; never the checkpoint or the model) to docs/results/mobilenet_v2_mnist/ and writes the comparison that
# `pockengine report` makes to docs/results/mobilenet_v2_mnist/table.md, and the step times of both schemes measured
# in one process, steps alternating (scripts/step_times.py: a shared machine's load falls on both alike) to
# docs/results/mobilenet_v2_mnist/step_times.json.
# POCKENGINE="python -m pockengine" runs that command instead of .venv's, and PYTHON the python that runs
# scripts/step_times.py (see scripts/run.sh); RUNS the run folder; THREADS torch's threads (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
export RUNS=${RUNS:-runs/main}
bash scripts/run.sh
read -r -a pockengine <<< "${POCKENGINE:-.venv/bin/pockengine}"
out=docs/results/mobilenet_v2_mnist
for run in auto full; do
    mkdir -p "$out/$run"
    cp "$RUNS/$run"/{summary.json,run.json,metrics.jsonl} "$out/$run/"
    if [ -d "$RUNS/$run/search" ]; then
        cp "$RUNS/$run/search"/{report.md,scheme.yaml} "$out/$run/"
    fi
done
cp "$RUNS/load.txt" "$out/"
"${pockengine[@]}" report "$RUNS/auto" "$RUNS/full" | grep '^|' > "$out/table.md"
cat "$out/table.md"
${PYTHON:-.venv/bin/python} scripts/step_times.py "$RUNS/auto" "$RUNS/full" --steps 50 --out "$out/step_times.json"
