"""Importing this package fills the VJP registry, one module per op family."""

from pockengine.autodiff.rules import attention, elementwise, linalg, norm, reduce, shape  # noqa: F401
