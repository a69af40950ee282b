"""The optimizers: each emits its in-place update ops into the training program (see base.Optimizer)."""

from typing import Any

from pockengine.errors import UserInputError
from pockengine.optim.adamw import AdamW
from pockengine.optim.base import Optimizer
from pockengine.optim.sgd import SGD

__all__ = ["AdamW", "Optimizer", "SGD", "from_config"]


def from_config(config: dict[str, Any]) -> Optimizer:
    kinds: dict[str, type[Optimizer]] = {"SGD": SGD, "AdamW": AdamW}
    if not isinstance(config, dict) or config.get("kind") not in kinds:
        raise UserInputError(f"an optimizer config is a mapping with 'kind' one of {sorted(kinds)}, got {config!r}")
    cfg = dict(config)
    kind = cfg.pop("kind")
    try:
        return kinds[kind](**cfg)
    except TypeError as e:  # an unknown or missing keyword
        raise UserInputError(f"optimizer config {config!r} does not fit {kind}: {e}") from e
