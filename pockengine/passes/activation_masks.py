"""Keep a one-bit mask instead of the activation for ReLU-like backward ops.

The backward of ReLU, ReLU6 and hardtanh only asks, per element, whether the activation was inside the linear
range. When the saved activation is wanted by nothing else in the backward pass, this pass packs that answer into
bits in the forward pass, right after the activation (`pockengine::pack_keep`), and the backward zeroes the
gradient where the bit is 0 (`pockengine::apply_keep_`, in place): 1/32 of the fp32 activation's memory, one pass
over the data each way (pockengine/kernels/masks.py).
"""

from __future__ import annotations

import torch

from pockengine.ir.graph import Graph
from pockengine.kernels import APPLY_KEEP_, PACK_KEEP
from pockengine.ir.ops import is_view

aten = torch.ops.aten
MASK_ACTIVATION_OPS = (aten.threshold_backward.default, aten.hardtanh_backward.default)
MODES = ("bits", "off")


def compact_activation_masks(graph: Graph, mode: str = "bits", channels_last: bool = False) -> Graph:
    """Replace ReLU-like backward ops by bit masks; `channels_last` says 4-d activations lie in NHWC order."""
    if mode not in MODES:
        raise ValueError(f"activation mask mode must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return graph
    users = graph.users()
    outputs = set(graph.outputs.values())
    late = ("backward", "update")
    for saved in [n for n in graph.nodes if n.section not in late]:
        readers = [u for u in users[saved] if u.section in late]
        if not readers or any(u.target not in MASK_ACTIVATION_OPS or u.args[1] is not saved
                              or (u.target, u.args[2:]) != (readers[0].target, readers[0].args[2:])
                              for u in readers):
            continue  # kept for another reason anyway: a mask would only add memory
        first = readers[0]
        # Both ops pass the gradient where lo < x < hi (ReLU: where x > threshold).
        lo = first.args[2]
        hi = first.args[3] if first.target is aten.hardtanh_backward.default else None
        ndim = len(saved.meta.shape)
        order = [0, 2, 3, 1] if channels_last and ndim == 4 else list(range(ndim))
        bits = graph.emitter(saved, saved.module, saved.section)(PACK_KEEP, saved, lo, hi, order)
        for reader in readers:
            bwd = graph.emitter(graph.nodes[graph.nodes.index(reader) - 1], reader.module, reader.section)
            g = reader.args[0]
            # g may be overwritten when it is a value of its own that nothing but this op reads
            if g.is_input or is_view(g.target) or g.mutates or g in outputs or users[g] != [reader]:
                g = bwd(aten.clone.default, g)
            bwd(APPLY_KEEP_, g, bits, order)
            graph.replace_all_uses(reader, g)
    return graph
