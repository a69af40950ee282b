"""Importing this package fills the VJP registry, one module per op family."""

from pockengine.autodiff.rules import (attention, cross_entropy, ctc, custom_function,  # noqa: F401
                                       elementwise, linalg, norm, reduce, shape)
