"""The scheme with the largest summed gain under a memory budget, a time budget or both.

Pricing. Training anything in a block keeps the activations of that block and of every block after it for the
backward pass, so what a scheme costs is set by its earliest trained tensor, not by the sum of its parts. The
analysis gives, for every option, what reaching it costs (its *reach*): a bias option k its own measured cost; a
weight, in memory, the compiler's plan of that weight trained alone with the classifier (`Analysis.alone`) less its
own extra cost over the weight baseline (the memory of its gradient, optimizer state and kept input, measured over
the biases of every block, where the backward pass already reaches it), or the cost of an analysed bias option whose
blocks include its block where that is less; in time the fastest such bias option (the analysis times no weight
alone). A combination (bias option k, weights at ratios) is priced as the largest reach among its parts plus the
extra cost of each weight (an extra cost below zero, from measuring noise, counts as zero): a weight below the
trained biases is priced as deep as it is, a weight among them by its extra alone. In memory never dearer than the old
price of a weight inside the trained blocks (bias k's cost plus the extras), since a weight's reach is at most the cost
of any analysed bias option that includes its block.

Search. For each reach level (every option's reach memory, ascending), the options whose reach is within it form a
multiple-choice knapsack (`solver.py`): one group of the bias options within the level (gain: their measured gain;
cost: the level in memory; in time the larger of the option's own step and the slowest reach among the weights
allowed at that level), one group per allowed weight whose options are ratio 0 or one of the analysed ratios (gain
over the weight baseline; cost: the weight's extra). The best of the per-level optima is the answer: exact in memory
for the predicted costs (every combination is priced in full at the level of its deepest part), in time never
below the combination's own prediction.

Check. Peaks do not add exactly, so the chosen scheme is then compiled and trained: its planned and tracked memory
(step peak plus optimizer state, the compiler's `trainer.memory_plan()` for exactly that scheme) and its measured
step time are checked against the budgets, and the report shows each round's prediction next to them. A scheme over
a budget is not returned: the budget is tightened by the overshoot (and below that choice's prediction) and the
knapsack is solved again, up to `max_rounds` times; once no combination with weights is left, the best biases alone
whose analysed cost fits are taken.

Verification (`verify`). The gains of a few steps on a small validation split are within their noise, so the
knapsack's sum of them can prefer a combination for its luckiest weights. The search is run at a few strengths of
shrinkage (`shrunk_gains`: each weight's gain pulled toward the mean gain of the weights at its ratio, from 0, as
measured, to 1, that mean alone, where the analysis cannot tell weights of one ratio apart), which proposes distinct
schemes under the same budgets; each is trained for the run's own number of steps at a few rates (`tune_lr`) and
the one with the best validation metric is kept.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from fractions import Fraction

from pockengine.errors import UserInputError
from pockengine.scheme import Scheme
from pockengine.search.analysis import Analysis, Measurement, measure
from pockengine.search.candidates import block_of, build_scheme
from pockengine.search.solver import Option, solve
from pockengine.search.task import Task

MEMORY_GRID = 1024  # bytes: predicted memory is rounded up to KiB for the solver
TIME_GRID = 0.01  # ms


class BudgetTooSmallError(UserInputError):
    """No scheme fits the budget; the message says what the smallest one needs."""


_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kb": 2 ** 10, "kib": 2 ** 10, "m": 2 ** 20, "mb": 2 ** 20, "mib": 2 ** 20,
          "g": 2 ** 30, "gb": 2 ** 30, "gib": 2 ** 30}


def parse_memory(text: str | int | float) -> int:
    """Bytes from `4MB`, `512 KiB`, `1.5GB` or a number of bytes; KB, MB and GB are powers of 1024 (as MiB)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise UserInputError(f"cannot read the memory budget {text!r}; write a size such as 4MB, 512KB or 1.5GB")
        value, unit = float(match.group(1)), match.group(2).lower()
    size = value * _UNITS[unit]
    if not math.isfinite(size) or size <= 0:
        raise UserInputError(f"the memory budget must be above zero, got {text!r}")
    return int(size)


