"""Every program the tests compile is checked after each pass of the pipeline (`Graph.lint`).

Under pytest-xdist (`scripts/test.sh` runs one worker per core) each worker keeps torch to its share of the cores,
since workers that each start one intra-op thread per core would oversubscribe them, and receives the slow tests
first, so that the short ones fill the end of the run instead of one long test running alone there. Tests marked
`@pytest.mark.xdist_group("name")` (sharing an expensive fixture or cached run) go to one worker together."""

import os

import pytest

os.environ.setdefault("POCKENGINE_CHECK", "1")
# Every test captures its model afresh (they test the capture, and a test must not depend on what another wrote to
# the cache); tests/test_compile_cache.py turns the capture cache on where it tests it.
os.environ.setdefault("POCKENGINE_CAPTURE_CACHE", "0")

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # every worker collects the same order
    if getattr(config.option, "loadgroup", False):  # a pytest run as a subprocess of a worker has no xdist
        _suffix_groups(items)


def _suffix_groups(items: list[pytest.Item]) -> None:
    """`--dist loadgroup` finds a test's group in its node id (`id@group`), which pytest-xdist 3.8.0 writes into
    an attribute that pytest 9.2's structured node ids no longer read (pytest-dev/pytest-xdist#1386): without this,
    grouped tests are spread like any others."""
    from _pytest.nodeid import NodeId

    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(groups)
        if groups and not item.nodeid.endswith(suffix):  # a pytest-xdist that writes it itself did so already
            item._id = NodeId.parse(item.nodeid + suffix)
