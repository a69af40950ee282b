"""The plot of the report (bench.png): step time and training memory per system and scheme, one row per workload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report.tables import rows, system_rank
from bench.variants import base_system


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ws = list(results["workloads"].values())
    # every system run of the report (the legend), variants (hatched, in their system's colour) after their system
    systems = sorted({r["system"] for w in ws for r in rows(w)}, key=system_rank)
    fig, axes = plt.subplots(len(ws), 2, figsize=(14, 3.6 * len(ws)), squeeze=False)
    colors = {"pockengine": "#d62728", "pockengine-onnx": "#e377c2", "eager": "#1f77b4", "torch.compile": "#2ca02c",
              "ort": "#9467bd", "executorch": "#8c564b", "peft-lora": "#ff7f0e"}
    for i, w in enumerate(ws):
        rs = rows(w)
        schemes = list(dict.fromkeys(r["scheme"] for r in rs))
        present = [s for s in systems if any(r["system"] == s for r in rs)]  # this workload's bars, centred
        width = 0.8 / len(present)
        for col, (field, label) in enumerate([("median_s", "step time (ms, median; bars: min–max)"),
                                              ("mem_mb", "training memory (MB over runtime)")]):
            ax = axes[i][col]
            ys_all: list[float] = []
            for j, system in enumerate(present):
                xs, ys, lo, hi, failed = [], [], [], [], []
                for k, scheme in enumerate(schemes):
                    r = next((r for r in rs if r["scheme"] == scheme and r["system"] == system), None)
                    if r is None:
                        continue
                    x = k + (j - len(present) / 2 + 0.5) * width
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
                ax.bar(xs, ys, width, color=colors[base_system(system)], label=system, hatch=_hatch(system),
                       yerr=[lo, hi] if field == "median_s" and xs else None, capsize=2)
                for x in failed:
                    ax.text(x, 0, "×", color=colors[base_system(system)], ha="center", va="bottom", fontsize=12)
            ax.set_xticks(range(len(schemes)), schemes)
            ax.set_xlim(-0.6, len(schemes) - 0.4)
            ax.set_title(f"{w['workload']}: {label}", fontsize=10)
            if field == "median_s" and ys_all:
                ax.set_ylim(0, 1.15 * max(ys_all))  # a long max whisker (a stall) may run off the top
            ax.grid(axis="y", alpha=0.3)
    handles = [Patch(facecolor=colors[base_system(s)], hatch=_hatch(s), label=s) for s in systems]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(systems), 7), fontsize=9, bbox_to_anchor=(0.5, 0.995))
    fig.suptitle("pockengine benchmark (× = failed)", fontsize=11, y=0.965)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)




def _hatch(system: str) -> str | None:
    return None if base_system(system) == system else "//"
