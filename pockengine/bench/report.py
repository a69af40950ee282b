"""Markdown tables and a plot from results.json (rewritten in full on every run, so rerunning regenerates all)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SYSTEMS = ["pockengine", "eager", "torch.compile", "ort", "peft-lora"]
MB = 1024  # KiB per MiB


def _fmt_ms(s: float | None) -> str:
    return "–" if s is None else f"{s * 1000:.1f}" if s < 10 else f"{s * 1000:.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b in (None, 0) else f"{a / b:.2f}"


def training_mb(run: dict[str, Any]) -> float | None:
    """Peak resident memory during the measured steps above the process's runtime baseline (libraries loaded, no
    model yet), in MiB. On a GPU: the peak of allocated bytes over the whole process, set-up included (nothing is
    on the GPU before the model)."""
    if "cuda_peak_bytes" in run:
        return max(run["cuda_setup_peak_bytes"], run["cuda_peak_bytes"]) / 2 ** 20
    if "peak_rss_kb" not in run or "baseline_rss_kb" not in run:
        return None
    return (run["peak_rss_kb"] - run["baseline_rss_kb"]) / MB


# ONNX Runtime keeps what a step frees in its arena for the next step: the step's memory is already resident before
# the measured steps, so only its train mem compares.
ARENA_SYSTEMS = {"ort"}


def step_mb(run: dict[str, Any]) -> float | None:
    """Peak resident memory during the measured steps above the resident memory just before them, in MiB: what a
    step allocates on top of what lives across steps (weights, optimizer state, runtime). On a GPU the same from
    the caching allocator's counts of allocated bytes."""
    if "cuda_peak_bytes" in run:
        return (run["cuda_peak_bytes"] - run["cuda_before_bytes"]) / 2 ** 20
    if "peak_rss_kb" not in run or "mem_before_kb" not in run or run["system"] in ARENA_SYSTEMS:
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
    out.sort(key=lambda r: (order.get(r["scheme"], 99), SYSTEMS.index(r["system"]) if r["system"] in SYSTEMS else 9))
    return out


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _table(head: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |" for cells in lines]
    return "\n".join(out)


def table(w: dict[str, Any]) -> str:
    """Two tables: time, then memory."""
    unit = "samples/s" if w["unit"] == "samples" else "tokens/s"
    time_head = ["scheme", "system", "trained", "step ms median (min–max)", unit, "set-up s", "GFLOP/step",
                 "floor ms", "floor/time", "time ÷ eager full", "time ÷ eager same scheme", "time ÷ best other",
                 "1st loss"]
    mem_head = ["scheme", "system", "train mem MB", "step mem MB", "step tracked MB", "step predicted MB",
                "train mem ÷ eager full", "train mem ÷ best other", "step mem ÷ eager same scheme"]
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
            "arena" if r["system"] in ARENA_SYSTEMS else _cell(r["step_mb"], ".1f"),
            _cell(r["tracked_mb"], ".1f"), _cell(r["predicted_mb"], ".1f"),
            _ratio(r["mem_vs_eager_full"], 1), _ratio(r["mem_vs_best_other"], 1),
            _ratio(r["step_mem_vs_eager_same"], 1)])
    return _table(time_head, time_lines) + "\n\n" + _table(mem_head, mem_lines)


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


