"""torch.nn's transformers, traced with an attention mask: the causal hint is not read off the mask's values.

`nn.Transformer`, `nn.TransformerEncoder` and `nn.TransformerDecoder` given a mask and no `is_causal` compare the
mask with a causal one, `bool((mask == causal).all())` (`_detect_is_causal_mask`), to pass the attention a hint.
torch.export cannot branch on tensor values, so the canonical `model(src, tgt, tgt_mask=causal_mask)` failed to
capture. The hint only picks a kernel: attention with the mask and attention told to be causal compute the same
values, and pockengine's `attention_masks` pass finds a causal mask itself. So while tracing, a mask without a hint
counts as not known to be causal, and attention applies it as given.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch.nn.modules import transformer

from pockengine.capture.patched import patched


def _hint_as_given(mask: torch.Tensor | None, is_causal: bool | None = None, size: int | None = None) -> bool:
    return is_causal is True


def causal_mask_hint_unread() -> AbstractContextManager:
    return patched(transformer, "_detect_is_causal_mask", _hint_as_given)
