"""The report's prose: the introduction (how it was made, the machine, what the summary's columns mean), each
workload's paragraph, notes and scheme list, and the Method section, for the device the results were measured on."""

from __future__ import annotations

import json
from typing import Any

from bench.report.tables import peer_table, rows, table
from bench.variants import base_system, parse_system

# What a variant's option (bench/systems.py) changes, for the notes under its workload's tables.
OPTION_MEANINGS = {
    "attn=eager": "the model with Hugging Face's `attn_implementation=\"eager\"` (attention as matrix products and "
                  "softmax, keeping the probabilities for the backward pass); the plain row runs it as loaded, with "
                  "`sdpa` (PyTorch's fused attention kernels)",
    "attn=sdpa": "the model with Hugging Face's `attn_implementation=\"sdpa\"` (PyTorch's fused attention kernels)",
    "attention=math": "pockengine's attention forced to its math form (`pe.compile(attention=\"math\")`); the plain "
                      "row runs `attention=\"auto\"`, which chooses per shape",
    "attention=flash": "pockengine's attention forced to the fused flash kernels (`pe.compile(attention=\"flash\")`); "
                       "the plain row runs `attention=\"auto\"`, which chooses per shape",
    "attention=auto": "pockengine choosing its attention kernels per shape (`pe.compile(attention=\"auto\")`)",
}


def variant_notes(w: dict[str, Any]) -> list[str]:
    """One line per system variant of the workload: what its options change."""
    out = []
    for system in dict.fromkeys(r["system"] for r in w["runs"].values()):
        options = parse_system(system)[1]
        if options:
            meaning = "; ".join(OPTION_MEANINGS.get(f"{k}={v}", f"option {k}={v}") for k, v in options.items())
            out.append(f"- `{system}`: {meaning}.")
    return out


