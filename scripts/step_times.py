"""Step times of finished runs' schemes measured in one process, steps alternating between them, so that the load
of a shared machine falls on each alike (runs measured one after the other see different loads):

    python scripts/step_times.py runs/main/auto runs/main/full [--steps 30] [--out times.json]

Each run's scheme (`--scheme auto`: the one its search chose, RUN/search/scheme.yaml) is compiled on the first
run's model and data at the run's learning rate; the first 3 steps of each are not timed. Prints the median step
time of each, each divided by the first's, and the load average before and after; then each scheme's step memory:
the compiler's planned peak and the peak measured by the live-storage tracker on one more step (tensors above the
weights, the batch and the optimizer state), each plus the optimizer state, as the search counts a budget.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

import pockengine as pe
from pockengine.capture import normalize_batch
from pockengine.memory.tracker import LiveStorageTracker
from pockengine.finetune import RUN_FILE, SEARCH_DIR, SUMMARY_FILE, FinetuneConfig, parse_scheme, prepare

WARMUP = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each run's scheme (default 30)")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args()
    configs = [FinetuneConfig.from_dict(json.loads((run / RUN_FILE).read_text())["config"]) for run in args.runs]
    first = configs[0]
    for run, config in zip(args.runs, configs):
        same = ("model", "data", "batch_size", "image_size", "seq_len", "seed")
        if any(getattr(config, key) != getattr(first, key) for key in same):
            raise SystemExit(f"{run}: not the same model, data and batch shape as {args.runs[0]} ({', '.join(same)})")
    if first.threads:
        torch.set_num_threads(first.threads)
    task = prepare(first).task
    trainers = []
    for run, config in zip(args.runs, configs):
        scheme = (pe.Scheme.from_file(run / SEARCH_DIR / "scheme.yaml") if config.scheme == "auto"
                  else parse_scheme(config.scheme))
        lr = json.loads((run / SUMMARY_FILE).read_text())["lr"]
        trainers.append(pe.compile(task.build_model(), task.loss_fn, task.example_batch, pe.optim.AdamW(lr=lr),
                                   scheme, freeze_batchnorm=True, seed=config.seed))
    load_before = os.getloadavg()
    times: list[list[float]] = [[] for _ in trainers]
    batches = task.train_batches(first.seed)
    for step in range(WARMUP + args.steps):
        batch = next(batches)
        for trainer, measured in zip(trainers, times):
            start = time.perf_counter()
            trainer.step(batch)
            if step >= WARMUP:
                measured.append(time.perf_counter() - start)
    medians = [statistics.median(t) * 1e3 for t in times]
    planned, tracked = [], []
    batch = next(batches)
    for trainer in trainers:
        state = [t for s in trainer.state.values() for t in s.values()]
        tracker = LiveStorageTracker()
        tracker.ignore(*trainer.model.parameters(), *trainer.model.buffers(), *state,
                       *(t for t in pytree.tree_leaves(normalize_batch(batch)) if isinstance(t, torch.Tensor)))
        with tracker:
            trainer.step(batch)
        planned.append(trainer.memory_plan().peak_bytes + trainer.optimizer_state_bytes())
        tracked.append(tracker.peak_bytes + trainer.optimizer_state_bytes())
    result = {"runs": [str(run) for run in args.runs], "median_step_ms": medians,
              "step_memory_planned_bytes": planned, "step_memory_tracked_bytes": tracked,
              "ratio_to_first": [m / medians[0] for m in medians], "timed_steps": args.steps,
              "load_before": load_before, "load_after": os.getloadavg(), "threads": torch.get_num_threads()}
    for run, m, plan, track in zip(args.runs, medians, planned, tracked):
        print(f"{run}: {m:.1f} ms per step (median of {args.steps}), {m / medians[0]:.2f}x the first; step memory "
              f"{plan / 2 ** 20:.2f} MB planned, {track / 2 ** 20:.2f} MB tracked")
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}; {torch.get_num_threads()} threads")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
