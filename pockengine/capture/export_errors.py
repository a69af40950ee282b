"""The messages of captures that fail: what failed, where in the model, and the way out."""

from __future__ import annotations

import torch

from pockengine.errors import CaptureError

aten = torch.ops.aten


def parameter_mutation_error(parameter: str, module: str, write: torch.fx.Node) -> CaptureError:
    """The model writes `write`'s value into `parameter` during forward (`module`: where, '' for the model's own
    forward). An embedding's `max_norm` is the usual cause and has its own way out; RWKV's rescaling is the other
    one known."""
    where = f"in module {module!r}" if module else "in its forward"
    why = ("pockengine changes parameters only in the optimizer step, so a program repeating the write at every step "
           "would differ from eager PyTorch")
    if getattr(write.target, "overloadpacket", None) in (aten.embedding_renorm, aten.embedding_renorm_):
        return CaptureError(
            f"nn.Embedding(max_norm=...) (or F.embedding with max_norm) renormalizes its weight {parameter!r} in "
            f"place during forward ({where}: aten.embedding_renorm_); {why}. Set max_norm=None on the embedding "
            f"before compiling (`model.get_submodule({module!r}).max_norm = None`); where the bound matters, "
            "renormalize the rows between steps instead, under torch.no_grad(): "
            "torch.embedding_renorm_(weight, ids, max_norm, norm_type).")
    return CaptureError(
        f"the model writes into its parameter {parameter!r} {where}; {why}. Make the change outside the forward "
        "pass (RWKV rescales its weights on the first forward pass of each mode: run the model once in that mode "
        "before compiling).")
