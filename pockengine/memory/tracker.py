"""Measured memory: a dispatch-level tracker of live tensor storage, the same for pockengine and PyTorch eager.

Every tensor an ATen op returns while the tracker is active is seen by a TorchDispatchMode (for eager training
that includes the backward ops the autograd engine runs). Storages are counted once, by identity, from the op
that creates them until the last tensor using them dies, so `peak_bytes` is the high-water mark of storage
allocated during the tracked region (tensors that existed before, such as the weights, are not counted).
Allocations an op makes internally and frees before returning (kernel scratch space) are not visible here.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveStorageTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._known: set[int] = set()
        self._refs: dict[int, int] = {}

    def ignore(self, *tensors: torch.Tensor) -> None:
        """Storages that exist before the region (weights, state, batch): never counted when ops return views of
        them or update them in place."""
        for t in tensors:
            self._known.add(t.untyped_storage()._cdata)

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live_bytes -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._refs:
                self._refs[key] += 1  # another view of a storage we count already
            elif key in self._known:
                continue
            else:
                nbytes = storage.nbytes()
                self._refs[key] = 1
                self.live_bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(t, self._release, key, storage.nbytes())
        return out