def notes(w: dict[str, Any]) -> list[str]:
    out = variant_notes(w) + [f"- {system}: not run: {why}" for system, why in w.get("excluded", {}).items()]
    out += [f"- {key.replace('|', ' on ')}: not run: {why}" for key, why in w.get("not_runnable", {}).items()]
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
        if base_system(r["system"]) in ("pockengine", "torch.compile") and ours and eager:
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
  counted (above each table). Then: {warmup} warm-up steps (the first one is part of the set-up time; pockengine's
  set-up is a cold compile: its capture cache is off, so torch.export runs in every process; a warm one:
  `python -m bench.compile_time`, docs/benchmarks/compile-time), then
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
{ondevice}- **Ratios** divide a system's figure by PyTorch eager full fine-tuning's (same workload), and by the best *other*
  system on the same scheme; below 1 is better. PEFT LoRA (r=8 on the attention query/value projections; MiniLM's
  new classifier head trained too, as PEFT's sequence-classification task does) has its own trainable set: it is
  compared to eager full fine-tuning only.
"""

ONDEVICE = """\
- **On-device runtimes.** `pockengine-onnx` is pockengine's compiled step (same scheme and optimizer as
  `pockengine`) exported as one ONNX model (`trainer.export_onnx`) and trained by `pockengine.runtime.onnx` on the
  `onnxruntime` package, in a child process that imports no torch: its train mem is that process's VmHWM − its RSS
  with numpy, onnxruntime and the runner loaded, and *process peak* the whole VmHWM, libraries included (the
  others' processes hold torch). `executorch` is ExecuTorch's training (`_export_forward_backward`,
  `to_edge(...).to_executorch()`, `_load_for_executorch_for_training_from_buffer`, `get_sgd_optimizer` with
  momentum 0.9) in its own environment; its CPU kernels run on one thread (the calling one: in the runs here its
  other threads stayed idle, per /proc/PID/task). It trains whole tensors chosen by
  `requires_grad`, so schemes with partial channels are listed as not run. *model file* is what each trains from:
  the .onnx and its .init.safetensors, ORT's training and optimizer models and checkpoint, the .pte program.
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
    systems = {base_system(r["system"]) for w in results["workloads"].values() for r in w["runs"].values()}
    figures["ondevice"] = ONDEVICE if systems & {"pockengine-onnx", "executorch"} else ""
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


def _summary_text(step_mem: str, outside_tracker: str) -> str:
    """What the summary's columns mean; the two memory figures are read differently on each device."""
    return ("pockengine's step against PyTorch eager training exactly the same parameters (ratios below 1: faster, "
            f"smaller); *step mem* is what a step allocates {step_mem}, see Method); *step tracked* is the peak of "
            "live tensor storage during one step, seen at the dispatcher (the same tracker for both; "
            f"{outside_tracker}). Full tables per workload below.")


def introduction(results: dict[str, Any]) -> list[str]:
    """How the report was made, the machine, and what the summary's memory columns mean, for the device measured."""
    m = results["machine"]
    if results.get("device", "cpu") == "cpu":
        return ["Generated by `python -m bench` (the benchmark package bench/ of the repository, with its "
                "configuration), run from the repository root; rerunning the command below rewrites this file, "
                "`results.json` and `bench.png` (`python -m bench.report docs/benchmarks` redraws the tables and the "
                "plot from `results.json`). `--quick` is the CI smoke test and writes under `.cache/bench/quick` "
                "instead; `--device cuda` runs pockengine, eager and torch.compile on a GPU and writes "
                "docs/benchmarks/cuda.",
                "",
                f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; torch {m['torch']}, transformers "
                f"{m.get('transformers', '?')}, peft {m.get('peft', '?')}, onnxruntime-training "
                f"{m.get('onnxruntime-training', '?')}"
                + "".join(f", {k} {m[k]}" for k in ("onnxruntime", "executorch") if k in m)
                + f"; Python {m['python']}.", "",
                "## Summary", "",
                _summary_text("above the weights and optimizer state (peak RSS during the steps minus RSS before "
                              "them", "allocator arenas and oneDNN's reordered weight copies are outside it, and so "
                              "the RSS figure can sit a few MB above it")]
    return ["Generated by `python -m bench --device cuda` (the benchmark package bench/ of the repository, with its "
            "configuration) on a GPU; rerunning the command below rewrites this file, `results.json` and `bench.png` "
            "in its folder (docs/benchmarks/cuda unless `--out` names another) and never the CPU tables of "
            "docs/benchmarks (`python -m bench.report FOLDER` redraws the tables and the plot from `results.json`).",
            "",
            f"Machine: {m['gpu']} ({m['gpu_memory_gb']} GB), NVIDIA driver {m.get('driver') or '?'}, torch "
            f"{m['torch']} built for CUDA {m['cuda']}, cuDNN {m['cudnn']}; host {m['cpu']}, {m['cores']} cores, "
            f"{m['memory_gb']} GB; transformers {m.get('transformers', '?')}, peft {m.get('peft', '?')}; Python "
            f"{m['python']}.", "",
            "## Summary", "",
            _summary_text("on the GPU above the weights and optimizer state (the caching allocator's peak of "
                          "allocated bytes during the steps minus the bytes allocated before them", "cuDNN's and "
                          "cuBLAS's workspaces come from the allocator but not from an ATen op, so the allocator's "
                          "figure can sit above it")]


def workload_section(name: str, w: dict[str, Any], command: str) -> list[str]:
    """A workload's heading, the paragraph on how it was measured (with the command), its two tables, its notes
    and its schemes."""
    c = w["config"]
    sizes = ", ".join(f"{k.replace('_', ' ')} {c[k]}" for k in ("batch", "image_size", "seq_len", "layers")
                      if c.get(k))
    parts = [f"## {name}" + (" (quick smoke-test sizes)" if w["quick"] else ""), "",
             (f"{w['description']} — run here at --quick sizes: {sizes}. " if w["quick"] else
              f"{w['description']}. ") + f"{w['steps']} measured steps after {w['warmup']} warm-up steps; "
             f"{w['items_per_step']} {w['unit']} per step; measured {w['finished']} "
             + (f"with pockengine {w['code']} " if w.get("code") else "") +
             f"(load average {w['loadavg_start'][0]:.2f} at the start, {w['loadavg_end'][0]:.2f} at the end; "
             f"the gate before each step (at most {0 if w['quick'] else c['max_wait_s']} s) waited "
             f"{w.get('quiet_gate', {}).get('waited_s', 0):.0f} s in all "
             f"for other processes, and {w.get('quiet_gate', {}).get('busy_steps', 0)} measured steps started "
             "on a busy machine after all). "
             f"Command: `{command}`", "", table(w), ""]
    peers = peer_table(w)
    if peers and any(r["system"] == "pockengine-onnx" for r in w["runs"].values()):
        parts += ["pockengine and its ONNX runner ÷ each other system on the same scheme (below 1: faster, smaller; "
                  "*step mem* from the resident set, *step tracked* from the dispatcher, *train mem* as in the tables "
                  "above; `pockengine` ÷ `pockengine-onnx` is the torch backend ÷ the ONNX runner):", "", peers, ""]
    elif peers:
        parts += ["pockengine ÷ each other system on the same scheme (below 1: pockengine faster, smaller; *step mem* "
                  "from the resident set, *step tracked* from the dispatcher, as in the tables above):", "", peers, ""]
    ns = notes(w)
    if ns:
        parts += ["Notes:", ""] + ns + [""]
    parts += ["Schemes (trained share of the parameters):", ""]
    for s, info in w["schemes"].items():
        share = info["trained_entries"] / info["total_entries"] * 100
        parts.append(f"- `{s}`: {info['trained_tensors']} tensors, {info['trained_entries']:,} of "
                     f"{info['total_entries']:,} entries ({share:.2f}%); rules `{json.dumps(info['rules'])}`")
    parts.append("")
    return parts
