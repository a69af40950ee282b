"""A module cast in the forward pass (`self.layer = self.layer.to(self.dtype)`) that changes nothing is skipped.

Switch Transformers' and NLLB-MoE's routers cast their classifier to the router's dtype at every call. In eager
PyTorch that is a no-op when the weights already have that dtype, but while torch.export traces, `Module._apply`
swaps each parameter for its converted copy (they are fake tensors then), and the swap fails ("_apply(): Couldn't
swap Linear.weight"). While capturing, `Module.to` returns the module unchanged when every parameter and buffer
already has the device and dtype asked for, as eager PyTorch leaves it. A cast that would change a tensor rewrites
the model's parameters during the forward pass, which a compiled program cannot do: that is a `CaptureError`
naming the module and the way out (convert that module before compiling).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from pockengine.capture.patched import patched
from pockengine.errors import CaptureError


def _unchanged(module: nn.Module, device: torch.device | None, dtype: torch.dtype | None,
               memory_format: torch.memory_format | None) -> bool:
    for t in [*module.parameters(), *module.buffers()]:
        if device is not None and t.device != device:
            return False
        # Module.to converts the dtype of floating-point and complex tensors only
        if dtype is not None and (t.is_floating_point() or t.is_complex()) and t.dtype != dtype:
            return False
        if memory_format is not None and t.dim() == 4 and not t.is_contiguous(memory_format=memory_format):
            return False
    return True


def unchanging_module_casts_skipped(model: nn.Module) -> AbstractContextManager:
    names = {m: name for name, m in model.named_modules()}

    def to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if _unchanged(self, device, dtype, memory_format):
            return self
        name = names.get(self)
        cast = f".to({', '.join(map(str, (*args, *kwargs.values())))})"
        raise CaptureError(
            f"module {name if name is not None else type(self).__name__!r} ({type(self).__name__}) is converted "
            f"with {cast} in the forward pass, which rewrites its parameters: a compiled program cannot. Convert it "
            f"before pockengine.compile (model.get_submodule({name!r}){cast}), so that the cast changes nothing.")

    return patched(nn.Module, "to", to)
