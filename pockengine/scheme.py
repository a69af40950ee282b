"""Schemes: which parameters a fine-tuning run trains.

A scheme resolves against a model into `{parameter name: Selection}`; parameters it does not name stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Selection:
    """How one parameter is trained. `full`: every entry."""

    kind: str = "full"


class Scheme:
    def __init__(self, name: str, rules: list[tuple[str, Selection]]):
        self.name = name
        self.rules = rules  # (parameter name or "*", selection)

    @classmethod
    def full(cls) -> Scheme:
        """Train every parameter (full fine-tuning)."""
        return cls("full", [("*", Selection("full"))])

    def resolve(self, model: nn.Module) -> dict[str, Selection]:
        names = [n for n, _ in model.named_parameters()]
        chosen: dict[str, Selection] = {}
        for pattern, sel in self.rules:
            for n in names:
                if pattern == "*" or pattern == n:
                    chosen[n] = sel
        return chosen

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rules": [[p, s.kind] for p, s in self.rules]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scheme:
        return cls(d.get("name", "custom"), [(p, Selection(k)) for p, k in d["rules"]])
