"""An exact solver of the multiple-choice knapsack problem: pick one option from every group so that the summed
gain is largest while the summed cost stays within a budget in every budgeted dimension (memory, time).

Method: dynamic programming over Pareto fronts. After each group the partial selections that survive are those no
other one dominates (no more cost in any budgeted dimension and at least the gain); a selection over a budget is
dropped at once, which is exact because costs are not negative. The optimum's prefix is never dominated, so it
survives to the end: the answer is exact for the costs given. The fronts stay small when costs are integers on a
coarse grid (the search rounds memory up to KiB and time up to 10 µs, never below the true cost).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    gain: float
    costs: tuple[float, ...]  # one per dimension, each >= 0
    label: Any = None


def solve(groups: Sequence[Sequence[Option]], budgets: Sequence[float | None]) -> tuple[list[int], float] | None:
    """The index of the chosen option in each group and the summed gain, or None when no choice fits the budgets
    (a budget None leaves that dimension unconstrained). Ties go to the cheaper selection, then the earlier
    options."""
    dims = [d for d, b in enumerate(budgets) if b is not None]
    for group in groups:
        if not group:
            raise ValueError("every group needs at least one option (add a zero-cost 'nothing' option)")
        for option in group:
            if len(option.costs) != len(budgets) or any(c < 0 for c in option.costs):
                raise ValueError(f"option {option.label!r}: costs must be {len(budgets)} numbers >= 0, got "
                                 f"{option.costs}")
    # A state: (costs in the budgeted dimensions, gain, chosen indices).
    front: list[tuple[tuple[float, ...], float, tuple[int, ...]]] = [(tuple(0.0 for _ in dims), 0.0, ())]
    for group in groups:
        grown = []
        for costs, gain, chosen in front:
            for i, option in enumerate(group):
                new = tuple(c + option.costs[d] for c, d in zip(costs, dims))
                if all(c <= budgets[d] for c, d in zip(new, dims)):
                    grown.append((new, gain + option.gain, chosen + (i,)))
        if not grown:
            return None
        front = _pareto(grown)
    costs, gain, chosen = max(front, key=lambda s: (s[1], tuple(-c for c in s[0])))
    return list(chosen), gain


def _pareto(states: list[tuple[tuple[float, ...], float, tuple[int, ...]]]) -> list:
    """The states no other state dominates (costs <= in every dimension and gain >=; of equals, the first)."""
    ordered = sorted(states, key=lambda s: (-s[1], s[0]))
    if ordered and len(ordered[0][0]) <= 1:  # one dimension: a sweep, cost must fall as gain falls
        kept, cheapest = [], float("inf")
        for state in ordered:
            cost = state[0][0] if state[0] else 0.0
            if cost < cheapest:
                kept.append(state)
                cheapest = cost
        return kept
    kept = []
    for state in ordered:  # higher gain first: a state can only be dominated by one already kept
        if not any(all(k <= c for k, c in zip(other[0], state[0])) for other in kept):
            kept.append(state)
    return kept