def mb(n: float) -> str:
    """A size for people: MB (2^20 bytes) with two decimals, or KB below one MB."""
    return f"{n / 2 ** 20:.2f} MB" if abs(n) >= 2 ** 20 else f"{n / 2 ** 10:.1f} KB"


@dataclass
class Round:
    k: int
    ratios: dict[str, Fraction]
    predicted_gain: float
    predicted_memory: int
    predicted_ms: float
    measured: Measurement
    within: bool


@dataclass
class SearchResult:
    scheme: Scheme
    k: int  # biases of the last k blocks
    ratios: dict[str, Fraction]  # trained weights and their ratios
    lr: float  # the rate to train it with: the analysis's (`Analysis.scheme_lr`), then the tuned one (`tune_lr`)
    memory_budget: int | None
    time_budget_ms: float | None
    rounds: list[Round]  # the last is the chosen scheme
    seconds: float
    cpu_seconds: float = 0.0  # CPU time of the process, all threads
    lr_trials: dict[float, float] = field(default_factory=dict)  # rate -> validation metric, from `tune_lr`
    lr_steps: int = 0  # the steps of each of those trials
    shrink: float = 0.0  # how far the weights' gains were pulled toward their ratio's mean (`shrunk_gains`)
    proposals: list[SearchResult] = field(default_factory=list)  # every scheme `verify` compared, this one included

    @property
    def chosen(self) -> Round:
        return self.rounds[-1]


@dataclass
class _Pick:
    k: int
    ratios: dict[str, Fraction]
    gain: float
    memory: int  # predicted, bytes
    ms: float  # predicted


def _grid(memory: float, ms: float) -> tuple[int, int]:
    """Costs on the solver's grid (KiB, 10 µs), rounded up; an extra cost below zero (noise) counts as zero."""
    return math.ceil(max(memory, 0) / MEMORY_GRID), math.ceil(max(ms, 0) / TIME_GRID)


def _reach(analysis: Analysis) -> dict[str, tuple[float, float]]:
    """Each analysed weight's reach: (memory, ms) of getting the backward pass to it, before its own extra cost."""
    blocks = analysis.structure.blocks
    base = analysis.weight_baseline
    cheapest = min(m.memory for m in analysis.bias.values())
    reach = {}
    for (layer, ratio), alone in analysis.alone.items():
        extra = max(analysis.weights[layer, ratio].memory - base.memory, 0)
        block = block_of(layer)
        depth = len(blocks) - blocks.index(block) if block in blocks else len(blocks)
        covering = [m for k, m in analysis.bias.items() if k >= depth]  # the biases of every block always are
        # Its plan alone can be the dearer of the two: a scheme without biases may plan its frozen prefix otherwise
        # (MobileNetV2's classifier alone plans 8.95 MB, with the last block's biases 2.54 MB).
        memory = min(alone.memory - extra, min(m.memory for m in covering))
        reach[layer] = (max(memory, cheapest), min(m.step_ms for m in covering))
    return reach


def shrunk_gains(analysis: Analysis, shrink: float) -> dict[tuple[str, Fraction], float]:
    """Each weight candidate's gain pulled toward the mean gain of the weight candidates at its ratio: `shrink` 0
    keeps the measured gains, 1 gives every weight of a ratio that mean. Why toward the mean and not toward zero:
    the noise of a gain is about the same for every weight (one accuracy on the same validation split), so scaling
    every gain alike would not change the knapsack's choice; what the noise hides is which weights of a kind are
    better, not whether the kind helps."""
    if not 0 <= shrink <= 1:
        raise UserInputError(f"shrink={shrink}: a shrinkage of the gains is between 0 (as measured) and 1 (the "
                             "mean of each ratio)")
    by_ratio: dict[Fraction, list[float]] = {}
    for layer, ratio in analysis.weights:
        by_ratio.setdefault(ratio, []).append(analysis.weight_gain(layer, ratio))
    means = {ratio: sum(gains) / len(gains) for ratio, gains in by_ratio.items()}
    return {(layer, ratio): means[ratio] + (1 - shrink) * (analysis.weight_gain(layer, ratio) - means[ratio])
            for layer, ratio in analysis.weights}


