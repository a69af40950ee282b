"""Where a node of the exported program comes from, as the user knows it: the module path inside their model.

The capture exports a wrapper holding the user's model as its attribute `model` (export.py), so the module paths
torch.export records (`nn_module_stack`) start with `model.`; a node outside it comes from the loss function.
"""

from __future__ import annotations

import torch

MODEL = "model"  # attribute name of the user's model inside the capture wrapper


def strip_model_prefix(path: str) -> str:
    if path == MODEL:
        return ""
    return path.removeprefix(MODEL + ".")


def module_path(fx_node: torch.fx.Node) -> tuple[str, bool]:
    """(module path relative to the model, whether the node lies inside the model rather than in the loss)."""
    stack = fx_node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", False
    path = list(stack.values())[-1][0]
    inside = path == MODEL or path.startswith(MODEL + ".")
    return (strip_model_prefix(path) if inside else ""), inside


def described(fx_node: torch.fx.Node) -> str:
    """"in module 'path' (Class)", "in the model's forward (Class)" or "in the loss", for messages."""
    stack = fx_node.meta.get("nn_module_stack") or {}
    if not stack:
        return "in the model's forward or the loss"
    path, inside = module_path(fx_node)
    if not inside:
        return "in the loss"
    cls = list(stack.values())[-1][1]
    name = (cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))).rpartition(".")[2]
    return f"in module '{path}' ({name})" if path else f"in the model's forward ({name})"
