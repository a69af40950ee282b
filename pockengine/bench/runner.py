"""Runs the benchmark: for each workload, a prepare process, a timing pass and a memory pass, then the report.

Timing pass: one process per (system, scheme); the processes of a group are set up one after another (so that a
compile never competes with another), then step in turn, A B C ... A B C ..., `warmup` unmeasured rounds and
`steps` measured ones, with a short idle gap between two steps, so that drift of the machine hits every system
alike. A group is the whole workload (`alternate: all`) or one scheme (`alternate: per_scheme`, when every process
at once would not fit in memory). Memory pass: again one process per (system, scheme), run alone, with
MALLOC_MMAP_THRESHOLD_=65536 (see memory.py): warm-up, reset of the high-water mark, measured steps, VmHWM; then
one more step under FlopCounterMode where the system's ops are visible to it. A system that fails is recorded with
its error.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from pockengine.bench import memory
from pockengine.bench.workloads import CONFIG_DIR, workload_config

REPO = Path(__file__).resolve().parents[2]
SYSTEM_ORDER = ["pockengine", "eager", "torch.compile", "ort"]
LORA = "peft-lora"
SETUP_TIMEOUT = 1800.0
STEP_TIMEOUT = 600.0
# --quick runs every set-up at once on a small machine: Inductor compiles in its own process instead of starting a
# pool of compile workers (each importing torch) per torch.compile process.
QUICK_ENV = {"TORCHINDUCTOR_COMPILE_THREADS": "1"}


class WorkerError(RuntimeError):
    pass


class Worker:
    """A worker process (python -m pockengine.bench.worker) and its line protocol."""

    def __init__(self, job: dict[str, Any], log: Path, env: dict[str, str] | None = None):
        self.job = job
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "pockengine.bench.worker", json.dumps(job)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"),
                                     text=True, cwd=REPO, env={**os.environ, **(env or {})})
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                self.lines.put(line[2:])
        self.lines.put(None)

    def read(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise WorkerError(f"no answer within {timeout:.0f} s") from None
        if line is None:
            self.proc.wait()
            tail = self.log.read_text()[-1500:]
            raise WorkerError(f"worker exited with code {self.proc.returncode}: {tail}")
        msg = json.loads(line)
        if "error" in msg:
            self.kill()
            raise WorkerError(msg["error"])
        return msg

    def ask(self, timeout: float = STEP_TIMEOUT, **msg: Any) -> dict[str, Any]:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise WorkerError(f"worker is gone: {e}: {self.log.read_text()[-1500:]}") from e
        return self.read(timeout)

    def request_quit(self) -> None:
        """Ask the worker to exit without waiting (several can shut down at once)."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self.kill()

    def quit(self) -> None:
        self.request_quit()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def matmul_rate(threads: int, n: int = 2048, reps: int = 8) -> float:
    """Best fp32 matrix-multiply rate of this machine (FLOP/s) with `threads` threads: the physical floor's rate."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    torch.set_num_threads(old)
    return 2 * n ** 3 / best


def code_version() -> str | None:
    """The commit of the pockengine checkout that measures (`+changes` when its code differs from it), so that
    every table says which code produced it; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "pockengine", "bench"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if changed else "")


def machine_info() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "peft", "onnx", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    ort_py = REPO / ".venv-ort" / "bin" / "python"
    if ort_py.exists():
        out = subprocess.run([str(ort_py), "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                             capture_output=True, text=True)
        versions["onnxruntime-training"] = out.stdout.strip() or out.stderr.strip()[-200:]
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 2 ** 20, 1), "platform": platform.platform(),
            "simd": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags], **versions}


