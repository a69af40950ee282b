"""torch.distributions are traced without their argument validation.

A distribution validates its parameters when it is made, and a value when it scores it (`log_prob`), by default
(`Distribution._validate_args`): `if not valid.all(): raise ValueError(...)`, a branch on tensor values that
torch.export cannot trace. So a loss `-Normal(mu, sigma).log_prob(y).mean()` (the distribution heads of
Hugging Face's time-series models) and GroupViT's Gumbel noise (`Gumbel(0, 1).sample(shape)`) failed to capture.
The checks only raise on invalid arguments (a negative scale, a value outside the support); while tracing they are
off, as `torch.distributions.Distribution.set_default_validate_args(False)` turns them off, and the program
computes what the distribution computes with valid arguments. A distribution made with `validate_args=True`
keeps its checks, and torch.export's error names its line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch.distributions import Distribution


@contextmanager
def distribution_checks_off() -> Iterator[None]:
    default = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(default)
