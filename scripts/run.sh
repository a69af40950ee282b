#!/usr/bin/env bash
# The main job on embedded defaults: fine-tune the real MobileNetV2 (ImageNet weights) on real MNIST digits (64x64,
# batch 8, 300 steps; 45,000 training and 1,000 of the 5,000 held-out images evaluated), twice: with the scheme that
# the contribution analysis and the search choose under a 4 MB step-memory budget (`--scheme auto --quick`; the
# analysis is cached, so only the first run pays for it), and fully; then both side by side.
# With arguments, they go to the `pockengine` command instead: `bash scripts/run.sh finetune --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -gt 0 ]; then
    exec .venv/bin/pockengine "$@"
fi
runs=runs/main
common=(--model mobilenet_v2 --data mnist --steps 300 --batch-size 8 --image-size 64 --max-eval-examples 1000
        --threads 2)
for scheme in auto full; do
    if [ -f "$runs/$scheme/summary.json" ]; then
        continue  # done before: delete runs/main to train again
    elif [ -f "$runs/$scheme/run.json" ]; then
        .venv/bin/pockengine finetune --out "$runs/$scheme" --resume  # interrupted before: continue it
    else
        extra=()
        [ "$scheme" = auto ] && extra=(--memory-budget 4MB --quick)
        .venv/bin/pockengine finetune "${common[@]}" --scheme "$scheme" "${extra[@]}" --out "$runs/$scheme"
    fi
done
.venv/bin/pockengine report "$runs/auto" "$runs/full"
