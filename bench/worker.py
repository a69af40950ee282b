"""One benchmark process: `serve(job, conn, log)`, started by the runner through multiprocessing (runner.Worker).

`job["kind"] == "prepare"`: resolve every scheme of a workload once (written to work_dir/selections/) and count the
FLOPs of an eager step with each trainable set (torch.utils.flop_counter.FlopCounterMode); sends one result message.

`job["kind"] == "system"`: build the workload, set up one system on one scheme, run the first step (set-up time =
setup() + first step, for every system), then answer commands received on the connection, one message each:
  {"cmd": "step"}      -> {"loss", "time"}     (step n uses batch n mod len(batches), the same order everywhere)
  {"cmd": "mem_begin"} -> {"rss_kb"}           (resets the resident high-water mark of the system's process;
                                                on CUDA the allocator's figures instead, see gpu.begin_memory)
  {"cmd": "mem_end"}   -> {"hwm_kb", "rss_kb"}  (on CUDA: gpu.end_memory)
  {"cmd": "track"}     -> {"tracked_bytes", "predicted_bytes"} (one more step under the dispatch-level live-storage
                          tracker, null where it cannot watch; the system's own prediction, null if it makes none)
  {"cmd": "flops"}     -> {"flops"}            (one more step under FlopCounterMode; null where it cannot watch)
  {"cmd": "trim"}      -> {}                   (gc and malloc_trim: an idle process keeps only live memory)
  {"cmd": "quit"}
Messages are plain dicts on a multiprocessing connection; what libraries print goes to the log file.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from bench import gpu, memory


def _set_up_process(job: dict[str, Any]) -> str:
    """Threads (host-side work only, on a GPU) and, on a GPU, exact fp32; returns the job's device."""
    torch.set_num_threads(job["threads"])
    device = job.get("device", "cpu")
    if device == "cuda":
        gpu.strict_fp32()
    return device


def _selections_path(work_dir: str, scheme: str) -> Path:
    return Path(work_dir) / "selections" / f"{scheme}.json"


def save_selections(work_dir: str, scheme: str, selections: dict) -> None:
    """Write a resolved scheme ({parameter: Selection}) where every system's process reads it."""
    path = _selections_path(work_dir, scheme)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": scheme, "resolved": {k: v.to_dict() for k, v in selections.items()}}))


def load_selections(work_dir: str, scheme: str) -> dict:
    from pockengine.scheme import Selection

    data = json.loads(_selections_path(work_dir, scheme).read_text())
    return {k: Selection.from_dict(v) for k, v in data["resolved"].items()}


