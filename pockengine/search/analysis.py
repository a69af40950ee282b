"""Contribution analysis: fine-tune each candidate alone from the pretrained weights and measure its gain and cost.

Each candidate (see `candidates.py`) is compiled once by pockengine and trained for `steps` steps of AdamW on the
task's seeded training batches, then evaluated on the held-out split. Every candidate starts from the pretrained
weights with a warmed-up classifier: the classifier alone trained first for `warmup_steps` (`warm_up`), so that a
candidate's few steps measure what its tensors add rather than how fast a new classifier learns. Gains:

- bias candidate k: metric(biases of the last k blocks + classifier) - metric(classifier alone, k = 0);
- weight candidate (layer, ratio): metric(that weight + biases of every block + classifier) - metric(biases of every
  block + classifier, the weight baseline), each at its own best rate of the grid.

Besides, each analysed weight is compiled (not trained) alone with the classifier, no biases, at its largest analysed
ratio: the compiler's plan of that scheme (`alone`) says what reaching the weight costs, which the search needs to
price a weight below the trained biases (`search.py`). A weight over the biases of every block does not say it: the
backward pass of that baseline already reaches every block.

Costs come from pockengine itself: `memory` is the compiler's planned step peak (`trainer.memory_plan()`) plus the
optimizer state; `tracked_memory` the same with the step peak measured by the live-storage tracker; `flops` are
counted by `torch.utils.flop_counter` on one real step of the compiled program; `step_ms` is the median of the
timed steps. Step 1 counts FLOPs, step 2 is tracked, steps 3.. are timed, so `steps` is at least 3.

Learning rate: AdamW needs a larger rate for a few biases than for a whole weight, and a smaller one for a whole
weight than for a quarter of it; one rate is not fair to all (a rate that suits the biases measures most whole
weights as harmful). The bias candidates share the rate at which the biases of every block (the weight baseline)
score best on the held-out split; each weight candidate is trained at every rate of `lr_grid` and keeps its best,
so its gain is what it adds when both it and the baseline are trained at their own rates. One compiled program
serves every rate of the grid (weights, optimizer state, step count and generator reset between rates), since the
rate is a run-time input of the program: a rate costs steps and an evaluation, not a compilation.

Results are cached on disk, one JSON file per (candidate, learning rate) and the warm-up's classifier in a
safetensors file, written atomically: an interrupted analysis resumes where it stopped, and a second run trains
nothing. The key covers the task's name, its data key (which training and validation examples), the weights the runs
start from (the warmed-up model's for a candidate: another warm-up is another analysis), the example batch's shapes,
the candidate's scheme, the steps, the seed and the rate. """

from __future__ import annotations

import hashlib
import json
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils import _pytree as pytree

from pockengine.capture import normalize_batch
from pockengine.errors import UserInputError
from pockengine.memory.tracker import LiveStorageTracker
from pockengine.optim import AdamW
from pockengine.options import Options
from pockengine.scheme import Scheme, gradient_masks
from pockengine.search.candidates import (Candidate, Structure, batch_signature, candidates, model_fingerprint)
from pockengine.search.task import Task
from pockengine.storage import atomic_path, save_safetensors
from pockengine.trainer import Trainer

LR_GRID = (1e-4, 1e-3, 1e-2)
QUICK_LR_GRID = (1e-4, 1e-3)
STEPS, QUICK_STEPS = 100, 40
WARMUP_STEPS, QUICK_WARMUP_STEPS = 200, 100
CACHE_VERSION = 3  # bump when what a cached result means changes


