"""The VJP of the marker torch.export leaves after each custom torch.autograd.Function's output (see
pockengine/capture/export.py): the Function's backward was dropped at capture. Where it was checked to be the
derivative of the forward, the gradient passes through (the forward's ops are differentiated); otherwise it is
refused by name, never guessed."""

import torch

from pockengine.capture.export import FUNCTIONS_AGREEING  # also defines the marker op
from pockengine.autodiff.engine import VJPContext
from pockengine.autodiff.registry import InputCotangents, OutputCotangent, register
from pockengine.errors import CaptureError


@register(torch.ops.pockengine.autograd_function_output.default)
def _refuse_autograd_function(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    node = ctx.node
    if node.args[1] in FUNCTIONS_AGREEING:
        return g, None
    raise CaptureError(
        f"the custom torch.autograd.Function {node.args[1]} (module '{node.module or '<top level>'}') lies on the "
        "path from the trained parameters to the loss, and pockengine cannot use its backward: torch.export records "
        "only its forward, and its backward is not the derivative of that forward (compared on the example batch), "
        "so differentiating the forward would silently give wrong gradients. Either train only "
        "parameters after it (freeze the layers before it in the scheme, or set requires_grad=False on them), or "
        "replace the Function with ordinary differentiable PyTorch ops.")
