"""Graph-to-graph transformations of the training program, each a plain function easy to test alone."""

from pockengine.passes.activation_masks import compact_activation_masks
from pockengine.passes.attention_masks import simplify_attention_masks
from pockengine.passes.chunk_frozen import chunk_for_memory, chunk_frozen_prefix, frozen_region, plan_chunks
from pockengine.passes.clones import drop_redundant_clones
from pockengine.passes.constant_fold import fold_constants
from pockengine.passes.early_update import update_early
from pockengine.passes.fold_batchnorm import fold_frozen_batchnorm
from pockengine.passes.fused_cross_entropy import fuse_linear_cross_entropy
from pockengine.passes.inplace import run_in_place
from pockengine.passes.layout import to_channels_last, uses_convolution
from pockengine.passes.pointwise_matmul import pointwise_convolutions_as_matmul
from pockengine.passes.rematerialize import rematerialize

__all__ = ["chunk_for_memory", "chunk_frozen_prefix", "compact_activation_masks", "drop_redundant_clones",
           "fold_constants", "fold_frozen_batchnorm", "frozen_region", "fuse_linear_cross_entropy", "plan_chunks",
           "pointwise_convolutions_as_matmul", "rematerialize", "run_in_place", "simplify_attention_masks",
           "to_channels_last", "update_early", "uses_convolution"]
