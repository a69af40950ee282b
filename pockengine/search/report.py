"""The search's report: the chosen scheme as a scheme file, a markdown table of every candidate, and PNG plots
(the gain of every candidate, the chosen scheme over the layers, predicted and measured cost against the budget)."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import yaml

from pockengine.scheme import Scheme
from pockengine.search.analysis import Analysis
from pockengine.search.candidates import block_of
from pockengine.search.search import SearchResult, mb
from pockengine.storage import atomic_path


@dataclass
class SearchReport:
    analysis: Analysis
    result: SearchResult
    files: dict[str, Path] = field(default_factory=dict)  # what `write` wrote, by kind

    @property
    def scheme(self) -> Scheme:
        return self.result.scheme

    @property
    def lr(self) -> float:
        return self.result.lr

    def summary(self) -> str:
        r, c = self.result, self.result.chosen
        weights = ", ".join(f"{layer} @ {ratio}" for layer, ratio in r.ratios.items()) or "none"
        return (f"chosen: biases of the last {r.k} of {len(self.analysis.structure.blocks)} blocks, classifier "
                f"{self.analysis.structure.classifier}, weights: {weights}; learning rate {r.lr:g}\n"
                f"predicted: gain {c.predicted_gain:+.4f}, memory {mb(c.predicted_memory)}, {c.predicted_ms:.1f} ms "
                f"per step\nmeasured: {self.analysis.metric} {c.measured.metric:.4f} after {self.analysis.steps} "
                f"steps, memory {mb(c.measured.memory)} planned / {mb(c.measured.tracked_memory)} tracked, "
                f"{c.measured.step_ms:.1f} ms per step; budget: "
                f"{mb(r.memory_budget) if r.memory_budget else '-'}, "
                f"{f'{r.time_budget_ms:g} ms' if r.time_budget_ms else '-'}")

    def markdown(self) -> str:
        a, r = self.analysis, self.result
        lines = [f"# Scheme search: {a.task}", "",
                 f"Analysis: {len(a.bias)} bias candidates, {len(a.weights)} weight candidates, {a.steps} steps each "
                 f"(seed {a.seed}{', quick' if a.quick else ''}); {a.metric} of the pretrained model before training: "
                 f"{a.metric_before:.4f}. "
                 + (f"Warm-up: the classifier alone, {a.warmup.steps} steps at {a.warmup.lr:g}, the best of "
                    f"{_trials(a.warmup.trials)}; every candidate starts from it. " if a.warmup else
                    "No warm-up: every candidate starts from the pretrained model. ")
                 + f"Learning rates (AdamW): every bias candidate at {a.bias_lr:g}, the best "
                 f"for the biases of every block ({_trials(a.bias_lr_trials)}); each weight candidate at its own "
                 f"best of the same grid (column lr). "
                 f"This run: {a.seconds:.0f} s analysis ({a.cpu_seconds:.0f} s CPU; {a.trained} runs trained, the "
                 f"rest cached), {r.seconds:.0f} s search ({r.cpu_seconds:.0f} s CPU)"
                 + (f" (incl. the rate of the chosen scheme, tuned over {r.lr_steps} steps on the validation split: "
                    + ", ".join(f"{lr:g}: {m:.4f}" for lr, m in r.lr_trials.items()) + ")" if r.lr_trials else "")
                 + (f"; {len(r.proposals)} proposals verified over {r.lr_steps} steps each (below)" if r.proposals
                    else "")
                 + ".", "", "```", self.summary(), "```", ""]
        if r.proposals:
            lines += ["## Proposals verified", "",
                      f"The search at each shrinkage of the weights' gains toward their ratio's mean (0: as measured; "
                      f"1: the mean alone), each distinct scheme trained from the pretrained model for {r.lr_steps} "
                      f"steps at each rate tried; the best {a.metric} on the validation split is kept, then its "
                      "rate refined at the midpoints between its best rate and the neighbouring ones.", "",
                      "| shrinkage | k | weights | predicted gain | measured memory (planned / tracked) | "
                      f"{a.metric} by rate ({r.lr_steps} steps) | best | chosen |", "|---|---|---|---|---|---|---|---|"]
            for p in r.proposals:
                c = p.chosen
                lines.append(f"| {p.shrink:g} | {p.k} | {len(p.ratios)} | {c.predicted_gain:+.4f} | "
                             f"{mb(c.measured.memory)} / {mb(c.measured.tracked_memory)} | "
                             + ", ".join(f"{lr:g}: {m:.4f}" for lr, m in p.lr_trials.items())
                             + f" | {p.lr_trials[p.lr]:.4f} at {p.lr:g} | {'**yes**' if p is r else ''} |")
            lines.append("")
            lines += [f"- shrinkage {p.shrink:g}: biases of the last {p.k} blocks; weights: "
                      + (", ".join(f"{layer} @ {ratio}" for layer, ratio in p.ratios.items()) or "none")
                      for p in r.proposals]
            lines.append("")
        lines += ["## Rounds", "", "Of the chosen scheme's search.", "",
                 "| round | k | weights | predicted gain | predicted memory | measured memory (planned / tracked) "
                 "| predicted ms | measured ms | within |", "|---|---|---|---|---|---|---|---|---|"]
        for i, rd in enumerate(r.rounds, 1):
            lines.append(f"| {i} | {rd.k} | {len(rd.ratios)} | {rd.predicted_gain:+.4f} | {mb(rd.predicted_memory)} | "
                         f"{mb(rd.measured.memory)} / {mb(rd.measured.tracked_memory)} | {rd.predicted_ms:.1f} | "
                         f"{rd.measured.step_ms:.1f} | {'yes' if rd.within else 'no'} |")
        lines += ["", "## Candidates", "",
                  "Bias rows: absolute cost; weight rows: cost over the weight baseline (biases of every block); "
                  "alone: the compiler's plan of the weight trained alone with the classifier, no biases (at its "
                  "largest ratio), which prices reaching it.", "",
                  f"| candidate | lr | {a.metric} | gain | trained entries | memory | tracked memory | alone | "
                  "ms/step | MFLOP/step | chosen |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in a.rows():
            chosen = (row["k"] == r.k) if row["kind"] == "bias" else r.ratios.get(row["layer"]) == row["ratio"]
            lines.append(f"| {row['candidate']} | {row['lr']:g} | {row['metric']:.4f} | {row['gain']:+.4f} | "
                         f"{row['trained']} | {mb(row['memory'])} | {mb(row['tracked_memory'])} | "
                         f"{'' if row.get('alone_memory') is None else mb(row['alone_memory'])} | "
                         f"{row['step_ms']:.1f} | "
                         f"{row['flops'] / 1e6:.1f} | {'**yes**' if chosen else ''} |")
        if self.files:
            lines += ["", *[f"![{kind}]({path.name})" for kind, path in self.files.items() if path.suffix == ".png"]]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """scheme.yaml (for `pockengine train --scheme`), report.md and the plots, each written atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.files = {"scheme": out / "scheme.yaml", "gains": out / "gains.png", "scheme_plot": out / "scheme.png",
                      "costs": out / "costs.png", "report": out / "report.md"}
        with atomic_path(self.files["scheme"]) as tmp:
            tmp.write_text(yaml.safe_dump(self.scheme.to_dict(), sort_keys=False))
        _plots(self.analysis, self.result, self.files)
        with atomic_path(self.files["report"]) as tmp:
            tmp.write_text(self.markdown())
        return self.files


