"""PyTorch's OpInfo database as a second oracle for the VJP rules (see pockengine/autodiff/opinfo.py).

Every differentiable fp32 op of `op_db` runs on its first sample through capture -> differentiate -> generated
code, and its gradients are compared with torch.autograd's (relative error <= 1e-4, or as close to float64
autograd as fp32 autograd is). An op without a rule (MissingVJPError) or that pockengine refuses with another
PockEngineError is fine; a wrong gradient or any other exception is not. `python -m pockengine.autodiff.opinfo`
prints the same categories for more samples, through pe.compile (docs/coverage.md).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import pytest

from pockengine.autodiff import opinfo

# Ops that pass (first sample): a floor well under the count when this test was written (see docs/coverage.md),
# so that rules breaking wholesale fail the test even though a missing rule alone does not.
MIN_PASSING = 370
# The database is checked in this many tests (every CHUNKS-th op from a different start), so that pytest-xdist
# spreads it over its workers. Each holds its share of MIN_PASSING, rounded up: together they still ask for it all.
CHUNKS = 6


@pytest.mark.slow
@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_opinfo_gradients_match_autograd(chunk):
    warnings.filterwarnings("ignore")
    ops = opinfo.differentiable_ops()
    mine = ops[chunk::CHUNKS]
    results = opinfo.run(mine, samples=1, through="graph")
    bad = [f"{r.name}: {r.category}, {r.worst.detail}" for r in results if r.category in ("wrong", "crash")]
    assert not bad, "wrong gradients or crashes:\n" + "\n".join(bad)
    counts = Counter(r.category for r in results)
    assert counts["pass"] >= math.ceil(MIN_PASSING * len(mine) / len(ops)), opinfo.report(results, samples=1)


def test_opinfo_harness_sorts_ops_into_categories():
    """A few ops whose category is known: the harness must tell them apart."""
    warnings.filterwarnings("ignore")
    ops = {op.name: op for op in opinfo.differentiable_ops()}
    expected = {"mul": "pass", "nn.functional.group_norm": "pass", "linalg.householder_product": "no rule",
                "masked_select": "refused"}
    got = {name: opinfo.check_op(ops[name], samples=1, through="graph").category for name in expected}
    assert got == expected
