"""The one call `pockengine finetune --scheme auto` makes: analysis (cached), search, report."""

from __future__ import annotations

from pathlib import Path

from pockengine.scheme import Scheme
from pockengine.search.analysis import analyze
from pockengine.search.report import SearchReport
from pockengine.search.search import search, tune_lr
from pockengine.search.task import Task


def choose_scheme(task: Task, *, memory_budget: int | str | None = None, time_budget_ms: float | None = None,
                  cache_dir: str | Path, quick: bool = False, steps: int | None = None, seed: int = 0,
                  lr_grid: tuple[float, ...] | None = None, warmup_steps: int | None = None, progress: bool = True,
                  out_dir: str | Path | None = None, lr_steps: int | None = None) -> tuple[Scheme, SearchReport]:
    """Analyse `task` (cached in `cache_dir`) and return the best scheme within the budgets with its report
    (`report.lr`: the learning rate to train it with). `lr_steps`: tune that rate for the chosen scheme itself,
    trained for this many steps (the run's length) around the analysis's rate (`search.tune_lr`); None keeps the
    analysis's rate. `out_dir`: also write the scheme file, the markdown report and the plots there."""
    analysis = analyze(task, cache_dir, quick=quick, steps=steps, seed=seed, lr_grid=lr_grid,
                       warmup_steps=warmup_steps, progress=progress)
    result = search(task, analysis, memory_budget=memory_budget, time_budget_ms=time_budget_ms)
    if lr_steps is not None:
        result = tune_lr(task, result, lr_steps, seed)
    report = SearchReport(analysis, result)
    if out_dir is not None:
        report.write(out_dir)
    return result.scheme, report
