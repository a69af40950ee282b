"""`python -m bench.compile_time`: how long set-up takes, in fresh processes: pockengine's compile with a cold and
with a warm capture cache (pockengine/capture/cache.py) beside torch.compile's first step, on the benchmark's
MobileNetV2 (and MiniLM), full fine-tuning. Writes docs/benchmarks/compile-time/README.md.

Each measurement is its own interpreter (nothing imported or cached in memory carries over), after the imports:
- pockengine cold: the model's capture cache entry is removed first, so `pe.compile` runs torch.export (the C
  kernels and other caches are warm: a run before the measured ones builds them);
- pockengine warm: the entry the cold run wrote is there; `pe.compile` reads it;
- torch.compile: a fresh, empty Inductor cache (TORCHINDUCTOR_CACHE_DIR), the first step compiling forward and
  backward.
Set-up = compile (for pockengine `pe.compile` to a ready trainer; nothing for torch.compile, which compiles at its
first call) + the first training step (forward, loss, backward, SGD with momentum), with what each imports on first
use (torch.export's tracer for a pockengine capture; torch._dynamo and Inductor for torch.compile). Wall seconds and
the process's CPU seconds of the set-up are recorded; the imports before it (torch, pockengine's compiler, the model's
library) apart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "benchmarks" / "compile-time"
MODELS = {"mobilenet_v2": "mobilenetv2", "minilm": "minilm"}  # name here -> bench/workloads.yaml's workload
COMMAND = "python -m bench.compile_time"


def _toy() -> tuple[Any, Any, Any, bool]:
    import torch
    from torch import nn

    import pockengine as pe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    batch = ((torch.randn(4, 3, 8, 8),), torch.randint(0, 4, (4,)))
    return model.eval(), pe.losses.cross_entropy(), batch, True


def _workload(name: str) -> tuple[Any, Any, Any, bool]:
    if name == "toy":
        return _toy()
    from bench.workloads import build

    w = build(MODELS[name])
    return w.model, w.loss_fn, w.batch(0), w.freeze_batchnorm


def child(name: str, system: str) -> dict[str, Any]:
    """One measurement, in this (fresh) process: `system` is pockengine-cold, pockengine-warm or torch.compile."""
    start = time.perf_counter()
    import torch

    import pockengine as pe
    import pockengine.trainer  # noqa: F401  (the compiler's modules: imported before the clock starts)
    from pockengine.capture import cache

    model, loss_fn, batch, freeze_batchnorm = _workload(name)
    imports = time.perf_counter() - start
    record: dict[str, Any] = {"model": name, "system": system}
    if system.startswith("pockengine"):
        key = cache.capture_key(model, loss_fn, batch)
        record["cacheable"] = key is not None
        if system == "pockengine-cold" and key is not None:
            cache.remove_entry(cache.entry_path(key))
        record["entry_before"] = key is not None and cache.entry_path(key).exists()
        wall, cpu = time.perf_counter(), time.process_time()
        trainer = pe.compile(model, loss_fn, batch, optimizer=pe.optim.SGD(lr=0.01, momentum=0.9),
                             freeze_batchnorm=freeze_batchnorm, capture_cache=True)
        compiled, compiled_cpu = time.perf_counter(), time.process_time()
        loss = trainer.step(batch)
        record["tracer_imported"] = "torch.export._trace" in sys.modules
    else:
        wall, cpu = time.perf_counter(), time.process_time()
        if freeze_batchnorm:
            model.eval()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        inputs, target = batch
        fn = torch.compile(lambda inputs, target: loss_fn(
            model(**inputs) if isinstance(inputs, dict) else model(*inputs), target))
        compiled, compiled_cpu = time.perf_counter(), time.process_time()
        out = fn(inputs, target)
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.item()
    end, end_cpu = time.perf_counter(), time.process_time()
    record.update(imports_s=imports, compile_s=compiled - wall, first_step_s=end - compiled, setup_s=end - wall,
                  setup_cpu_s=end_cpu - cpu, compile_cpu_s=compiled_cpu - cpu, loss=loss)
    return record


def _run(name: str, system: str, env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "bench.compile_time", "--child", name, system], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} {system} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(models: list[str], systems: list[str], repeats: int) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    records = []
    for name in models:
        if any(s.startswith("pockengine") for s in systems):
            _run(name, "pockengine-cold", env)  # builds what is cached besides the capture (C kernels), unrecorded
        for _ in range(repeats):
            for system in ("pockengine-cold", "pockengine-warm"):
                if system in systems:
                    records.append(_run(name, system, env))
        if "torch.compile" in systems:
            with tempfile.TemporaryDirectory() as inductor_cache:
                records.append(_run(name, "torch.compile", {**env, "TORCHINDUCTOR_CACHE_DIR": inductor_cache}))
    return records


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, Python {platform.python_version()}, torch {torch.__version__}"


def report(records: list[dict[str, Any]], command: str, load: tuple[float, float] | None) -> str:
    lines = ["# Compile time: pockengine's set-up, cold and warm, beside torch.compile's", "",
             f"`{command}` (from the repository root; {_machine()}"
             + (f"; load average {load[0]:.1f} before, {load[1]:.1f} after" if load else "") + ").", "",
             "Each row is one fresh process; full fine-tuning (every parameter), batch as in the main benchmark. "
             "**Set-up** = compile + first step, wall seconds (CPU seconds of the process beside it), with what "
             "each imports on first use (torch.export's tracer where pockengine captures; torch._dynamo and "
             "Inductor for torch.compile); the imports before (torch, pockengine's compiler, the model and its "
             "data) are the last column. pockengine cold: its capture cache entry removed first (torch.export "
             "runs); warm: a second compile of the same model in a new process, reading the entry. torch.compile: "
             "an empty Inductor cache, the first step compiling forward and backward. A first step also pays the "
             "first use of the kernels' libraries and of fresh memory (page faults), whatever compiled it; the "
             "machine is shared, so wall times vary with its load (given above).", "",
             "| model | system | compile s | compile CPU s | first step s | set-up s | set-up CPU s | imports s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['model']} | {r['system']} | {r['compile_s']:.2f} | {r['compile_cpu_s']:.2f} | "
                     f"{r['first_step_s']:.2f} | {r['setup_s']:.2f} | {r['setup_cpu_s']:.2f} | {r['imports_s']:.2f} |")
    def same_losses(model: str) -> str:
        losses = {r["loss"] for r in records if r["model"] == model and r["system"].startswith("pockengine")}
        return "yes" if len(losses) == 1 else "NO"

    lines += ["", "pockengine's first losses equal across its runs: " + ", ".join(
        f"{m}: {same_losses(m)}" for m in dict.fromkeys(r["model"] for r in records)) + ".",
              "", "What the cache keys and when it is not used: `pockengine/capture/cache.py`; "
              "[reliability.md](../../reliability.md) (integrity).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mobilenet_v2", help=f"comma-separated, of {[*MODELS, 'toy']}")
    p.add_argument("--systems", default="pockengine-cold,pockengine-warm,torch.compile")
    p.add_argument("--repeats", type=int, default=2, help="cold/warm pairs per model (torch.compile runs once)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--report", action="store_true", help="write README.md again from the folder's results.json")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "SYSTEM"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    if args.report:
        results = json.loads((args.out / "results.json").read_text())
        (args.out / "README.md").write_text(report(results["records"], results["command"], results.get("load")))
        return 0
    models = [m for m in args.models.split(",") if m]
    systems = [s for s in args.systems.split(",") if s]
    before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    records = measure(models, systems, args.repeats)
    after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    command = COMMAND + "".join(f" {flag} {value}" for flag, value, default in
                                (("--models", args.models, "mobilenet_v2"),
                                 ("--systems", args.systems, "pockengine-cold,pockengine-warm,torch.compile"),
                                 ("--repeats", str(args.repeats), "2")) if value != default)
    args.out.mkdir(parents=True, exist_ok=True)
    load = None if before is None else (before, after)
    (args.out / "results.json").write_text(json.dumps({"command": command, "load": load, "records": records},
                                                      indent=1) + "\n")
    text = report(records, command, load)
    (args.out / "README.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
