"""`F.ctc_loss` (and `nn.CTCLoss`, which calls it) traced as pockengine's own op while a model is captured.

With lengths given as tensors (the usual way: each sequence's length in the batch), ATen's CTC loss has an output
whose size is read from the lengths' values, which torch.export cannot trace; pockengine's `ctc_loss`
(pockengine/kernels/ctc.py) has none. Lengths given as Python sequences become constant tensors of the program: the
same values, the same op. Anything else (unbatched `log_probs` of two dimensions, a call on real tensors: an eager
reference run while tracing) goes to torch as it would.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from pockengine.capture.patched import patched
from pockengine.kernels.ctc import CTC_LOSS


def traceable_ctc_loss() -> AbstractContextManager:
    original = F.ctc_loss

    def ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: Any, target_lengths: Any,
                 blank: int = 0, reduction: str = "mean", zero_infinity: bool = False) -> torch.Tensor:
        if not is_fake(log_probs) or log_probs.dim() != 3 or reduction not in ("mean", "sum", "none"):
            return original(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity)
        lengths = [x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.long, device=log_probs.device)
                   for x in (input_lengths, target_lengths)]
        return CTC_LOSS(log_probs, targets, *lengths, blank, reduction, zero_infinity)

    return patched(F, "ctc_loss", ctc_loss)