def _best(analysis: Analysis, limits: list[int | None], weights: bool = True, shrink: float = 0.0) -> _Pick | None:
    """For each reach level, the knapsack over the options within it (`weights` False: the biases alone; `shrink`:
    the weights' gains as `shrunk_gains` gives them); the best of them."""
    base = analysis.weight_baseline
    gains = shrunk_gains(analysis, shrink)
    reach = _reach(analysis) if weights else {}
    best: tuple[tuple[float, int, int], _Pick] | None = None
    for level in sorted({m.memory for m in analysis.bias.values()} | {memory for memory, _ in reach.values()}):
        ks = [k for k, m in analysis.bias.items() if m.memory <= level]
        layers = [layer for layer, (memory, _) in reach.items() if memory <= level]
        if not ks:
            continue
        deepest_ms = max((reach[layer][1] for layer in layers), default=0.0)
        groups = [[Option(analysis.bias_gain(k), _grid(level, max(analysis.bias[k].step_ms, deepest_ms)), k)
                   for k in ks]]
        for layer in layers:
            groups.append([Option(0.0, (0, 0), Fraction(0))] + [
                Option(gains[layer, ratio], _grid(w.memory - base.memory, w.step_ms - base.step_ms),
                       ratio) for (name, ratio), w in analysis.weights.items() if name == layer])
        solved = solve(groups, limits)
        if solved is None:
            continue
        options = [group[i] for group, i in zip(groups, solved[0])]
        memory = sum(o.costs[0] for o in options)
        ms = sum(o.costs[1] for o in options)
        pick = _Pick(options[0].label, {layer: o.label for layer, o in zip(layers, options[1:]) if o.label > 0},
                     solved[1], memory * MEMORY_GRID, ms * TIME_GRID)
        key = (solved[1], -memory if limits[0] is not None else 0, -ms if limits[1] is not None else 0)
        if best is None or key > best[0]:
            best = key, pick
    return None if best is None else best[1]


def _too_small(analysis: Analysis, memory_budget: int | None, time_budget_ms: float | None) -> str | None:
    """What the smallest scheme needs, if it does not fit."""
    problems = []
    if memory_budget is not None:
        k, m = min(analysis.bias.items(), key=lambda kv: kv[1].memory)
        if m.memory > memory_budget:
            problems.append(f"the memory budget {mb(memory_budget)} is below what the smallest scheme needs: "
                            f"{mb(m.memory)} (bias k={k}: step peak {mb(m.planned_peak)} planned + optimizer state "
                            f"{mb(m.optimizer_state)})")
    if time_budget_ms is not None:
        k, m = min(analysis.bias.items(), key=lambda kv: kv[1].step_ms)
        if m.step_ms > time_budget_ms:
            problems.append(f"the time budget {time_budget_ms:g} ms per step is below what the fastest scheme takes: "
                            f"{m.step_ms:.1f} ms measured (bias k={k})")
    return "; ".join(problems) or None


