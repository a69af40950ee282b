"""Importing this package fills the VJP registry, one module per op family."""

from pockengine.autodiff.rules import (attention, cross_entropy, custom_function, elementwise,  # noqa: F401
                                       linalg, norm, reduce, shape)
