"""Choosing what to train: contribution analysis and a search under a memory/time budget (issue #13)."""

from pockengine.search.task import Task

__all__ = ["Task"]