def _stats(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def _jobs(cfg: dict[str, Any], schemes: list[str], systems: list[str]) -> list[tuple[str, str]]:
    jobs = [(system, scheme) for scheme in schemes for system in SYSTEM_ORDER if system in systems]
    if LORA in systems and cfg.get("lora"):
        jobs.append((LORA, "lora"))
    return jobs


def _groups(cfg: dict[str, Any], jobs: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    if cfg.get("alternate", "all") == "all":
        return [jobs]
    groups: dict[str, list[tuple[str, str]]] = {}
    for job in jobs:
        groups.setdefault(job[1], []).append(job)
    out = list(groups.values())
    if len(out) > 1 and out[-1][0][1] == "lora":  # LoRA has no peers on its scheme: it joins the last group
        out[-2].extend(out.pop())
    return out


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return values[3] + values[4], sum(values)


def quiet_gap(pause: float, max_wait: float, idle_needed: float = 0.85) -> tuple[float, bool]:
    """Idle gap before a step: wait `pause`, and while other processes keep the machine busy (less than
    `idle_needed` of the CPU time idle during the gap; every benchmark process is idle then), wait on, up to
    `max_wait` seconds. Returns (seconds waited beyond the pause, whether the machine was quiet at the end)."""
    waited = 0.0
    while True:
        idle0, total0 = _cpu_times()
        time.sleep(pause)
        idle1, total1 = _cpu_times()
        quiet = total1 == total0 or (idle1 - idle0) / (total1 - total0) >= idle_needed
        if quiet or waited >= max_wait:
            return waited, quiet
        waited += pause


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _await_ready(w: Worker, key: str, runs: dict[str, Any], live: dict[str, Worker], name: str) -> None:
    try:
        ready = w.read(SETUP_TIMEOUT)
        runs[key].update(setup_s=ready["setup_s"], setup_parts=ready["setup_parts"],
                         first_step_s=ready["first_step_s"], losses=[ready["loss"]],
                         trained_entries=ready["trained_entries"], notes=ready["notes"],
                         baseline_rss_kb=ready["baseline_rss_kb"])
        w.ask(cmd="trim")
        live[key] = w
    except WorkerError as e:
        runs[key]["error"] = f"set-up: {e}"
        _log(f"{name}: {key} FAILED: {str(e)[:300]}")


def run_workload(name: str, *, quick: bool, schemes: list[str] | None, systems: list[str], steps: int | None,
                 work: Path) -> dict[str, Any]:
    cfg = workload_config(name, quick)
    schemes = schemes or list(cfg["schemes"])
    steps = steps or cfg["steps"]
    threads = cfg["threads"]
    work = work / name
    base = {"workload": name, "quick": quick, "threads": threads, "work_dir": str(work)}
    jobs = _jobs(cfg, schemes, systems)
    result: dict[str, Any] = {"workload": name, "quick": quick, "description": cfg["description"], "config": cfg, "steps": steps,
                              "warmup": cfg["warmup"], "memory_steps": cfg["memory_steps"],
                              "memory_warmup": cfg["memory_warmup"], "schemes": {}, "runs": {},
                              "loadavg_start": os.getloadavg()}
    runs: dict[str, dict[str, Any]] = {f"{s}|{sc}": {"system": s, "scheme": sc} for s, sc in jobs}

    _log(f"{name}: resolving schemes {schemes} and counting eager FLOPs")
    prep = Worker({**base, "kind": "prepare", "schemes": schemes,
                   "lora": cfg.get("lora") if LORA in systems else None}, work / "logs" / "prepare.log")
    try:
        msg = prep.read(SETUP_TIMEOUT)
    finally:
        prep.kill()
    result["schemes"] = msg["result"]
    result["unit"], result["items_per_step"] = msg["unit"], msg["items_per_step"]

    # -- timing pass ---------------------------------------------------------------------------------------
    gate = result["quiet_gate"] = {"waited_s": 0.0, "busy_steps": 0}
    for group in _groups(cfg, jobs):
        live: dict[str, Worker] = {}
        started: dict[str, Worker] = {}
        for system, scheme in group:
            key = f"{system}|{scheme}"
            # Set-ups one after another, so that no compile competes with another for the cores; under --quick
            # (a smoke test, whose set-up times mean nothing) all at once, to save time.
            _log(f"{name}: setting up {system} on {scheme}")
            started[key] = Worker({**base, "kind": "system", "system": system, "scheme": scheme, "pass": "time"},
                                  work / "logs" / f"time-{system}-{scheme}.log", env=QUICK_ENV if quick else None)
            if not quick:
                _await_ready(started.pop(key), key, runs, live, name)
        for key, w in started.items():
            _await_ready(w, key, runs, live, name)
        if quick:  # one pass only: the high-water mark of the timing processes (glibc defaults)
            for key, w in list(live.items()):
                try:
                    runs[key]["mem_before_kb"] = w.ask(cmd="mem_begin")["rss_kb"]
                except WorkerError as e:
                    runs[key]["error"] = f"memory: {e}"
                    del live[key]
        rounds = cfg["warmup"] - 1 + steps  # the first step ran during set-up
        _log(f"{name}: {len(live)} processes, {rounds} rounds of alternating steps")
        for r in range(rounds):
            for key, w in list(live.items()):
                # --quick times mean nothing (a smoke test): no idle gap to wait for
                waited, quiet = (0.0, True) if quick else quiet_gap(cfg["pause_s"], cfg["max_wait_s"])
                gate["waited_s"] += waited
                gate["busy_steps"] += 0 if quiet else int(r >= cfg["warmup"] - 1)
                try:
                    msg = w.ask(cmd="step")
                except WorkerError as e:
                    runs[key]["error"] = f"step {len(runs[key]['losses']) + 1}: {e}"
                    _log(f"{name}: {key} FAILED: {str(e)[:300]}")
                    del live[key]
                    continue
                runs[key]["losses"].append(msg["loss"])
                if r >= cfg["warmup"] - 1:
                    runs[key].setdefault("times", []).append(msg["time"])
        for key, w in live.items():
            try:
                if quick:
                    end = w.ask(cmd="mem_end")
                    runs[key].update(peak_rss_kb=end["hwm_kb"], memory_method="timing pass, glibc defaults")
                    runs[key]["flops"] = w.ask(cmd="flops")["flops"]
            except WorkerError as e:
                runs[key]["error"] = f"memory/flops: {e}"
            w.request_quit()
        for w in live.values():
            w.quit()
        for key in live:
            runs[key].update(_stats(runs[key]["times"]))

    # -- memory pass ---------------------------------------------------------------------------------------
    if not quick:
        for system, scheme in jobs:
            key = f"{system}|{scheme}"
            if "error" in runs[key]:
                continue
            _log(f"{name}: memory of {system} on {scheme}")
            w = Worker({**base, "kind": "system", "system": system, "scheme": scheme, "pass": "mem"},
                       work / "logs" / f"mem-{system}-{scheme}.log", env=memory.MALLOC_ENV)
            try:
                ready = w.read(SETUP_TIMEOUT)
                for _ in range(cfg["memory_warmup"] - 1):
                    w.ask(cmd="step")
                w.ask(cmd="trim")  # what set-up freed leaves the resident set, for every system alike
                before = w.ask(cmd="mem_begin")["rss_kb"]
                mem_losses = []
                for _ in range(cfg["memory_steps"]):
                    mem_losses.append(w.ask(cmd="step")["loss"])
                end = w.ask(cmd="mem_end")
                runs[key].update(mem_before_kb=before, peak_rss_kb=end["hwm_kb"],
                                 baseline_rss_kb=ready["baseline_rss_kb"],
                                 memory_method="memory pass, MALLOC_MMAP_THRESHOLD_=65536")
                tracked = w.ask(cmd="track")
                runs[key].update(tracked_step_bytes=tracked["tracked_bytes"],
                                 predicted_step_bytes=tracked["predicted_bytes"])
                runs[key]["flops"] = w.ask(cmd="flops")["flops"]
            except WorkerError as e:
                runs[key]["memory_error"] = str(e)
                _log(f"{name}: memory of {key} FAILED: {str(e)[:300]}")
            finally:
                w.quit()
    result["runs"] = runs
    result["loadavg_end"] = os.getloadavg()
    return result


def run(workloads: list[str], *, quick: bool = False, schemes: list[str] | None = None,
        systems: list[str] | None = None, steps: int | None = None, out: Path | None = None,
        work: Path | None = None, command: str | None = None) -> dict[str, Any]:
    """Run the benchmark and write results.json, README.md and bench.png under `out`; returns the results."""
    from pockengine.bench import report

    out = Path(out or (REPO / (".cache/bench/quick" if quick else "docs/benchmarks")))
    work = Path(work or REPO / ".cache" / "bench" / ("quick" if quick else "full"))
    systems = systems or SYSTEM_ORDER + [LORA]
    if "ort" in systems:
        subprocess.run(["bash", str(CONFIG_DIR / "setup_ort.sh")], check=True)
    threads = workload_config(workloads[0], quick)["threads"]
    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.setdefault("workloads", {})
    started = time.time()
    results["machine"] = machine_info()
    results.setdefault("command", {})
    out.mkdir(parents=True, exist_ok=True)
    # --quick (a smoke test, whose times mean nothing) measures the floor's rate once, on a smaller product
    quick_rate = matmul_rate(threads, n=1024, reps=3) if quick else None

    def measured(name: str) -> dict[str, Any]:
        rate_start = quick_rate or matmul_rate(threads)
        _log(f"matmul rate {rate_start / 1e9:.1f} GFLOP/s with {threads} threads")
        w = run_workload(name, quick=quick, schemes=schemes, systems=systems, steps=steps, work=work)
        rate_end = quick_rate or matmul_rate(threads)
        w.update(matmul_flops_per_s=max(rate_start, rate_end), matmul_rates=[rate_start, rate_end],
                 machine=results["machine"], finished=time.strftime("%Y-%m-%d %H:%M:%S"), code=code_version())
        return w

    def record(name: str, w: dict[str, Any]) -> None:
        results["workloads"][name] = w
        results["command"][name] = command or f"pockengine bench --workload {name}"
        results["wall_s"] = time.time() - started
        # Written after every workload, so that a later failure keeps what was measured.
        results_path.write_text(json.dumps(results, indent=1))
        report.write(results, out)

    if quick:  # a smoke test: its times mean nothing, so the workloads run side by side to finish sooner
        with ThreadPoolExecutor(len(workloads)) as pool:
            for name, w in zip(workloads, pool.map(measured, workloads)):
                record(name, w)
    else:
        for name in workloads:
            record(name, measured(name))
    return results
