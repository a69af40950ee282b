"""Runs the benchmark: for each workload, a prepare process, a timing pass and a memory pass, then the report.

Timing pass: one process per (system, scheme), forked from a server that has imported the libraries once; the
processes of a group are set up one after another (so that a compile never competes with another), then step in
turn, A B C ... A B C ..., `warmup` unmeasured rounds and `steps` measured ones, with a short idle gap between two
steps, so that drift of the machine hits every system alike. A group is the whole workload (`alternate: all`) or
one scheme (`alternate: per_scheme`, when every process at once would not fit in memory). Memory pass: again one
process per (system, scheme), a new interpreter run alone, with MALLOC_MMAP_THRESHOLD_=65536 (see memory.py):
warm-up, reset of the high-water mark, measured steps, VmHWM; then one more step under FlopCounterMode where the
system's ops are visible to it. On a GPU (`device="cuda"`) there is no memory pass: the caching allocator counts each
process's own tensors, so the timing processes measure memory over their timed rounds (gpu.py). A system that fails
is recorded with its error; a system asked for that cannot run on the workload or the device is listed with why.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import multiprocessing.context
import os
import platform
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench import gpu, memory
from bench.variants import SYSTEMS, base_system
from bench.workloads import workload_config

REPO = Path(__file__).resolve().parents[1]
LORA = "peft-lora"
SYSTEM_ORDER = [s for s in SYSTEMS if s != LORA]
MATMUL_N = {"cpu": 2048, "cuda": 8192}  # a product that keeps the device busy long enough to time it
SETUP_TIMEOUT = 1800.0
STEP_TIMEOUT = 600.0
# The timing processes fork from a server that has imported these once (about 3-8 s of CPU per process saved:
# torch, transformers and its lazily imported model code, dynamo and Inductor).
PRELOAD = ["torch", "torch._dynamo", "torch._inductor.compile_fx", "torch.export", "transformers",
           "transformers.models.bert.modeling_bert", "transformers.models.llama.modeling_llama", "peft",
           "pockengine", "bench.systems", "bench.workloads", "bench.worker"]
_SPAWN_LOCK = threading.Lock()


class WorkerError(RuntimeError):
    pass


@functools.cache
def _forkserver() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


class Worker:
    """A worker process (bench.worker.serve) and its messages.

    `fresh_env=None`: forked from the preloaded server (prepare and timing processes). Otherwise a new interpreter
    started with these variables added to its environment, for settings that must be there when the process
    starts (the memory pass's MALLOC_MMAP_THRESHOLD_ is read by glibc at start-up). Jobs on a GPU always start a
    new interpreter: importing Inductor initializes CUDA on a machine that has it, and CUDA cannot be used again
    in a process forked after that.
    """

    def __init__(self, job: dict[str, Any], log: Path, fresh_env: dict[str, str] | None = None):
        from bench import worker

        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        fork = fresh_env is None and job.get("device", "cpu") == "cpu"
        ctx = _forkserver() if fork else multiprocessing.get_context("spawn")
        self.conn, child_end = ctx.Pipe()
        self.proc = ctx.Process(target=worker.serve, args=(job, child_end, str(log)))
        with _SPAWN_LOCK:
            saved = {k: os.environ.get(k) for k in fresh_env or {}}
            os.environ.update(fresh_env or {})
            try:
                self.proc.start()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k)
                    else:
                        os.environ[k] = v
        child_end.close()  # the child holds its own end: its exit shows here as end of file

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""

    def read(self, timeout: float) -> dict[str, Any]:
        if not self.conn.poll(timeout):
            self.kill()
            raise WorkerError(f"no answer within {timeout:.0f} s")
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):  # the worker is gone (end of file, or a reset connection)
            self.proc.join()
            raise WorkerError(f"worker exited with code {self.proc.exitcode}: {self._log_tail()}") from None
        if "error" in msg:
            self.kill()
            raise WorkerError(msg["error"])
        return msg

    def ask(self, timeout: float = STEP_TIMEOUT, **msg: Any) -> dict[str, Any]:
        try:
            self.conn.send(msg)
        except OSError as e:
            raise WorkerError(f"worker is gone: {e}: {self._log_tail()}") from e
        return self.read(timeout)

    def request_quit(self) -> None:
        """Ask the worker to exit without waiting (several can shut down at once)."""
        if self.proc.is_alive():
            try:
                self.conn.send({"cmd": "quit"})
            except OSError:
                self.kill()

    def quit(self) -> None:
        self.request_quit()
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.kill()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()


def matmul_rate(threads: int, n: int = 2048, reps: int = 8, device: str = "cpu") -> float:
    """Best fp32 matrix-multiply rate of this machine (FLOP/s) with `threads` threads, or of its GPU: the physical
    floor's rate."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        gpu.synchronize(device)
        t = time.perf_counter()
        torch.mm(a, b)
        gpu.synchronize(device)
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


def machine_info(device: str = "cpu") -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "peft", "onnx", "onnxruntime", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    ort_py = REPO / ".venv-ort" / "bin" / "python"
    if ort_py.exists():
        out = subprocess.run([str(ort_py), "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                             capture_output=True, text=True)
        versions["onnxruntime-training"] = out.stdout.strip() or out.stderr.strip()[-200:]
    et_py = REPO / ".venv-executorch" / "bin" / "python"
    if et_py.exists():
        out = subprocess.run([str(et_py), "-c", "from importlib.metadata import version; print(version('executorch'))"],
                             capture_output=True, text=True)
        versions["executorch"] = out.stdout.strip() or out.stderr.strip()[-200:]
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 2 ** 20, 1), "platform": platform.platform(),
            "simd": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags], **versions}
    return {**info, **gpu.device_info()} if device == "cuda" else info