def notes(w: dict[str, Any]) -> list[str]:
    out = [f"- {system}: not run: {why}" for system, why in w.get("excluded", {}).items()]
    seen = set()
    for r in rows(w):
        for n in r["notes"]:
            if (r["system"], n) not in seen:
                seen.add((r["system"], n))
                out.append(f"- {r['system']} ({r['scheme']}): {n}")
        if r["memory_error"]:
            out.append(f"- {r['system']} on {r['scheme']}: memory pass failed: {r['memory_error'][:300]}")
        if r["error"]:
            out.append(f"- {r['system']} on {r['scheme']} **failed**: {r['error'][:600]}")
        ours = w["runs"].get(f"{r['system']}|{r['scheme']}", {}).get("losses") or []
        eager = w["runs"].get(f"eager|{r['scheme']}", {}).get("losses") or []
        if r["system"] in ("pockengine", "torch.compile") and ours and eager:
            drift = [abs(a - b) / max(abs(b), 1e-6) for a, b in zip(ours, eager)]
            if max(drift) > 1e-3:
                k = next(i for i, d in enumerate(drift) if d > 1e-3)
                out.append(f"- {r['system']} on {r['scheme']}: losses leave eager's from step {k + 1} (step {k + 1}: "
                           f"{ours[k]:.5f} vs {eager[k]:.5f}; largest relative difference {max(drift):.1e})")
        fl, fe = r["first_loss"], r["first_loss_eager"]
        if fl is not None and fe is not None and abs(fl - fe) > 1e-4 * max(1.0, abs(fe)):
            out.append(f"- {r['system']} on {r['scheme']}: first-step loss {fl:.6f} differs from eager's {fe:.6f}")
    return out


METHOD = """\
## Method

- **One run, alternating.** Each (system, scheme) is its own process ({processes}; set-up times never include
  imports). In the timing pass the processes of a group
  (the whole workload, or one scheme for SmolLM2, whose 17 processes would not fit in memory together) are set up one
  after another, then take steps in turn (A B C … A B C …) with a {pause}s idle gap between steps, so that drift of
  the machine hits every system alike. The machine is shared: the gap is extended (up to `max_wait_s`, given above
  each table) while less than 85% of the CPU time is idle in it, i.e. while other processes are busy, and steps that start busy anyway are
  counted (above each table). Then: {warmup} warm-up steps (the first one is part of the set-up time), then
  {steps} measured steps; step time is median, min and max of those. The step is what each system's user runs: for
  PyTorch forward, loss, backward, gradient masks, `optimizer.step()`, `zero_grad`; for pockengine `trainer.step`;
  for ONNX Runtime `module(...)`, `optimizer.step()`, `lazy_reset_grad()`; each returns the loss as a float.{sync}
- **Same work for everyone.** Same weights, the same cycle of {batches} real batches, {precision}, SGD with momentum 0.9 and the same learning rate, and the
  same trainable set: each scheme is resolved once (`Scheme.resolve`) and every system trains exactly those
  parameters and channels. PyTorch (eager, torch.compile) trains partial channels by masking the gradient
  (`pockengine.scheme.gradient_masks`); ONNX Runtime, which trains whole tensors only, writes the untrained entries
  back after each step. Models run in eval mode (dropout off, BatchNorm statistics frozen) so that all systems compute
  the same function: their first-step losses (last column) must agree.
- **Memory.** {memory} *step tracked*
  is the same quantity seen at the dispatcher (`pockengine.memory.tracker`: peak live tensor
  storage created during one more step; not for torch.compile and ONNX Runtime, whose kernels allocate out of its
  sight), and *step predicted* is pockengine's static memory plan (`trainer.memory_plan()`) for that step.
- **Losses.** The first step's loss (last column of the time table) must agree across systems: the same function of
  the same weights and batch. Later losses drift apart as training amplifies floating-point differences (different
  kernels, summation orders, a folded BatchNorm); the notes under each table say from which step and how far, and
  torch.compile drifts from eager as much as pockengine does.
- **FLOPs and the floor.** GFLOP/step is counted by `torch.utils.flop_counter.FlopCounterMode` (matrix multiplies and
  convolutions, forward and backward) on an eager step with the same trainable set, and on pockengine's own step
  (which skips the work of untrained channels). *floor* = the smaller count ÷ this machine's best measured fp32
  matrix-multiply rate ({rate:.0f} GFLOP/s, {rate_how}): the time the step would take if
  all its arithmetic ran at matrix-multiply speed. *floor/time* reads each time as a fraction of that limit.
- **Ratios** divide a system's figure by PyTorch eager full fine-tuning's (same workload), and by the best *other*
  system on the same scheme; below 1 is better. PEFT LoRA (r=8 on the attention query/value projections; MiniLM's
  new classifier head trained too, as PEFT's sequence-classification task does) has its own trainable set: it is
  compared to eager full fine-tuning only.
"""

