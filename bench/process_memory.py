"""The whole process's training memory of pockengine on one benchmark workload, split as `Trainer.memory_report`
splits it.

    python -m bench.process_memory [--workload mobilenetv2] [--scheme sparse] [--steps 5] [--capture-process fork]

A fresh child process (with the benchmark's memory setting, MALLOC_MMAP_THRESHOLD_=65536, so freed large blocks
leave the resident set) imports the runtime libraries (torch, torch.export with its tracer, pockengine, the
benchmark's workloads), records its resident set (the baseline), builds the workload (the real model and its
batches, as `python -m bench` does), compiles it with the workload's scheme (SGD with momentum, as the benchmark),
runs the steps and prints the resident set above the baseline at each stage, the peak during the steps, and the
split of that peak: the report's lines (weights, optimizer state, constants, code, planned step buffers, compiler
residue), the benchmark's batches, the pages of the libraries' own files that the run touched for the first time
(file-backed resident memory: code of the kernels), and the rest (anonymous memory: the allocator's free but
resident blocks, the interpreter's and the libraries' first-use state). With a pockengine that has no
memory_report (an older commit on PYTHONPATH) it prints the stages alone.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys

from bench.memory import MALLOC_ENV

MB = 2 ** 20


def _smaps_bytes() -> dict[str, int]:
    """Resident bytes of this process in anonymous mappings and in mappings of files."""
    out = {"anonymous": 0, "files": 0}
    backed = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                backed = len(fields) >= 6 and fields[5].startswith("/")
            elif fields and fields[0] == "Rss:":
                out["files" if backed else "anonymous"] += int(fields[1]) * 1024
    return out


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _settle() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _batch_bytes(batches: list, trainer: object) -> int:
    """The batches' storage, less the example batch's (the report counts that one, in the compiler residue)."""
    import torch
    from torch.utils._pytree import tree_leaves

    example = {t.untyped_storage().data_ptr() for t in tree_leaves(getattr(trainer, "_example", ()))
               if isinstance(t, torch.Tensor)}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for b in batches
                for t in tree_leaves(b) if isinstance(t, torch.Tensor)}
    return sum(n for ptr, n in storages.items() if ptr not in example)


def child(workload: str, scheme: str, steps: int, capture_process: str) -> dict:
    import torch

    torch.set_num_threads(2)
    import torch.export
    import torch.export._trace  # noqa: F401  (the exporter's tracer: torch._dynamo, loaded by the first capture)

    torch.export.default_decompositions()
    import pockengine as pe
    import pockengine.trainer  # noqa: F401
    from bench import workloads as W
    from pockengine.scheme import Scheme

    _settle()
    base, base_maps = _status_bytes("VmRSS"), _smaps_bytes()
    stages: dict[str, int] = {}

    def stage(name: str) -> None:
        _settle()
        stages[name] = _status_bytes("VmRSS") - base

    w = W.build(workload)
    selections = W.resolve(w, W.scheme_for(workload, scheme, False))
    stage("model and batches built")
    options = {"capture_process": capture_process} if capture_process != "same" else {}  # an older pockengine
    trainer = pe.compile(w.model, w.loss_fn, w.batch(0), optimizer=pe.optim.SGD(lr=w.lr, momentum=0.9),
                         scheme=Scheme.from_resolved(selections, scheme), freeze_batchnorm=w.freeze_batchnorm,
                         **options)
    stage("compiled")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the resident high-water mark restarts here: the peak of the steps
    for i in range(steps):
        trainer.step(w.batch(i))
    peak = _status_bytes("VmHWM") - base
    stage(f"after {steps} steps")
    maps = _smaps_bytes()
    result = {"stages": stages, "peak": peak, "file_pages": maps["files"] - base_maps["files"],
              "batches": _batch_bytes(w.batches, trainer)}
    if hasattr(trainer, "memory_report"):
        report = trainer.memory_report(baseline_rss=base)
        result["report"] = str(report)
        result["lines"] = {"trained weights": report.trained_weights, "frozen weights and buffers":
                           report.frozen_weights, "optimizer state": report.optimizer_state,
                           "program constants": report.program_constants, "generated code": report.generated_code,
                           "planned step buffers (peak)": report.step_buffers,
                           "compiler residue": report.compiler_residue}
        result["predicted"] = report.predicted
    return result


def show(result: dict, steps: int) -> str:
    rows = [(f"RSS above the runtime libraries, {name}", v) for name, v in result["stages"].items()]
    rows.append((f"peak during the {steps} steps (VmHWM)", result["peak"]))
    if "lines" in result:
        rows.append(("split of the peak:", None))
        rows += [(f"  {name}", v) for name, v in result["lines"].items()]
        rows.append(("  the benchmark's batches (held by the workload, not the trainer)", result["batches"]))
        rows.append(("  library file pages touched (code of the kernels run)", result["file_pages"]))
        rest = result["peak"] - sum(result["lines"].values()) - result["batches"] - result["file_pages"]
        rows.append(("  the rest: allocator, interpreter, libraries' first-use state", rest))
        rows.append(("predicted by memory_report (the counted lines)", result["predicted"]))
    width = max(len(name) for name, _ in rows)
    text = "\n".join(name if v is None else f"{name:<{width}} {v / MB:8.1f} MB" for name, v in rows)
    return text + ("\n\nmemory_report() after the steps:\n" + result["report"] if "report" in result else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="mobilenetv2")
    parser.add_argument("--scheme", default="sparse")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--capture-process", default="same", choices=("same", "fork"),
                        help="compile's capture_process: torch.export in this process or in a forked child")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.workload, args.scheme, args.steps, args.capture_process)))
        return
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    proc = subprocess.run([sys.executable, "-m", "bench.process_memory", "--child", "--workload", args.workload,
                           "--scheme", args.scheme, "--steps", str(args.steps), "--capture-process",
                           args.capture_process], env={**os.environ, **MALLOC_ENV},
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"the measuring process failed:\n{proc.stderr[-4000:]}")
    print(f"{args.workload}, scheme {args.scheme}, capture_process={args.capture_process!r} (load average "
          f"{' '.join(load)} at the start)")
    print(show(json.loads(proc.stdout.strip().splitlines()[-1]), args.steps))


if __name__ == "__main__":
    main()
