"""Every program the tests compile is checked after each pass of the pipeline (`Graph.lint`).

Under pytest-xdist (`scripts/test.sh` runs one worker per core) each worker keeps torch to its share of the cores,
since workers that each start one intra-op thread per core would oversubscribe them, and receives the slow tests
first, so that the short ones fill the end of the run instead of one long test running alone there."""

import os

import pytest

os.environ.setdefault("POCKENGINE_CHECK", "1")

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker collects the same order; xdist hands it out in turn
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