MEMORY_CPU = """\
A separate pass, one process at a time, with `MALLOC_MMAP_THRESHOLD_=65536` so that freed tensors go
  back to the OS (with glibc's defaults they stay resident and hide the peak; the setting slows steps, hence the
  separate pass). After {mwarm} warm-up steps the resident high-water mark is reset (`echo 5 > /proc/PID/clear_refs`)
  and VmRSS read, {msteps} steps run, and VmHWM is read. *train mem* = VmHWM − the RSS of the same process before the
  model was built, with its runtime libraries loaded (torch, transformers; torch.export for pockengine, dynamo and
  inductor for torch.compile, peft for LoRA, onnxruntime for ORT): weights, optimizer state, activations, gradients
  and workspaces, and whatever a compiler keeps resident (its graphs, generated code, caches). *step mem* = VmHWM − the RSS
  just before the measured steps: what a step allocates on top of everything that lives across steps (weights
  excluded; not for ONNX Runtime, whose arena keeps a step's memory resident between steps: *arena*)."""

MEMORY_CUDA = """\
Measured by the timing processes themselves, from the CUDA caching allocator, which counts the
  tensor bytes of its own process (no resident-set pass and no `MALLOC_MMAP_THRESHOLD_` on the GPU: host memory is
  not what a GPU step spends). After the set-up's first step the peak statistics are reset
  (`torch.cuda.reset_peak_memory_stats()`) and `torch.cuda.memory_allocated()` read; after the last round of
  steps (warm-up and measured) `torch.cuda.max_memory_allocated()` is read. *step mem* = that peak − the bytes
  allocated before: what a step allocates on top of everything that lives across steps (weights, optimizer state; cuDNN and cuBLAS workspaces
  included, since they come from the same allocator). *train mem* = the peak of allocated bytes over the whole
  process, set-up included (nothing is on the GPU before the model): weights, optimizer state, activations,
  gradients, workspaces, and whatever a compiler allocates on the GPU while it compiles or tunes. The allocator's
  reserved-but-free cache and the CUDA context are in neither."""