def _stats(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def excluded(cfg: dict[str, Any], systems: list[str], device: str) -> dict[str, str]:
    """The systems asked for that do not run on this workload and device, each with why (the report lists them).
    `systems` are plain names; a variant runs where its system does."""
    from bench.systems import SYSTEMS

    out = {s: SYSTEMS[s].unsupported_devices[device] for s in systems
           if s in SYSTEMS and device in SYSTEMS[s].unsupported_devices}
    if LORA in systems and not cfg.get("lora"):
        out[LORA] = "this workload has no LoRA configuration in bench/workloads.yaml"
    out.update({s: why for s, why in (cfg.get("leave_out") or {}).items() if s in systems and s not in out})
    return out


def not_runnable(jobs: list[tuple[str, str]], schemes: dict[str, Any]) -> dict[str, str]:
    """`system|scheme` -> why, for the jobs whose system cannot train the scheme: a system that trains whole tensors
    only, on a scheme that trains part of a tensor's channels (`partial`, found by the prepare process)."""
    from bench.systems import SYSTEMS as CLASSES

    out = {}
    for system, scheme in jobs:
        why = getattr(CLASSES.get(base_system(system)), "partial_channels", None)
        if why and schemes.get(scheme, {}).get("partial"):
            out[f"{system}|{scheme}"] = f"the scheme trains part of some tensors' channels: {why}"
    return out


def _jobs(cfg: dict[str, Any], schemes: list[str], systems: list[str]) -> list[tuple[str, str]]:
    """(system, scheme) in run order: per scheme, each system of SYSTEM_ORDER asked for, then its variants (the
    workload's `variants` and those asked for by name, `eager[attn=eager]`)."""
    order: list[str] = []
    for base in SYSTEM_ORDER:
        # the workload's variants of a system run with it; a variant asked for by name runs alone too
        with_base = [base, *(cfg.get("variants") or [])] if base in systems else []
        order += [s for s in dict.fromkeys([*with_base, *systems]) if base_system(s) == base]
    jobs = [(system, scheme) for scheme in schemes for system in order]
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
    # one write per line: --quick logs from one thread per workload
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n", end="", flush=True)


def _await_ready(w: Worker, key: str, runs: dict[str, Any], live: dict[str, Worker], name: str) -> None:
    try:
        ready = w.read(SETUP_TIMEOUT)
        runs[key].update(setup_s=ready["setup_s"], setup_parts=ready["setup_parts"],
                         first_step_s=ready["first_step_s"], losses=[ready["loss"]],
                         trained_entries=ready["trained_entries"], notes=ready["notes"],
                         baseline_rss_kb=ready["baseline_rss_kb"], model_bytes=ready.get("model_bytes"),
                         reserved_step_bytes=ready.get("reserved_step_bytes", 0))
        w.ask(cmd="trim")
        live[key] = w
    except WorkerError as e:
        runs[key]["error"] = f"set-up: {e}"
        _log(f"{name}: {key} FAILED: {str(e)[:300]}")


def _memory_begin(w: Worker, device: str) -> dict[str, Any]:
    msg = w.ask(cmd="mem_begin")
    return msg if device == "cuda" else {"mem_before_kb": msg["rss_kb"]}


def _memory_end(w: Worker, device: str) -> dict[str, Any]:
    msg = w.ask(cmd="mem_end")
    if device == "cuda":
        return {**msg, "memory_method": "timing pass, CUDA caching allocator"}
    return {"peak_rss_kb": msg["hwm_kb"], "memory_method": "timing pass, glibc defaults"}


def run_workload(name: str, *, quick: bool, schemes: list[str] | None, systems: list[str], steps: int | None,
                 work: Path, device: str = "cpu") -> dict[str, Any]:
    cfg = workload_config(name, quick)
    schemes = schemes or list(cfg["schemes"])
    steps = steps or cfg["steps"]
    threads = cfg["threads"]
    work = work / name
    base = {"workload": name, "quick": quick, "threads": threads, "work_dir": str(work), "device": device}
    left_out = excluded(cfg, list(dict.fromkeys(base_system(s) for s in systems)), device)
    all_jobs = _jobs(cfg, schemes, [s for s in systems if base_system(s) not in left_out])
    # The timing processes measure memory themselves under --quick (a smoke test) and on a GPU (its allocator
    # counts per process); on the CPU a separate memory pass does, one process at a time.
    memory_in_timing = quick or device != "cpu"
    result: dict[str, Any] = {"workload": name, "quick": quick, "description": cfg["description"], "config": cfg, "steps": steps,
                              "warmup": cfg["warmup"], "memory_steps": cfg["memory_steps"],
                              "memory_warmup": cfg["memory_warmup"], "schemes": {}, "runs": {},
                              "loadavg_start": os.getloadavg(), "device": device, "excluded": left_out}

    _log(f"{name}: resolving schemes {schemes} and counting eager FLOPs")
    prep = Worker({**base, "kind": "prepare", "schemes": schemes,
                   "lora": cfg.get("lora") if LORA in systems else None}, work / "logs" / "prepare.log")
    try:
        msg = prep.read(SETUP_TIMEOUT)
    finally:
        prep.quit()
    result["schemes"] = msg["result"]
    result["unit"], result["items_per_step"] = msg["unit"], msg["items_per_step"]
    result["not_runnable"] = not_runnable(all_jobs, result["schemes"])
    jobs = [job for job in all_jobs if "|".join(job) not in result["not_runnable"]]
    runs: dict[str, dict[str, Any]] = {f"{s}|{sc}": {"system": s, "scheme": sc} for s, sc in jobs}

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
                                  work / "logs" / f"time-{system}-{scheme}.log")
            if not quick:
                _await_ready(started.pop(key), key, runs, live, name)
        for key, w in started.items():
            _await_ready(w, key, runs, live, name)
        if memory_in_timing:
            for key, w in list(live.items()):
                try:
                    runs[key].update(_memory_begin(w, device))
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
                if memory_in_timing:
                    runs[key].update(_memory_end(w, device))
                    if device != "cpu":
                        tracked = w.ask(cmd="track")
                        runs[key].update(tracked_step_bytes=tracked["tracked_bytes"],
                                         predicted_step_bytes=tracked["predicted_bytes"])
                    runs[key]["flops"] = w.ask(cmd="flops")["flops"]
            except WorkerError as e:
                runs[key]["error"] = f"memory/flops: {e}"
            w.request_quit()
        for w in live.values():
            w.quit()
        for key in live:
            runs[key].update(_stats(runs[key]["times"]))

    # -- memory pass ---------------------------------------------------------------------------------------
    if not memory_in_timing:
        for system, scheme in jobs:
            key = f"{system}|{scheme}"
            if "error" in runs[key]:
                continue
            _log(f"{name}: memory of {system} on {scheme}")
            w = Worker({**base, "kind": "system", "system": system, "scheme": scheme, "pass": "mem"},
                       work / "logs" / f"mem-{system}-{scheme}.log", fresh_env=memory.MALLOC_ENV)
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
        work: Path | None = None, command: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Run the benchmark on `device` ("cpu" or "cuda") and write results.json, README.md and bench.png under `out`
    (by default the CPU's in docs/benchmarks, the GPU's in docs/benchmarks/cuda); returns the results."""
    from bench import report

    on_cpu = device == "cpu"
    tag = "" if on_cpu else f"-{device}"  # a GPU's results never overwrite the CPU's
    default_out = f".cache/bench/quick{tag}" if quick else "docs/benchmarks" + ("" if on_cpu else f"/{device}")
    out = Path(out or REPO / default_out)
    work = Path(work or REPO / ".cache" / "bench" / (("quick" if quick else "full") + tag))
    systems = systems or SYSTEM_ORDER + [LORA]
    if device == "cuda":
        gpu.strict_fp32()  # the floor's matrix-multiply rate, as the systems run
    # The virtual environments of the systems that have their own (ONNX Runtime's, ExecuTorch's), where a workload
    # runs them (their device and workload do not leave them out); one given by its variable
    # (POCKENGINE_ORT_PYTHON, POCKENGINE_EXECUTORCH_PYTHON: another checkout's) is used as it is.
    from bench.systems import SYSTEMS as CLASSES

    for system in dict.fromkeys(base_system(s) for s in systems):
        environment = getattr(CLASSES.get(system), "environment", None)
        if environment and any(not excluded(workload_config(name, quick), [system], device) for name in workloads):
            python, setup = environment
            if not (python.exists() and REPO not in python.parents):
                subprocess.run(["bash", str(REPO / setup)], check=True)
    threads = workload_config(workloads[0], quick)["threads"]
    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.setdefault("workloads", {})
    started = time.time()
    # kept from earlier runs: the version of a peer that measured rows of this file and is not installed now (a run of
    # one workload without ONNX Runtime must not erase the version its other workloads' ORT rows came from)
    results["machine"] = {**results.get("machine", {}), **machine_info(device)}
    results["device"] = device
    results.setdefault("command", {})
    out.mkdir(parents=True, exist_ok=True)
    # --quick (a smoke test, whose times mean nothing) measures the floor's rate once, on a smaller product
    quick_rate = matmul_rate(threads, n=1024, reps=3, device=device) if quick else None

    def measured(name: str) -> dict[str, Any]:
        rate_start = quick_rate or matmul_rate(threads, n=MATMUL_N[device], device=device)
        _log(f"matmul rate {rate_start / 1e9:.1f} GFLOP/s " + (f"with {threads} threads" if on_cpu else f"on {device}"))
        w = run_workload(name, quick=quick, schemes=schemes, systems=systems, steps=steps, work=work, device=device)
        rate_end = quick_rate or matmul_rate(threads, n=MATMUL_N[device], device=device)
        w.update(matmul_flops_per_s=max(rate_start, rate_end), matmul_rates=[rate_start, rate_end],
                 matmul_n=1024 if quick else MATMUL_N[device],
                 machine=results["machine"], finished=time.strftime("%Y-%m-%d %H:%M:%S"), code=code_version())
        return w

    def record(name: str, w: dict[str, Any]) -> None:
        results["workloads"][name] = w
        results["command"][name] = command or f"python -m bench --workload {name}"
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