@dataclass(frozen=True)
class Measurement:
    """One scheme trained alone: its held-out metric and what a step of it costs."""

    metric: float
    planned_peak: int  # bytes, the compiler's memory plan of the step
    tracked_peak: int  # bytes, measured by the live-storage tracker on one step
    optimizer_state: int  # bytes
    step_ms: float  # median of the timed steps
    flops: int  # of one step, counted on the compiled program
    trained_entries: int
    compile_s: float
    train_s: float = 0.0  # wall time of the steps at this rate (FLOP counting and tracking included)
    eval_s: float = 0.0  # wall time of the held-out evaluation

    @property
    def memory(self) -> int:
        """What a budget is checked against: the planned step peak plus the optimizer state."""
        return self.planned_peak + self.optimizer_state

    @property
    def tracked_memory(self) -> int:
        return self.tracked_peak + self.optimizer_state


@dataclass(frozen=True)
class Plan:
    """A scheme compiled, not trained: the compiler's planned step peak and the optimizer state, in bytes."""

    planned_peak: int
    optimizer_state: int

    @property
    def memory(self) -> int:
        """As `Measurement.memory`: what a budget is checked against."""
        return self.planned_peak + self.optimizer_state


def _options(seed: int) -> Options:
    # Fine-tuning keeps BatchNorm's pretrained statistics (frozen and folded), as `pockengine train` does.
    return Options(freeze_batchnorm=True, seed=seed)


def measure(task: Task, scheme: Scheme, lrs: list[float], steps: int, seed: int,
            start: dict[str, torch.Tensor] | None = None,
            after: Callable[[float, torch.nn.Module], None] | None = None) -> list[Measurement]:
    """Train `scheme` from the pretrained weights (with the parameters of `start` in place of theirs: the analysis's
    warmed-up classifier) for `steps` steps at each rate of `lrs` (one compiled program, reset between rates) and
    measure each run. `after(lr, model)` is called once each rate's run is evaluated, before the next rate resets
    the model."""
    if steps < 3:
        raise UserInputError(f"steps={steps}: the analysis needs at least 3 steps (one counts FLOPs, one is tracked, "
                             "the rest are timed)")
    from torch.utils.flop_counter import FlopCounterMode

    model = task.build_model()
    if start:
        load_parameters(model, start)
    compile_start = time.perf_counter()
    trainer = Trainer(model, task.loss_fn, task.example_batch, AdamW(lr=lrs[0]), scheme, _options(seed))
    compile_s = time.perf_counter() - compile_start
    plan = trainer.memory_plan()
    state = [t for s in trainer.state.values() for t in s.values()]
    pristine = {n: t.detach().clone() for n, t in (*model.named_parameters(), *model.named_buffers())
                if len(lrs) > 1}  # for the reset between rates
    params = dict(model.named_parameters())
    trained_entries = sum(params[n].numel() if mask is None else int(mask.sum())
                          for n, mask in gradient_masks(model, trainer.trained).items())
    results = []
    for i, lr in enumerate(lrs):
        if i:
            _reset(trainer, pristine, state, seed)
        batches = task.train_batches(seed)
        times, flops, tracked = [], 0, 0
        train_start = time.perf_counter()
        for step in range(1, steps + 1):
            batch = next(batches)
            if step == 1:
                with FlopCounterMode(display=False) as counter:
                    trainer.step(batch, lr=lr)
                flops = counter.get_total_flops()
            elif step == 2:
                tracker = LiveStorageTracker()
                leaves = [t for t in pytree.tree_leaves(normalize_batch(batch)) if isinstance(t, torch.Tensor)]
                tracker.ignore(*model.parameters(), *model.buffers(), *state, *leaves)
                with tracker:
                    trainer.step(batch, lr=lr)
                tracked = tracker.peak_bytes
            else:
                t = time.perf_counter()
                trainer.step(batch, lr=lr)
                times.append(time.perf_counter() - t)
        eval_start = time.perf_counter()
        metric = float(task.evaluate(model))
        results.append(Measurement(metric, plan.peak_bytes, tracked, trainer.optimizer_state_bytes(),
                                   statistics.median(times) * 1e3, int(flops), trained_entries, compile_s,
                                   eval_start - train_start, time.perf_counter() - eval_start))
        if after is not None:
            after(lr, model)
    return results