def method(results: dict[str, Any]) -> str:
    """The Method section, for the device the results were measured on."""
    any_w = next(iter(results["workloads"].values()))
    cfg = any_w["config"]
    figures = dict(pause=cfg["pause_s"], warmup=any_w["warmup"], steps=any_w["steps"], batches=cfg["batches"],
                   threads=cfg["threads"], mwarm=any_w["memory_warmup"], msteps=any_w["memory_steps"],
                   rate=any_w["matmul_flops_per_s"] / 1e9)
    if results.get("device", "cpu") == "cpu":
        return METHOD.format(**figures, sync="", memory=MEMORY_CPU.format(**figures),
                             processes="in the timing pass forked from a server that has imported the libraries once",
                             precision=("fp32, {threads} threads\n  (`torch.set_num_threads`, ORT "
                                        "`intra_op_num_threads`)").format(**figures),
                             rate_how="{threads} threads, 2048² `torch.mm`".format(**figures))
    return METHOD.format(**figures, memory=MEMORY_CUDA,
                         processes="a new interpreter each, as CUDA cannot be used in a process forked after it was "
                                   "initialized",
                         sync=("\n  On the GPU every step is fenced by `torch.cuda.synchronize()` before and after, so "
                               "that its time\n  covers the kernels it queued, not only their launch."),
                         precision=("fp32 with TensorFloat-32 off\n  (cuDNN and cuBLAS alike: a 1x1 convolution rounds "
                                    f"the same as a convolution and as a matrix multiply), {cfg['threads']} host "
                                    "threads (`torch.set_num_threads`)"),
                         rate_how=f"{any_w.get('matmul_n', 2048)}² `torch.mm` on the GPU")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ws = list(results["workloads"].values())
    fig, axes = plt.subplots(len(ws), 2, figsize=(14, 3.6 * len(ws)), squeeze=False)
    colors = {"pockengine": "#d62728", "eager": "#1f77b4", "torch.compile": "#2ca02c", "ort": "#9467bd",
              "peft-lora": "#ff7f0e"}
    for i, w in enumerate(ws):
        rs = rows(w)
        schemes = list(dict.fromkeys(r["scheme"] for r in rs))
        width = 0.8 / len(SYSTEMS)
        for col, (field, label) in enumerate([("median_s", "step time (ms, median; bars: min–max)"),
                                              ("mem_mb", "training memory (MB over runtime)")]):
            ax = axes[i][col]
            ys_all: list[float] = []
            for j, system in enumerate(SYSTEMS):
                xs, ys, lo, hi, failed = [], [], [], [], []
                for k, scheme in enumerate(schemes):
                    r = next((r for r in rs if r["scheme"] == scheme and r["system"] == system), None)
                    if r is None:
                        continue
                    x = k + (j - len(SYSTEMS) / 2 + 0.5) * width
                    if r["error"] or r[field] is None:
                        failed.append(x)
                        continue
                    scale = 1000 if field == "median_s" else 1
                    xs.append(x)
                    ys.append(r[field] * scale)
                    if field == "median_s":
                        lo.append((r["median_s"] - r["min_s"]) * scale)
                        hi.append((r["max_s"] - r["median_s"]) * scale)
                ys_all += ys
                ax.bar(xs, ys, width, color=colors[system], label=system,
                       yerr=[lo, hi] if field == "median_s" and xs else None, capsize=2)
                for x in failed:
                    ax.text(x, 0, "×", color=colors[system], ha="center", va="bottom", fontsize=12)
            ax.set_xticks(range(len(schemes)), schemes)
            ax.set_title(f"{w['workload']}: {label}", fontsize=10)
            if field == "median_s" and ys_all:
                ax.set_ylim(0, 1.15 * max(ys_all))  # a long max whisker (a stall) may run off the top
            ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=colors[s], label=s) for s in SYSTEMS]
    fig.legend(handles=handles, loc="upper center", ncol=len(SYSTEMS), fontsize=9, bbox_to_anchor=(0.5, 0.995))
    fig.suptitle("pockengine bench (× = failed)", fontsize=11, y=0.965)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary_text(step_mem: str, outside_tracker: str) -> str:
    """What the summary's columns mean; the two memory figures are read differently on each device."""
    return ("pockengine's step against PyTorch eager training exactly the same parameters (ratios below 1: faster, "
            f"smaller); *step mem* is what a step allocates {step_mem}, see Method); *step tracked* is the peak of "
            "live tensor storage during one step, seen at the dispatcher (the same tracker for both; "
            f"{outside_tracker}). Full tables per workload below.")


