"""pockengine's step with and without the `recompute` pass, in one process, steps alternating between the two:

    python -m bench.recompute [--workload smollm2] [--scheme sparse] [--steps 10] [--threads 2] [--out FILE.json]

Both trainers are compiled from the same model, scheme, optimizer and batches as the benchmark's `pockengine`
system (bench/systems.py), in one process, so that they run the same attention kernels (chosen by timing, cached in
the process). Reports, for each: the planned step peak and what it keeps for the backward pass (the memory plan),
the peak of live tensor storage measured during one step (the benchmark's *step tracked*), the median step time
(wall and CPU seconds of the process) over `--steps` steps after 2 warm-up steps, the order alternating every
step, with the median of the per-step ratios, and the first loss (equal: the pass changes no value). Run from the repository root; results in
docs/recompute.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import pockengine as pe
from bench import workloads as W
from bench.systems import MOMENTUM
from pockengine.memory.tracker import LiveStorageTracker

MB = 2 ** 20
WARMUP = 2
CONFIGS = {"recompute on": frozenset(), "recompute off": frozenset({"recompute"})}


def _tracked_peak(trainer: pe.Trainer, batch: Any) -> int:
    inputs, target = batch
    state = [t for s in trainer.state.values() for t in s.values()]
    tracker = LiveStorageTracker()
    tracker.ignore(*trainer.model.parameters(), *trainer.model.buffers(), *state, *inputs.values(), target)
    with tracker:
        trainer.step(batch)
    return tracker.peak_bytes


def measure(workload: str, scheme_name: str, steps: int) -> dict[str, Any]:
    w = W.build(workload)
    selections = W.resolve(w, W.scheme_for(workload, scheme_name, False))
    trainers, rows = {}, {}
    for name, disable in CONFIGS.items():
        start = time.process_time()
        trainers[name] = pe.compile(copy.deepcopy(w.model), w.loss_fn, w.batch(0),
                                    optimizer=pe.optim.SGD(lr=w.lr, momentum=MOMENTUM),
                                    scheme=pe.Scheme.from_resolved(selections, scheme_name), disable=disable)
        plan = trainers[name].memory_plan()
        recomputed = [n for n, note in trainers[name].program().graph.notes.items() if note.startswith("recomputed")]
        rows[name] = {"compile_cpu_s": time.process_time() - start, "planned_mb": plan.peak_bytes / MB,
                      "saved_mb": plan.saved_bytes / MB, "recomputed_values": len(recomputed),
                      "recomputed_elements": sum(n.meta.numel for n in recomputed), "wall_ms": [], "cpu_ms": []}
    load_before = os.getloadavg()
    for step in range(WARMUP + steps):
        batch = w.batch(step)
        order = list(trainers) if step % 2 == 0 else list(trainers)[::-1]
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            loss = trainers[name].step(batch)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if step == 0:
                rows[name]["first_loss"] = loss
            if step >= WARMUP:
                rows[name]["wall_ms"].append(wall * 1e3)
                rows[name]["cpu_ms"].append(cpu * 1e3)
    for name, trainer in trainers.items():
        rows[name]["tracked_mb"] = _tracked_peak(trainer, w.batch(0)) / MB
        for key in ("wall_ms", "cpu_ms"):
            rows[name][f"{key}_median"] = statistics.median(rows[name][key])
    return {"workload": workload, "scheme": scheme_name, "steps": steps, "threads": torch.get_num_threads(),
            "load_before": load_before, "load_after": os.getloadavg(), "systems": rows}


def _paired(on: list[float], off: list[float]) -> float:
    """The median over steps of each step's ratio to the other trainer's step of the same batch, run next to it: the
    load of a shared machine changes between steps more than between two neighbours."""
    return statistics.median(a / b for a, b in zip(on, off))


def table(result: dict[str, Any]) -> str:
    off = result["systems"]["recompute off"]
    lines = ["| pockengine | planned step peak MB | kept for backward MB | tracked step peak MB | step ms (wall) "
             "| step CPU ms | wall ÷ off (paired) | CPU ÷ off (paired) | recomputed values (M elements) | first loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["systems"].items():
        lines.append(f"| {name} | {r['planned_mb']:.1f} | {r['saved_mb']:.1f} | {r['tracked_mb']:.1f} "
                     f"| {r['wall_ms_median']:.0f} | {r['cpu_ms_median']:.0f} "
                     f"| {_paired(r['wall_ms'], off['wall_ms']):.3f} | {_paired(r['cpu_ms'], off['cpu_ms']):.3f} "
                     f"| {r['recomputed_values']} ({r['recomputed_elements'] / 1e6:.2f}) | {r['first_loss']:.5f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="smollm2")
    parser.add_argument("--scheme", default="sparse")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.workload, args.scheme, args.steps)
    print(table(result))
    print(f"threads {result['threads']}; load average {result['load_before'][0]:.2f} before, "
          f"{result['load_after'][0]:.2f} after")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