def count_flops(fn: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def track_step(system: Any, batch: Any) -> int:
    """Peak live tensor storage allocated during one step, seen at the dispatcher (pockengine.memory.tracker)."""
    from pockengine.memory.tracker import LiveStorageTracker

    inputs, target = batch
    tracker = LiveStorageTracker()
    tracker.ignore(*system.persistent_tensors(), *(inputs.values() if isinstance(inputs, dict) else inputs), target)
    with tracker:
        system.step(batch)
    return tracker.peak_bytes


def prepare(job: dict[str, Any], conn: Connection) -> None:
    """Resolve the schemes and count eager FLOPs per scheme (and for LoRA)."""
    from bench import workloads as W
    from bench.systems import Eager, PeftLoRA
    from pockengine.scheme import summary

    device = _set_up_process(job)
    w = W.build(job["workload"], job["quick"], device=device)
    out: dict[str, Any] = {}
    for name in job["schemes"]:
        scheme = W.scheme_for(job["workload"], name, job["quick"])
        sel = W.resolve(w, scheme)
        save_selections(job["work_dir"], name, sel)
        model = copy.deepcopy(w.model)
        eager = Eager()
        eager.setup(model, w.loss_fn, w.batch(0), sel, lr=w.lr)
        flops = count_flops(lambda: eager.step(w.batch(0))) if sel else None
        total = sum(p.numel() for p in model.parameters())
        out[name] = {"rules": scheme.to_dict(), "trained_tensors": len(sel), "trained_entries": eager.trained_entries(),
                     "total_entries": total, "eager_flops": flops,
                     "partial": any(s.kind == "partial" for s in sel.values()),
                     "summary_total": summary(model, sel).splitlines()[-1].split()[1:]}
        del model, eager
    if job.get("lora"):
        lora = PeftLoRA()
        lora.setup(copy.deepcopy(w.model), w.loss_fn, w.batch(0), None, lr=w.lr, lora=job["lora"])
        total = sum(p.numel() for p in w.model.parameters())
        out["lora"] = {"rules": {"peft": job["lora"]}, "trained_tensors": len(lora.trained),
                       "trained_entries": lora.trained_entries(), "total_entries": total,
                       "eager_flops": count_flops(lambda: lora.step(w.batch(0)))}
    conn.send({"result": out, "items_per_step": w.items_per_step, "unit": w.unit})


def run_system(job: dict[str, Any], conn: Connection) -> None:
    from bench import workloads as W
    from bench.systems import make_system

    device = _set_up_process(job)
    cfg = W.workload_config(job["workload"], job["quick"])
    if cfg["model"] in ("minilm", "smollm2"):
        import transformers  # noqa: F401  (a runtime library: in the baseline, not in the training memory)
    system = make_system(job["system"])
    system.import_runtime()
    baseline = memory.rss_kb()
    w = W.build(job["workload"], job["quick"], device=device)
    selections = load_selections(job["work_dir"], job["scheme"]) if system.needs_selections else None
    start = time.perf_counter()
    system.setup(w.model, w.loss_fn, w.batch(0), selections, lr=w.lr, workload=w,
                 freeze_batchnorm=w.freeze_batchnorm, scheme_name=job["scheme"], lora=w.cfg.get("lora"),
                 work_dir=str(Path(job["work_dir"]) / job["system"] / job["scheme"]), threads=job["threads"],
                 reuse=job["pass"] == "mem", compile_threads=1 if job["quick"] else None)
    setup_only = time.perf_counter() - start
    n = 0
    t = time.perf_counter()
    first = system.step(w.batch(n))
    gpu.synchronize(device)
    first_time = time.perf_counter() - t
    n += 1
    parts = system.setup_parts() if hasattr(system, "setup_parts") else {}
    conn.send({"ready": True, "setup_s": setup_only + first_time, "setup_only_s": setup_only,
               "first_step_s": first_time, "setup_parts": parts, "loss": first,
               "trained_entries": system.trained_entries(), "notes": system.notes(),
               "model_bytes": system.model_bytes(), "reserved_step_bytes": system.reserved_step_bytes(),
               "baseline_rss_kb": system.baseline_rss_kb() or baseline, "pid": system.pid()})
    try:
        while (cmd := _receive(conn)) != "quit":
            if cmd == "step":
                batch = w.batch(n)
                gpu.synchronize(device)
                t = time.perf_counter()
                loss = system.step(batch)
                gpu.synchronize(device)
                conn.send({"loss": loss, "time": time.perf_counter() - t})
                n += 1
            elif cmd == "mem_begin":
                conn.send(gpu.begin_memory() if device == "cuda" else {"rss_kb": memory.reset_peak(system.pid())})
            elif cmd == "mem_end":
                conn.send(gpu.end_memory() if device == "cuda" else
                          {"hwm_kb": memory.hwm_kb(system.pid()), "rss_kb": memory.rss_kb(system.pid())})
            elif cmd == "track":
                batch = w.batch(n)
                conn.send({"tracked_bytes": track_step(system, batch) if system.counts_flops else None,
                           "predicted_bytes": system.predicted_step_bytes()})
                n += 1
            elif cmd == "flops":
                batch = w.batch(n)
                flops = count_flops(lambda: system.step(batch)) if system.counts_flops else None
                n += 1
                conn.send({"flops": flops})
            elif cmd == "trim":
                gc.collect()
                memory.trim()
                conn.send({"ok": True})
            else:
                conn.send({"error": f"unknown command {cmd!r}"})
    finally:
        system.close()


def _receive(conn: Connection) -> str:
    """The next command; "quit" when the runner has gone away."""
    try:
        return conn.recv()["cmd"]
    except (EOFError, OSError):
        return "quit"


def serve(job: dict[str, Any], conn: Connection, log: str) -> None:
    """A worker process: stdout and stderr (whatever the libraries print) go to `log`, messages to `conn`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        (prepare if job["kind"] == "prepare" else run_system)(job, conn)
    except Exception as e:
        traceback.print_exc()
        conn.send({"error": f"{type(e).__name__}: {str(e)[:2000]}"})
        sys.exit(1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