def plan(task: Task, scheme: Scheme, seed: int, start: dict[str, torch.Tensor] | None = None) -> Plan:
    """Compile `scheme` as `measure` does (from `start`'s parameters) and read its memory plan, training nothing (the
    rate is a run-time input: it does not change the program)."""
    model = task.build_model()
    if start:
        load_parameters(model, start)
    trainer = Trainer(model, task.loss_fn, task.example_batch, AdamW(lr=1e-3), scheme, _options(seed))
    return Plan(trainer.memory_plan().peak_bytes, trainer.optimizer_state_bytes())


def load_parameters(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy `values` into the model's parameters of those names (in place: a compiled program stays bound)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise UserInputError(f"the model has no parameters named {unknown[:3]}: the warm-up state is not this "
                             "model's; delete the analysis cache's warmup-*.safetensors files to warm up again")
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


def _reset(trainer: Trainer, pristine: dict[str, torch.Tensor], state: list[torch.Tensor], seed: int) -> None:
    """Back to the pretrained weights and a fresh optimizer, in the tensors the compiled program is bound to."""
    with torch.no_grad():
        for name, t in (*trainer.model.named_parameters(), *trainer.model.named_buffers()):
            t.copy_(pristine[name])
        for t in state:
            t.zero_()
    trainer.steps_done = 0
    trainer.generator.manual_seed(seed)


@dataclass
class Result:
    """A candidate's measurement at one learning rate, as cached."""

    candidate: Candidate
    lr: float
    measurement: Measurement


@dataclass
class Analysis:
    task: str
    metric: str
    structure: Structure
    steps: int
    seed: int
    quick: bool
    metric_before: float  # the pretrained model (new classifier untrained), for the report
    bias_lr: float  # the rate of every bias candidate: the best of the grid for the biases of every block
    bias_lr_trials: dict[float, float]  # rate -> metric of the biases of every block (the weight baseline)
    bias: dict[int, Measurement]  # k -> at bias_lr
    weight_baseline: Measurement  # biases of every block, at bias_lr
    weights: dict[tuple[str, Fraction], Measurement] = field(default_factory=dict)  # each at its best rate
    weight_lr: dict[tuple[str, Fraction], float] = field(default_factory=dict)  # that rate
    weight_lr_trials: dict[tuple[str, Fraction], dict[float, float]] = field(default_factory=dict)  # rate -> metric
    seconds: float = 0.0  # wall time of this call (cached results cost nothing)
    cpu_seconds: float = 0.0  # CPU time of this process in this call, all threads: less sensitive to other jobs
    trained: int = 0  # how many (candidate, rate) runs this call trained; the rest came from the cache
    warmup: Warmup | None = None  # the classifier trained alone first; every candidate starts from it
    # (layer, its largest analysed ratio) -> the plan of that weight trained alone with the classifier, no biases
    alone: dict[tuple[str, Fraction], Plan] = field(default_factory=dict)

    @property
    def start(self) -> dict[str, torch.Tensor] | None:
        """The parameters every candidate starts from in place of the pretrained model's (`measure`'s `start`)."""
        return None if self.warmup is None else self.warmup.state

    def scheme_lr(self, ratios: dict[str, Fraction]) -> float:
        """The rate to train a combination with, from the analysis: the lowest best rate of its weights (a rate
        too high for one trained tensor harms the whole model; `search.tune_lr` then tunes it on the combination
        itself), the bias rate without weights."""
        return min((self.weight_lr[layer, ratio] for layer, ratio in ratios.items()), default=self.bias_lr)

    def bias_gain(self, k: int) -> float:
        return self.bias[k].metric - self.bias[0].metric

    def weight_gain(self, layer: str, ratio: Fraction) -> float:
        return self.weights[layer, ratio].metric - self.weight_baseline.metric

    def rows(self) -> list[dict[str, Any]]:
        """Every candidate with its gain and costs (weights: over the weight baseline), for reports."""
        out = []
        for k, m in self.bias.items():
            out.append(dict(candidate=f"bias k={k}", kind="bias", k=k, layer=None, ratio=None, lr=self.bias_lr,
                            gain=self.bias_gain(k), metric=m.metric, **_costs(m)))
        base = _costs(self.weight_baseline)
        for (layer, ratio), m in self.weights.items():
            extra = {key: value - base[key] for key, value in _costs(m).items()}
            alone = self.alone.get((layer, ratio))
            out.append(dict(candidate=f"{layer} @ {ratio}", kind="weight", k=None, layer=layer, ratio=ratio,
                            lr=self.weight_lr[layer, ratio], gain=self.weight_gain(layer, ratio), metric=m.metric,
                            **extra, alone_memory=None if alone is None else alone.memory))
        return out


