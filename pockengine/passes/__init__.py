"""Graph-to-graph transformations of the training program, each a plain function easy to test alone."""

from pockengine.passes.activation_masks import compact_activation_masks
from pockengine.passes.chunk_frozen import chunk_frozen_prefix, frozen_region, plan_chunks
from pockengine.passes.constant_fold import fold_constants
from pockengine.passes.fold_batchnorm import fold_frozen_batchnorm
from pockengine.passes.inplace import run_in_place
from pockengine.passes.layout import to_channels_last, uses_convolution
from pockengine.passes.rematerialize import rematerialize_weight_values

__all__ = ["chunk_frozen_prefix", "compact_activation_masks", "fold_constants", "fold_frozen_batchnorm",
           "frozen_region", "plan_chunks", "rematerialize_weight_values", "run_in_place", "to_channels_last", "uses_convolution"]