def search(task: Task, analysis: Analysis, *, memory_budget: int | str | None = None,
           time_budget_ms: float | None = None, max_rounds: int = 5, shrink: float = 0.0) -> SearchResult:
    """The scheme with the largest summed gain within the budgets, checked by compiling and training it. `shrink`:
    the weights' gains as `shrunk_gains` gives them."""
    start, cpu_start = time.perf_counter(), time.process_time()
    memory = None if memory_budget is None else parse_memory(memory_budget)
    if time_budget_ms is not None and not (math.isfinite(time_budget_ms) and time_budget_ms > 0):
        raise UserInputError(f"the time budget must be a number of milliseconds above zero, got {time_budget_ms}")
    if memory is None and time_budget_ms is None:
        raise UserInputError("the search needs a budget: a memory budget (such as 4MB), a time budget in ms per "
                             "step, or both")
    problem = _too_small(analysis, memory, time_budget_ms)
    if problem:
        raise BudgetTooSmallError(f"no scheme fits: {problem}; raise the budget")
    limits = [None if memory is None else memory // MEMORY_GRID,
              None if time_budget_ms is None else math.floor(time_budget_ms / TIME_GRID)]
    budget_limits = list(limits)
    rounds: list[Round] = []
    for _ in range(max_rounds):
        # Tightened past every combination with weights: the best biases alone, each measured within the budget by
        # the analysis itself.
        pick = _best(analysis, limits, shrink=shrink) or _best(analysis, budget_limits, weights=False)
        if pick is None or any((r.k, r.ratios) == (pick.k, pick.ratios) for r in rounds):
            break
        k, ratios = pick.k, pick.ratios
        lr = analysis.scheme_lr(ratios)
        scheme = build_scheme(analysis.structure, k, ratios)
        m = measure(task, scheme, [lr], analysis.steps, analysis.seed, start=analysis.start)[0]
        memory_over = 0 if memory is None else max(m.memory, m.tracked_memory) - memory
        time_over = 0.0 if time_budget_ms is None else m.step_ms - time_budget_ms
        rounds.append(Round(k, ratios, pick.gain, pick.memory, pick.ms, m, memory_over <= 0 and time_over <= 0))
        if rounds[-1].within:
            return SearchResult(scheme, k, ratios, lr, memory, time_budget_ms, rounds, time.perf_counter() - start,
                                time.process_time() - cpu_start, shrink=shrink)
        # Over a budget: ask the knapsack for that much less, and for less than this choice's prediction, so the
        # next choice differs and is cheaper.
        if memory_over > 0:
            limits[0] = min(limits[0] - math.ceil(memory_over / MEMORY_GRID), pick.memory // MEMORY_GRID - 1)
        if time_over > 0:
            limits[1] = min(limits[1] - math.ceil(time_over / TIME_GRID), round(pick.ms / TIME_GRID) - 1)
    tried = "; ".join(f"k={r.k}, {len(r.ratios)} weights: {mb(max(r.measured.memory, r.measured.tracked_memory))}, "
                      f"{r.measured.step_ms:.1f} ms" for r in rounds)
    raise BudgetTooSmallError(f"no scheme was found whose measured cost fits the budget "
                              f"({mb(memory) if memory else '-'}, {time_budget_ms if time_budget_ms else '-'} ms) "
                              f"after {len(rounds)} rounds "
                              f"(tried: {tried or 'none'}); raise the budget (the step time varies with the load of "
                              f"the machine)")


LR_FACTORS = (1 / 3, 1.0, 3.0)
LR_EXTENSIONS = 2


def tune_lr(task: Task, result: SearchResult, steps: int, seed: int = 0, factors: tuple[float, ...] = LR_FACTORS,
            extensions: int = LR_EXTENSIONS) -> SearchResult:
    """Train the chosen scheme for `steps` steps (the run's own length) at the analysis's rate times each of
    `factors` (one compiled program, reset between rates) and keep the rate with the best validation metric. While
    the best is the lowest or the highest rate tried, the grid is extended past it by its own spacing (the largest
    factor over the smallest, per step between them), up to `extensions` more rates: the best is then between two
    worse ones, or at the end of a longer search.

    Why: the analysis measures each candidate alone, after its few steps; the chosen combination trains more tensors
    together, for more steps, and may want another rate (on MobileNetV2 -> MNIST the combination chosen under 4 MB
    lost points at the analysis's rate over 300 steps, and the best of three rates was the lowest)."""
    if steps < 3:
        raise UserInputError(f"steps={steps}: tuning the learning rate needs runs of at least 3 steps")
    start, cpu_start = time.perf_counter(), time.process_time()
    lrs = sorted({result.lr * f for f in factors})
    trials = {lr: m.metric for lr, m in zip(lrs, measure(task, result.scheme, lrs, steps, seed))}
    spacing = (lrs[-1] / lrs[0]) ** (1 / (len(lrs) - 1)) if len(lrs) > 1 else 3.0
    for _ in range(extensions):
        best = max(sorted(trials), key=lambda lr: trials[lr])
        if best == min(trials):
            lr = best / spacing
        elif best == max(trials):
            lr = best * spacing
        else:
            break
        trials[lr] = measure(task, result.scheme, [lr], steps, seed)[0].metric
    trials = dict(sorted(trials.items()))
    result.lr = max(trials, key=lambda lr: trials[lr])
    result.lr_trials, result.lr_steps = trials, steps
    result.seconds += time.perf_counter() - start
    result.cpu_seconds += time.process_time() - cpu_start
    return result


def refine_lr(task: Task, result: SearchResult, seed: int = 0) -> SearchResult:
    """After `tune_lr`: train the scheme at the geometric midpoints between its best rate and each neighbouring rate
    tried (one compiled program, reset between rates) and keep the best of all. Why: over the run's length the
    validation metric moves by several points between rates 3x apart (on MobileNetV2 -> MNIST, 0.912 at 1e-4, 0.947
    at 3e-4, 0.832 at 9e-4), more than its noise on the validation split, so the best lies between grid points."""
    if not result.lr_trials:
        raise UserInputError("refine_lr needs the rates tried by tune_lr first")
    start, cpu_start = time.perf_counter(), time.process_time()
    tried = sorted(result.lr_trials)
    i = tried.index(result.lr)
    lrs = [math.sqrt(result.lr * tried[j]) for j in (i - 1, i + 1) if 0 <= j < len(tried)]
    trials = dict(result.lr_trials)
    for lr, m in zip(lrs, measure(task, result.scheme, lrs, result.lr_steps, seed)):
        trials[lr] = m.metric
    result.lr_trials = dict(sorted(trials.items()))
    result.lr = max(result.lr_trials, key=lambda lr: result.lr_trials[lr])  # the lowest rate of a tie
    result.seconds += time.perf_counter() - start
    result.cpu_seconds += time.process_time() - cpu_start
    return result


SHRINKS = (0.0, 0.5, 1.0)


def verify(task: Task, analysis: Analysis, *, steps: int, memory_budget: int | str | None = None,
           time_budget_ms: float | None = None, shrinks: tuple[float, ...] = SHRINKS, seed: int = 0,
           factors: tuple[float, ...] = LR_FACTORS, extensions: int = LR_EXTENSIONS,
           refine: bool = True) -> SearchResult:
    """The search at each strength of `shrinks` (`shrunk_gains`), then each distinct scheme it proposes trained for
    `steps` steps (the run's own length) at a few rates (`tune_lr`); the scheme with the best validation metric is
    returned, its rate refined between the rates tried (`refine_lr`, unless `refine` is False), every proposal in its
    `proposals` (ties: the earlier strength); its seconds are those of the whole call.

    Why: the analysis's gains after a few steps are within their noise, and the knapsack sums them, so its choice
    among weights of similar gain is largely noise (on MobileNetV2 -> MNIST a scheme of the same budget written by
    hand did better over 300 steps). Proposals from stronger shrinkage trust the individual gains less; training each
    for the run's length measures the combination itself, on the same validation split, at a cost of a few runs of a
    scheme that is cheap by construction. A strength whose search finds nothing within the budgets is skipped; if
    none finds one, the first's error is raised."""
    if not shrinks:
        raise UserInputError("verify needs at least one shrinkage strength (0: the gains as measured)")
    start, cpu_start = time.perf_counter(), time.process_time()
    proposals: list[SearchResult] = []
    first_error: BudgetTooSmallError | None = None
    for shrink in shrinks:
        try:
            found = search(task, analysis, memory_budget=memory_budget, time_budget_ms=time_budget_ms, shrink=shrink)
        except BudgetTooSmallError as e:
            first_error = first_error or e
            continue
        if all((p.k, p.ratios) != (found.k, found.ratios) for p in proposals):
            proposals.append(found)
    if not proposals:
        assert first_error is not None
        raise first_error
    for proposal in proposals:
        tune_lr(task, proposal, steps, seed, factors, extensions)
    best = max(proposals, key=lambda p: p.lr_trials[p.lr])  # the first of a tie
    if refine:
        refine_lr(task, best, seed)
    best.proposals = proposals
    best.seconds, best.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return best