def _trials(trials: dict[float, float]) -> str:
    return ", ".join(f"{lr:g}: {metric:.3f}" for lr, metric in trials.items())


def _plots(a: Analysis, r: SearchResult, files: dict[str, Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = a.rows()
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(rows)), 4))
    colors = ["tab:orange" if row["kind"] == "bias" else "tab:blue" for row in rows]
    ax.bar(range(len(rows)), [row["gain"] for row in rows], color=colors)
    ax.set_xticks(range(len(rows)), [row["candidate"] for row in rows], rotation=90, fontsize=6)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel(f"gain in {a.metric}")
    ax.set_title("gain of each candidate\norange: biases of the last k blocks; blue: one weight at a ratio "
                 "(over the biases of every block)", fontsize=9)
    _save(fig, files["gains"])

    weights = a.structure.weights
    fig, ax = plt.subplots(figsize=(max(6, 0.15 * len(weights)), 3.5))
    ax.bar(range(len(weights)), [float(r.ratios.get(w, Fraction(0))) for w in weights], color="tab:blue",
           label="weight: trained ratio of channels")
    biased = set(a.structure.blocks[len(a.structure.blocks) - r.k:])
    for i, w in enumerate(weights):
        if block_of(w) in biased:
            ax.axvspan(i - 0.5, i + 0.5, color="tab:orange", alpha=0.15, linewidth=0)
    ax.set_xticks(range(len(weights)), weights, rotation=90, fontsize=5)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("ratio")
    ax.set_title(f"chosen scheme over the weights (shaded: their block's biases trained)\nclassifier "
                 f"{a.structure.classifier}: trained fully", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, files["scheme_plot"])

    budgeted = [(name, budget, pred, meas) for name, budget, pred, meas in (
        ("memory (MB)", r.memory_budget and r.memory_budget / 2 ** 20, r.chosen.predicted_memory / 2 ** 20,
         max(r.chosen.measured.memory, r.chosen.measured.tracked_memory) / 2 ** 20),
        ("step time (ms)", r.time_budget_ms, r.chosen.predicted_ms, r.chosen.measured.step_ms)) if budget]
    fig, axes = plt.subplots(1, len(budgeted), figsize=(4 * len(budgeted), 3.5), squeeze=False)
    for ax, (name, budget, pred, meas) in zip(axes[0], budgeted):
        ax.bar(["predicted", "measured"], [pred, meas], color=["tab:gray", "tab:green"])
        ax.axhline(budget, color="tab:red", linestyle="--", label=f"budget {budget:.2f}")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.suptitle("chosen scheme: cost against the budget")
    _save(fig, files["costs"])


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
