from pockengine.optim.adamw import AdamW
from pockengine.optim.base import Optimizer, from_config
from pockengine.optim.sgd import SGD

__all__ = ["AdamW", "Optimizer", "SGD", "from_config"]