def _costs(m: Measurement) -> dict[str, float]:
    return dict(memory=m.memory, tracked_memory=m.tracked_memory, step_ms=m.step_ms, flops=m.flops,
                trained=m.trained_entries)


class _Cache:
    """One JSON file per (candidate, rate), and the warm-up's classifier in a safetensors file, each written atomically.
    `model_key` is the fingerprint of the weights the candidates start from: with a warm-up, the warmed-up model's
    (so another warm-up is another analysis), and `warmup` its settings, kept in the key to be read."""

    def __init__(self, folder: Path, task: Task, steps: int, seed: int, model_key: str,
                 warmup: dict[str, Any] | None = None):
        self.folder = Path(folder) / "".join(c if c.isalnum() or c in "-_" else "_" for c in task.name)[:60]
        self.base = dict(version=CACHE_VERSION, task=task.name, data=task.data_key, model=model_key,
                         batch=batch_signature(task.example_batch), steps=steps, seed=seed, warmup=warmup)

    def _file(self, key: dict[str, Any], prefix: str = "", suffix: str = ".json") -> Path:
        digest = hashlib.sha256(json.dumps(dict(self.base, **key), sort_keys=True).encode()).hexdigest()[:32]
        return self.folder / f"{prefix}{digest}{suffix}"

    def path(self, candidate: Candidate, structure: Structure, lr: float) -> Path:
        return self._file(dict(scheme=candidate.scheme(structure).to_dict(), lr=lr))

    def get(self, candidate: Candidate, structure: Structure, lr: float) -> Measurement | None:
        path = self.path(candidate, structure, lr)
        try:
            return Measurement(**json.loads(path.read_text())["measurement"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as e:
            _unreadable(path, e)
            return None

    def put(self, candidate: Candidate, structure: Structure, lr: float, m: Measurement) -> None:
        record = dict(self.base, candidate=candidate.label, lr=lr, measurement=asdict(m))
        with atomic_path(self.path(candidate, structure, lr)) as tmp:
            tmp.write_text(json.dumps(record, indent=1))

    def plan_path(self, candidate: Candidate, structure: Structure) -> Path:
        return self._file(dict(scheme=candidate.scheme(structure).to_dict()), prefix="plan-")

    def get_plan(self, candidate: Candidate, structure: Structure) -> Plan | None:
        path = self.plan_path(candidate, structure)
        try:
            return Plan(**json.loads(path.read_text())["plan"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as e:
            _unreadable(path, e)
            return None

    def put_plan(self, candidate: Candidate, structure: Structure, p: Plan) -> None:
        record = dict(self.base, candidate=candidate.label, plan=asdict(p))
        with atomic_path(self.plan_path(candidate, structure)) as tmp:
            tmp.write_text(json.dumps(record, indent=1))

    def warmup_path(self, grid: tuple[float, ...]) -> Path:
        return self._file(dict(warmup_grid=list(grid)), prefix="warmup-", suffix=".safetensors")

    def get_warmup(self, grid: tuple[float, ...]) -> Warmup | None:
        path = self.warmup_path(grid)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                state = {name: f.get_tensor(name) for name in f.keys()}
            trials = {float(lr): metric for lr, metric in json.loads(meta["trials"]).items()}
            return Warmup(int(meta["steps"]), float(meta["lr"]), trials, state)
        except FileNotFoundError:
            return None
        except Exception as e:  # a truncated or foreign file: safetensors and json raise several kinds
            _unreadable(path, e)
            return None

    def put_warmup(self, grid: tuple[float, ...], warmup: Warmup) -> None:
        save_safetensors(warmup.state, self.warmup_path(grid),
                         {"steps": str(warmup.steps), "lr": repr(warmup.lr),
                          "trials": json.dumps({repr(lr): m for lr, m in warmup.trials.items()})})


def _unreadable(path: Path, e: Exception) -> None:
    warnings.warn(f"pockengine: the cached analysis result {path} is unreadable ({type(e).__name__}: {e}); "
                  "training it again", RuntimeWarning, stacklevel=3)


@dataclass
class Warmup:
    """The new classifier trained alone before the candidates: every candidate starts from `state`."""

    steps: int
    lr: float  # the best rate of the grid for the classifier alone
    trials: dict[float, float]  # rate -> held-out metric after the warm-up at that rate
    state: dict[str, torch.Tensor]  # the classifier's parameters after the warm-up at `lr`

    @property
    def metric(self) -> float:
        return self.trials[self.lr]


def warm_up(task: Task, structure: Structure, grid: tuple[float, ...], steps: int, seed: int) -> Warmup:
    """Train the classifier alone (the scheme of bias k = 0) from the pretrained weights for `steps` steps at each
    rate of `grid` and keep the classifier of the best."""
    prefix = structure.classifier + "."
    states: dict[float, dict[str, torch.Tensor]] = {}

    def keep(lr: float, model: torch.nn.Module) -> None:
        states[lr] = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}

    found = measure(task, Candidate(0).scheme(structure), list(grid), steps, seed, after=keep)
    trials = {lr: m.metric for lr, m in zip(grid, found)}
    lr = max(trials, key=lambda r: trials[r])  # the lowest rate of a tie (the grid is sorted)
    return Warmup(steps, lr, trials, states[lr])


def analyze(task: Task, cache_dir: str | Path, *, quick: bool = False, steps: int | None = None, seed: int = 0,
            lr_grid: tuple[float, ...] | None = None, quick_layers: int = 20, warmup_steps: int | None = None,
            progress: bool = True,
            on_result: Callable[[Candidate, float, Measurement], None] | None = None) -> Analysis:
    """Run (or read from `cache_dir`) the contribution analysis of `task`. `quick`: fewer candidates (see
    `candidates.candidates`), `QUICK_STEPS` steps and a two-rate grid. `warmup_steps`: the classifier is first
    trained alone for this many steps (default `WARMUP_STEPS`, quick `QUICK_WARMUP_STEPS`; 0: no warm-up) and every
    candidate starts from it. `on_result` is called after each (candidate, rate) trained here (not those read from
    the cache)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    steps = steps or (QUICK_STEPS if quick else STEPS)
    warmup_steps = (QUICK_WARMUP_STEPS if quick else WARMUP_STEPS) if warmup_steps is None else warmup_steps
    if warmup_steps and warmup_steps < 3:
        raise UserInputError(f"warmup_steps={warmup_steps}: a warm-up is a run of at least 3 steps (0: none)")
    grid = tuple(sorted(set(lr_grid or (QUICK_LR_GRID if quick else LR_GRID))))
    if not grid or any(not lr > 0 for lr in grid):
        raise UserInputError(f"the learning-rate grid needs rates > 0, got {grid}")
    structure = Structure.of(task)
    model = task.build_model()
    pretrained_key = model_fingerprint(model)
    model.eval()
    metric_before = float(task.evaluate(model))
    del model
    bias_cands, weight_cands = candidates(structure, quick, quick_layers)
    deepest = bias_cands[-1]  # the biases of every block: the weight baseline

    # Everything to train, in order: the warm-up over the grid, the weight baseline over the grid (it sets the bias
    # rate), the other bias candidates at that rate, every weight candidate over the grid; cached runs are skipped.
    from tqdm.auto import tqdm

    total = len(grid) * (1 + len(weight_cands) + (warmup_steps > 0)) + len(bias_cands)  # the deepest again: cached
    bar = tqdm(total=total, desc=f"analysis of {task.name}", unit="run", disable=not progress)
    trained = 0
    warmup = None
    try:
        if warmup_steps:
            warmup_cache = _Cache(Path(cache_dir), task, warmup_steps, seed, pretrained_key)
            warmup = warmup_cache.get_warmup(grid)
            if warmup is None:
                bar.set_postfix_str("warm-up: the classifier alone")
                warmup = warm_up(task, structure, grid, warmup_steps, seed)
                warmup_cache.put_warmup(grid, warmup)
                trained += len(grid)
            bar.update(len(grid))
        model_key = pretrained_key if warmup is None else model_fingerprint(_started(task, warmup))
        cache = _Cache(Path(cache_dir), task, steps, seed, model_key,
                       None if warmup is None else dict(steps=warmup.steps, lr=warmup.lr))
        start_state = None if warmup is None else warmup.state

        def run(candidate: Candidate, lrs: list[float]) -> dict[float, Measurement]:
            nonlocal trained
            found = {lr: cache.get(candidate, structure, lr) for lr in lrs}
            missing = [lr for lr, m in found.items() if m is None]
            bar.update(len(lrs) - len(missing))
            if missing:
                bar.set_postfix_str(candidate.label)
                measured = measure(task, candidate.scheme(structure), missing, steps, seed, start=start_state)
                for lr, m in zip(missing, measured):
                    cache.put(candidate, structure, lr, m)
                    found[lr] = m
                    trained += 1
                    bar.update(1)
                    if on_result is not None:
                        on_result(candidate, lr, m)
            return found

        def best(found: dict[float, Measurement]) -> float:
            return max(found, key=lambda r: found[r].metric)  # the lowest rate of a tie (the grid is sorted)

        baseline_trials = run(deepest, list(grid))
        bias_lr = best(baseline_trials)
        bias = {c.k: run(c, [bias_lr])[bias_lr] for c in bias_cands}
        weight_trials = {(c.layer, c.ratio): run(c, list(grid)) for c in weight_cands}
        alone = {}
        for layer in dict.fromkeys(c.layer for c in weight_cands):
            ratio = max(c.ratio for c in weight_cands if c.layer == layer)
            candidate = Candidate(0, layer, ratio)
            found_plan = cache.get_plan(candidate, structure)
            if found_plan is None:
                bar.set_postfix_str(f"plan of {candidate.label} alone")
                found_plan = plan(task, candidate.scheme(structure), seed, start_state)
                cache.put_plan(candidate, structure, found_plan)
            alone[layer, ratio] = found_plan
    finally:
        bar.close()
    weight_lr = {key: best(found) for key, found in weight_trials.items()}
    return Analysis(task.name, task.metric, structure, steps, seed, quick, metric_before, bias_lr,
                    {r: m.metric for r, m in baseline_trials.items()}, bias, bias[deepest.k],
                    {key: found[weight_lr[key]] for key, found in weight_trials.items()}, weight_lr,
                    {key: {r: m.metric for r, m in found.items()} for key, found in weight_trials.items()},
                    time.perf_counter() - start, time.process_time() - cpu_start, trained, warmup, alone)


def _started(task: Task, warmup: Warmup) -> torch.nn.Module:
    model = task.build_model()
    load_parameters(model, warmup.state)
    return model
