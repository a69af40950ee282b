"""Choosing what to train: contribution analysis and a search under a memory/time budget (issue #13).

`choose_scheme(task, memory_budget=..., time_budget_ms=..., cache_dir=...)` runs both; docs/search.md."""

from pockengine.search.analysis import Analysis, Measurement, analyze
from pockengine.search.choose import choose_scheme
from pockengine.search.report import SearchReport
from pockengine.search.search import BudgetTooSmallError, SearchResult, parse_memory, search
from pockengine.search.task import Task

__all__ = ["Analysis", "BudgetTooSmallError", "Measurement", "SearchReport", "SearchResult", "Task", "analyze",
           "choose_scheme", "parse_memory", "search"]
