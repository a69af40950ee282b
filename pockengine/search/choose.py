"""The one call `pockengine finetune --scheme auto` makes: analysis (cached), search, report."""

from __future__ import annotations

from pathlib import Path

from pockengine.scheme import Scheme
from pockengine.search.analysis import analyze
from pockengine.search.report import SearchReport
from pockengine.search.search import SHRINKS, search, verify
from pockengine.search.task import Task


def choose_scheme(task: Task, *, memory_budget: int | str | None = None, time_budget_ms: float | None = None,
                  cache_dir: str | Path, quick: bool = False, steps: int | None = None, seed: int = 0,
                  lr_grid: tuple[float, ...] | None = None, warmup_steps: int | None = None, progress: bool = True,
                  out_dir: str | Path | None = None, lr_steps: int | None = None,
                  shrinks: tuple[float, ...] = SHRINKS) -> tuple[Scheme, SearchReport]:
    """Analyse `task` (cached in `cache_dir`) and return the best scheme within the budgets with its report
    (`report.lr`: the learning rate to train it with). `lr_steps`: the search proposes a scheme at each shrinkage
    strength of `shrinks`, and each is trained for this many steps (the run's length) at a few rates around the
    analysis's rate; the best on the validation split is kept with its rate (`search.verify`). None: the search's
    choice as measured (shrinkage 0) at the analysis's rate. `out_dir`: also write the scheme file, the markdown
    report and the plots there."""
    analysis = analyze(task, cache_dir, quick=quick, steps=steps, seed=seed, lr_grid=lr_grid,
                       warmup_steps=warmup_steps, progress=progress)
    if lr_steps is None:
        result = search(task, analysis, memory_budget=memory_budget, time_budget_ms=time_budget_ms)
    else:
        result = verify(task, analysis, steps=lr_steps, memory_budget=memory_budget, time_budget_ms=time_budget_ms,
                        shrinks=shrinks, seed=seed)
    report = SearchReport(analysis, result)
    if out_dir is not None:
        report.write(out_dir)
    return result.scheme, report
