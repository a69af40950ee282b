"""Graph-to-graph transformations of the training program, each a plain function easy to test alone."""

from pockengine.passes.activation_masks import compact_activation_masks
from pockengine.passes.fold_batchnorm import fold_frozen_batchnorm
from pockengine.passes.inplace import run_in_place
from pockengine.passes.layout import to_channels_last, uses_convolution

__all__ = ["compact_activation_masks", "fold_frozen_batchnorm", "run_in_place", "to_channels_last",
           "uses_convolution"]