def _introduction(results: dict[str, Any]) -> list[str]:
    """How the report was made, the machine, and what the summary's memory columns mean, for the device measured."""
    m = results["machine"]
    if results.get("device", "cpu") == "cpu":
        return ["Generated by `pockengine bench` (pockengine/bench/, configuration in bench/); rerunning the command "
                "below rewrites this file, `results.json` and `bench.png` (`python -m pockengine.bench.cli` takes the "
                "same options; `python -m pockengine.bench.report docs/benchmarks` redraws the tables and the plot "
                "from `results.json`). `--quick` is the CI smoke test and writes under `.cache/bench/quick` instead; "
                "`--device cuda` runs pockengine, eager and torch.compile on a GPU and writes docs/benchmarks/cuda.",
                "",
                f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; torch {m['torch']}, transformers "
                f"{m.get('transformers', '?')}, peft {m.get('peft', '?')}, onnxruntime-training "
                f"{m.get('onnxruntime-training', '?')}; Python {m['python']}.", "",
                "## Summary", "",
                _summary_text("above the weights and optimizer state (peak RSS during the steps minus RSS before "
                              "them", "allocator arenas and oneDNN's reordered weight copies are outside it, and so "
                              "the RSS figure can sit a few MB above it")]
    return ["Generated by `pockengine bench --device cuda` (pockengine/bench/, configuration in bench/) on a GPU; "
            "rerunning the command below rewrites this file, `results.json` and `bench.png` in docs/benchmarks/cuda "
            "and never the CPU tables of docs/benchmarks (`python -m pockengine.bench.report docs/benchmarks/cuda` "
            "redraws the tables and the plot from `results.json`).", "",
            f"Machine: {m['gpu']} ({m['gpu_memory_gb']} GB), NVIDIA driver {m.get('driver') or '?'}, torch "
            f"{m['torch']} built for CUDA {m['cuda']}, cuDNN {m['cudnn']}; host {m['cpu']}, {m['cores']} cores, "
            f"{m['memory_gb']} GB; transformers {m.get('transformers', '?')}, peft {m.get('peft', '?')}; Python "
            f"{m['python']}.", "",
            "## Summary", "",
            _summary_text("on the GPU above the weights and optimizer state (the caching allocator's peak of "
                          "allocated bytes during the steps minus the bytes allocated before them", "cuDNN's and "
                          "cuBLAS's workspaces come from the allocator but not from an ATen op, so the allocator's "
                          "figure can sit above it")]


def write(results: dict[str, Any], out: Path) -> None:
    out = Path(out)
    parts = ["# pockengine benchmarks", "", *_introduction(results), "", headline(results), "",
             "![step time and memory per system and scheme](bench.png)", ""]
    for name, w in results["workloads"].items():
        cmd = results.get("command", {}).get(name, f"pockengine bench --workload {name}")
        c = w["config"]
        sizes = ", ".join(f"{k.replace('_', ' ')} {c[k]}" for k in ("batch", "image_size", "seq_len", "layers")
                          if c.get(k))
        parts += [f"## {name}" + (" (quick smoke-test sizes)" if w["quick"] else ""), "",
                  (f"{w['description']} — run here at --quick sizes: {sizes}. " if w["quick"] else
                   f"{w['description']}. ") + f"{w['steps']} measured steps after {w['warmup']} warm-up steps; "
                  f"{w['items_per_step']} {w['unit']} per step; measured {w['finished']} "
                  + (f"with pockengine {w['code']} " if w.get("code") else "") +
                  f"(load average {w['loadavg_start'][0]:.2f} at the start, {w['loadavg_end'][0]:.2f} at the end; "
                  f"the gate before each step (at most {0 if w['quick'] else c['max_wait_s']} s) waited "
                  f"{w.get('quiet_gate', {}).get('waited_s', 0):.0f} s in all "
                  f"for other processes, and {w.get('quiet_gate', {}).get('busy_steps', 0)} measured steps started "
                  "on a busy machine after all). "
                  f"Command: `{cmd}`", "", table(w), ""]
        ns = notes(w)
        if ns:
            parts += ["Notes:", ""] + ns + [""]
        parts += ["Schemes (trained share of the parameters):", ""]
        for s, info in w["schemes"].items():
            share = info["trained_entries"] / info["total_entries"] * 100
            parts.append(f"- `{s}`: {info['trained_tensors']} tensors, {info['trained_entries']:,} of "
                         f"{info['total_entries']:,} entries ({share:.2f}%); rules `{json.dumps(info['rules'])}`")
        parts.append("")
    parts.append(method(results))
    (out / "README.md").write_text("\n".join(parts))
    plot(results, out / "bench.png")


if __name__ == "__main__":  # regenerate the report from a results.json: python -m pockengine.bench.report DIR
    d = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks")
    write(json.loads((d / "results.json").read_text()), d)
