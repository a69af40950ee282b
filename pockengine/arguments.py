"""Argument types of the command line: each number is checked as it is read, and a bad one is named with its range
(argparse prints "argument --steps: must be at least 1, got 0" and exits with 2)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def integer(low: int) -> Callable[[str], int]:
    """An integer of at least `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def number(*, at_least: float | None = None, above: float | None = None, below: float | None = None
           ) -> Callable[[str], float]:
    """A finite number in the range the bounds give."""
    bounds = [f">= {at_least:g}" if at_least is not None else "", f"> {above:g}" if above is not None else "",
              f"< {below:g}" if below is not None else ""]
    wanted = "a finite number " + " and ".join(b for b in bounds if b)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or (at_least is not None and value < at_least) or (
                above is not None and value <= above) or (below is not None and value >= below):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    parse.__name__ = wanted
    return parse
