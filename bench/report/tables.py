"""The report's figures and tables from results.json: per-run memory arithmetic, one row of derived figures per
(scheme, system), the time and memory tables of a workload and the summary table across workloads."""

from __future__ import annotations

from typing import Any

from bench.variants import SYSTEMS, base_system
MB = 1024  # KiB per MiB


def _fmt_ms(s: float | None) -> str:
    return "–" if s is None else f"{s * 1000:.1f}" if s < 10 else f"{s * 1000:.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b in (None, 0) else f"{a / b:.2f}"


def training_mb(run: dict[str, Any]) -> float | None:
    """Peak resident memory during the measured steps above the process's runtime baseline (libraries loaded, no
    model yet), in MiB. On a GPU: the peak of allocated bytes over the whole process, set-up included (nothing is
    on the GPU before the model), with the steps' reserved pools (CUDA graphs) added to the steps' peak."""
    if "cuda_peak_bytes" in run:
        steps = run["cuda_peak_bytes"] + run.get("reserved_step_bytes", 0)
        return max(run["cuda_setup_peak_bytes"], steps) / 2 ** 20
    if "peak_rss_kb" not in run or "baseline_rss_kb" not in run:
        return None
    return (run["peak_rss_kb"] - run["baseline_rss_kb"]) / MB


# Systems whose step memory is resident before the measured steps, so that only their train mem compares: ONNX
# Runtime (training, and the inference runtime under pockengine's ONNX runner) keeps what a step frees in its arena
# for the next step; ExecuTorch allocates its memory plan's buffers when it loads the program. The label the memory
# table shows instead of their step mem.
RESIDENT_STEP = {"ort": "arena", "pockengine-onnx": "arena", "executorch": "planned"}
# The systems the peer table divides by every other system: pockengine's torch backend and its ONNX runner.
OURS = ("pockengine", "pockengine-onnx")


def step_mb(run: dict[str, Any]) -> float | None:
    """Peak resident memory during the measured steps above the resident memory just before them, in MiB: what a
    step allocates on top of what lives across steps (weights, optimizer state, runtime). On a GPU the same from
    the caching allocator's counts of allocated bytes, plus what the step's CUDA graphs reserve (their replays
    allocate nothing: the capture's intermediates stay in a private pool, `System.reserved_step_bytes`)."""
    if "cuda_peak_bytes" in run:
        return (run["cuda_peak_bytes"] - run["cuda_before_bytes"] + run.get("reserved_step_bytes", 0)) / 2 ** 20
    if "peak_rss_kb" not in run or "mem_before_kb" not in run or base_system(run["system"]) in RESIDENT_STEP:
        return None
    return (run["peak_rss_kb"] - run["mem_before_kb"]) / MB


def _mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2 ** 20


