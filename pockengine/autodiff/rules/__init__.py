"""Importing this package fills the VJP registry, one module per op family."""

from pockengine.autodiff.rules import (attention, custom_function, elementwise, linalg, norm,  # noqa: F401
                                       reduce, shape)
