#!/usr/bin/env bash
# The main job on embedded defaults: fine-tune the real MobileNetV2 (ImageNet weights) on real MNIST digits (64x64,
# batch 8, 300 steps; of MNIST's 50,000 training images 5,000 are the validation split, of which 1,000 are evaluated,
# and 45,000 train; MNIST's 10,000 test images are the test split), twice: with the scheme that the contribution
# analysis and the search choose under an 8 MB step-memory budget (`--scheme auto --quick`, its learning rate tuned
# on the validation split; the analysis is cached, so only the first run pays for it), and fully; then both side by
# side on the test split. Full fine-tuning plans 53.65 MB per step: 8 MB is 6.7x less (10.7 MB would be 5x).
# With arguments, they go to the `pockengine` command instead: `bash scripts/run.sh finetune --help`.
# POCKENGINE="python -m pockengine" (any command) skips the set-up of .venv and runs that instead; THREADS=N sets
# torch threads (default 2; 1 on a machine whose cores other jobs share: two threads per job then wait on each other).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${POCKENGINE:-}" ]; then
    bash scripts/setup.sh
    POCKENGINE=.venv/bin/pockengine
fi
read -r -a pockengine <<< "$POCKENGINE"
if [ $# -gt 0 ]; then
    exec "${pockengine[@]}" "$@"
fi
runs=${RUNS:-runs/main}
common=(--model mobilenet_v2 --data mnist --steps 300 --batch-size 8 --image-size 64 --test-data mnist-test
        --max-eval-examples 1000 --threads "${THREADS:-2}")
for scheme in auto full; do
    if [ -f "$runs/$scheme/summary.json" ]; then
        continue  # done before: delete the run folder to train again
    elif [ -f "$runs/$scheme/run.json" ]; then
        "${pockengine[@]}" finetune --out "$runs/$scheme" --resume  # interrupted before: continue it
    else
        extra=()
        [ "$scheme" = auto ] && extra=(--memory-budget 8MB --quick)
        mkdir -p "$runs"
        echo "$scheme: $(uptime)" >> "$runs/load.txt"  # the machine's load as the run starts (step times vary)
        "${pockengine[@]}" finetune "${common[@]}" --scheme "$scheme" "${extra[@]}" --out "$runs/$scheme"
    fi
done
"${pockengine[@]}" report "$runs/auto" "$runs/full"