def rows(w: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (scheme, system) with the derived figures."""
    runs = w["runs"]
    rate = w["matmul_flops_per_s"]
    eager_full = runs.get("eager|full", {})
    ref_time, ref_mem = eager_full.get("median_s"), training_mb(eager_full) if eager_full else None
    out = []
    for key, run in runs.items():
        scheme = w["schemes"].get(run["scheme"], {})
        flops_candidates = [f for f in (scheme.get("eager_flops"),
                                        runs.get(f"pockengine|{run['scheme']}", {}).get("flops")) if f]
        floor_flops = min(flops_candidates) if flops_candidates else None
        peers = [r for k, r in runs.items() if r["scheme"] == run["scheme"] and k != key and "median_s" in r]
        best_time = min((r["median_s"] for r in peers), default=None)
        peer_mems = [m for m in (training_mb(r) for r in peers) if m is not None]
        eager_same = runs.get(f"eager|{run['scheme']}", {})
        eager_loss = eager_same.get("losses", [None])[0]
        eager_step = step_mb(eager_same) if eager_same else None
        first = (run.get("losses") or [None])[0]
        row = {
            "scheme": run["scheme"], "system": run["system"], "error": run.get("error"),
            "memory_error": run.get("memory_error"), "notes": run.get("notes", []),
            "trained": scheme.get("trained_entries"), "total": scheme.get("total_entries"),
            "median_s": run.get("median_s"), "min_s": run.get("min_s"), "max_s": run.get("max_s"),
            "setup_s": run.get("setup_s"), "mem_mb": training_mb(run), "step_mb": step_mb(run),
            "tracked_mb": _mib(run.get("tracked_step_bytes")), "predicted_mb": _mib(run.get("predicted_step_bytes")),
            "time_vs_eager_same": (run["median_s"] / eager_same["median_s"]
                                   if "median_s" in run and eager_same.get("median_s") else None),
            "step_mem_vs_eager_same": (step_mb(run) / eager_step if eager_step and step_mb(run) is not None
                                       else None),
            "tracked_vs_eager_same": (run["tracked_step_bytes"] / eager_same["tracked_step_bytes"]
                                      if run.get("tracked_step_bytes") and eager_same.get("tracked_step_bytes")
                                      else None),
            "peak_rss_mb": run["peak_rss_kb"] / MB if "peak_rss_kb" in run else None,
            "model_mb": _mib(run.get("model_bytes")),
            "flops": run.get("flops") or scheme.get("eager_flops"), "floor_flops": floor_flops,
            "floor_s": floor_flops / rate if floor_flops else None,
            "time_vs_eager_full": run["median_s"] / ref_time if ref_time and "median_s" in run else None,
            "mem_vs_eager_full": (training_mb(run) / ref_mem if ref_mem and training_mb(run) is not None else None),
            "time_vs_best_other": run["median_s"] / best_time if best_time and "median_s" in run else None,
            "mem_vs_best_other": (training_mb(run) / min(peer_mems)
                                  if peer_mems and training_mb(run) is not None else None),
            "first_loss": first, "first_loss_eager": eager_loss,
        }
        if row["median_s"]:
            row["throughput"] = w["items_per_step"] / row["median_s"]
            row["floor_fraction"] = row["floor_s"] / row["median_s"] if row["floor_s"] else None
        out.append(row)
    order = {s: i for i, s in enumerate(list(w["schemes"]))}
    out.sort(key=lambda r: (order.get(r["scheme"], 99), system_rank(r["system"])))
    return out


def system_rank(name: str) -> tuple[int, bool, str]:
    """Order of the report: SYSTEMS' order, each system before its variants."""
    base = base_system(name)
    return SYSTEMS.index(base) if base in SYSTEMS else len(SYSTEMS), name != base, name


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _table(head: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |" for cells in lines]
    return "\n".join(out)


def table(w: dict[str, Any]) -> str:
    """Two tables: time, then memory; where a system trains from an exported model file, the memory table adds the
    whole process's peak (VmHWM, runtime libraries included) and the size of that file."""
    unit = "samples/s" if w["unit"] == "samples" else "tokens/s"
    time_head = ["scheme", "system", "trained", "step ms median (min–max)", unit, "set-up s", "GFLOP/step",
                 "floor ms", "floor/time", "time ÷ eager full", "time ÷ eager same scheme", "time ÷ best other",
                 "1st loss"]
    mem_head = ["scheme", "system", "train mem MB", "step mem MB", "step tracked MB", "step predicted MB",
                "train mem ÷ eager full", "train mem ÷ best other", "step mem ÷ eager same scheme"]
    files = any(r.get("model_bytes") for r in w["runs"].values())
    if files:
        mem_head += ["process peak MB", "model file MB"]
    time_lines, mem_lines = [], []
    for r in rows(w):
        trained = (f"{r['trained'] / r['total'] * 100:.2f}%" if r["trained"] is not None and r["total"] else "–")
        if r["error"]:
            failed = f"**failed**: {r['error'][:160]}"
            time_lines.append([r["scheme"], r["system"], trained, failed] + ["–"] * (len(time_head) - 4))
            mem_lines.append([r["scheme"], r["system"], failed] + ["–"] * (len(mem_head) - 3))
            continue
        time_lines.append([
            r["scheme"], r["system"], trained,
            f"{_fmt_ms(r['median_s'])} ({_fmt_ms(r['min_s'])}–{_fmt_ms(r['max_s'])})",
            f"{r.get('throughput', 0):.1f}", _cell(r["setup_s"], ".1f"),
            f"{r['flops'] / 1e9:.2f}" if r["flops"] else "–",
            _fmt_ms(r["floor_s"]), _cell(r.get("floor_fraction"), ".2f"),
            _ratio(r["time_vs_eager_full"], 1), _ratio(r["time_vs_eager_same"], 1),
            _ratio(r["time_vs_best_other"], 1), _cell(r["first_loss"], ".5f")])
        mem_lines.append([
            r["scheme"], r["system"],
            _cell(r["mem_mb"], ".0f") if r["mem_mb"] is not None or not r["memory_error"] else "failed",
            RESIDENT_STEP.get(base_system(r["system"])) or _cell(r["step_mb"], ".1f"),
            _cell(r["tracked_mb"], ".1f"), _cell(r["predicted_mb"], ".1f"),
            _ratio(r["mem_vs_eager_full"], 1), _ratio(r["mem_vs_best_other"], 1),
            _ratio(r["step_mem_vs_eager_same"], 1)]
            + ([_cell(r["peak_rss_mb"], ".0f"), _cell(r["model_mb"], ".1f")] if files else []))
    return _table(time_head, time_lines) + "\n\n" + _table(mem_head, mem_lines)


def _peers(ours: str, peer: str) -> bool:
    """Whether the peer table divides `ours` by `peer`: every other system, and pockengine's ONNX runner by
    everything but the torch backend (which is divided by the runner already)."""
    a, b = base_system(ours), base_system(peer)
    return a in OURS and a != b and not (a == "pockengine-onnx" and b == "pockengine")


def peer_table(w: dict[str, Any]) -> str | None:
    """pockengine and its ONNX runner (and their variants) ÷ every other system on the same scheme: step time, step
    memory (resident and tracked), and train mem where the ONNX runner is in it; None when no scheme has both."""
    ok = [r for r in rows(w) if not r["error"]]
    train = any(base_system(r["system"]) == "pockengine-onnx" for r in ok)
    head = ["scheme", "pockengine", "peer", "step time ÷ peer", "step mem ÷ peer", "step tracked ÷ peer"]
    head += ["train mem ÷ peer"] if train else []
    lines = [[ours["scheme"], ours["system"], peer["system"], _ratio(ours["median_s"], peer["median_s"]),
              _ratio(ours["step_mb"], peer["step_mb"]), _ratio(ours["tracked_mb"], peer["tracked_mb"])]
             + ([_ratio(ours["mem_mb"], peer["mem_mb"])] if train else [])
             for ours in ok for peer in ok if peer["scheme"] == ours["scheme"] and _peers(ours["system"], peer["system"])]
    return _table(head, lines) if lines else None


def headline(results: dict[str, Any]) -> str:
    """pockengine against PyTorch eager with the same trainable set, per workload and scheme, and the fastest and
    the leanest system of each scheme."""
    head = ["workload", "scheme", "trained", "pockengine step ms", "÷ eager", "step mem MB", "÷ eager",
            "step tracked MB", "÷ eager", "fastest system", "least train mem"]
    lines = []
    for name, w in results["workloads"].items():
        by_scheme: dict[str, list[dict[str, Any]]] = {}
        for r in rows(w):
            by_scheme.setdefault(r["scheme"], []).append(r)
        for scheme, rs in by_scheme.items():
            ours = next((r for r in rs if r["system"] == "pockengine"), None)
            if ours is None:
                continue
            timed = [r for r in rs if r["median_s"] and not r["error"]]
            sized = [r for r in rs if r["mem_mb"] is not None and not r["error"]]
            fastest = min(timed, key=lambda r: r["median_s"], default=None)
            leanest = min(sized, key=lambda r: r["mem_mb"], default=None)
            trained = f"{ours['trained'] / ours['total'] * 100:.2f}%" if ours["trained"] and ours["total"] else "–"
            lines.append([name, scheme, trained, "failed" if ours["error"] else _fmt_ms(ours["median_s"]),
                          _ratio(ours["time_vs_eager_same"], 1), _cell(ours["step_mb"], ".1f"),
                          _ratio(ours["step_mem_vs_eager_same"], 1), _cell(ours["tracked_mb"], ".1f"),
                          _ratio(ours["tracked_vs_eager_same"], 1),
                          f"{fastest['system']} ({_fmt_ms(fastest['median_s'])} ms)" if fastest else "–",
                          f"{leanest['system']} ({leanest['mem_mb']:.0f} MB)" if leanest else "–"])
    return _table(head, lines)


