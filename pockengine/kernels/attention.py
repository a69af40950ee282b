"""ATen's CPU flash attention with its mask dropped at run time when the batch has no padding.

A decoder given the batch's padding mask (`attention_mask` of all ones, as a benchmark or a packed dataset passes it)
builds its attention mask from it: torch.export records the mask's ops, and the `attention_masks` pass
(pockengine/passes/attention_masks.py) cannot prove it causal at compile time, since it reads the batch. It proves
instead that the mask is the causal one (or keeps every key) whenever the padding mask is all ones. Eager PyTorch
makes the same test at run time (`attention_mask.all()`) and then calls the kernel with `is_causal=True` and no
mask, which skips the blocks above the diagonal and reads no mask. These two ops make that choice inside a compiled
program:

    flash_attention_unmasked_if(query, key, value, attn_mask, unmasked, is_causal, scale) -> (out, logsumexp)
    flash_attention_unmasked_if_backward(grad_out, query, key, value, out, logsumexp, attn_mask, unmasked,
                                         is_causal, scale) -> (grad_query, grad_key, grad_value)

`unmasked` is a 0-d bool tensor computed in the program (the padding mask is all ones): true, the kernel runs with
`is_causal` and no mask; false, with `attn_mask` (additive) and `is_causal=False`. Both read and return the same
tensors as `_scaled_dot_product_flash_attention_for_cpu` and its backward, with the same shapes and layouts, so the
memory plan holds for both. A compiler that cannot branch at run time traces the masked form
(`MASKED_COMPOSITIONS`), which gives the same result either way.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten
FLASH = aten._scaled_dot_product_flash_attention_for_cpu.default
FLASH_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default

_LIBRARY = torch.library.Library("pockengine", "FRAGMENT")
_LIBRARY.define("flash_attention_unmasked_if(Tensor query, Tensor key, Tensor value, Tensor attn_mask, "
                "Tensor unmasked, bool is_causal, float scale) -> (Tensor, Tensor)")
_LIBRARY.define("flash_attention_unmasked_if_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
                "Tensor out, Tensor logsumexp, Tensor attn_mask, Tensor unmasked, bool is_causal, float scale) "
                "-> (Tensor, Tensor, Tensor)")


def flash_masked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor,
                 unmasked: torch.Tensor, is_causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward with the mask, whatever `unmasked` says."""
    return FLASH(query, key, value, 0.0, False, attn_mask=attn_mask, scale=scale)


def flash_masked_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          out: torch.Tensor, logsumexp: torch.Tensor, attn_mask: torch.Tensor,
                          unmasked: torch.Tensor, is_causal: bool,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward with the mask, whatever `unmasked` says."""
    return FLASH_BACKWARD(grad_out, query, key, value, out, logsumexp, 0.0, False, attn_mask=attn_mask, scale=scale)


def flash_attention_unmasked_if(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor,
                                unmasked: torch.Tensor, is_causal: bool,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if bool(unmasked):
        return FLASH(query, key, value, 0.0, is_causal, scale=scale)
    return flash_masked(query, key, value, attn_mask, unmasked, is_causal, scale)


def flash_attention_unmasked_if_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                         value: torch.Tensor, out: torch.Tensor, logsumexp: torch.Tensor,
                                         attn_mask: torch.Tensor, unmasked: torch.Tensor, is_causal: bool,
                                         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if bool(unmasked):
        return FLASH_BACKWARD(grad_out, query, key, value, out, logsumexp, 0.0, is_causal, scale=scale)
    return flash_masked_backward(grad_out, query, key, value, out, logsumexp, attn_mask, unmasked, is_causal, scale)


_LIBRARY.impl("flash_attention_unmasked_if", flash_attention_unmasked_if, "CPU")
_LIBRARY.impl("flash_attention_unmasked_if_backward", flash_attention_unmasked_if_backward, "CPU")
# Shapes (meta tensors: the memory plan, shape inference): the masked form, which has the same outputs.
_LIBRARY.impl("flash_attention_unmasked_if", flash_masked, "Meta")
_LIBRARY.impl("flash_attention_unmasked_if_backward", flash_masked_backward, "Meta")

FLASH_UNMASKED_IF = torch.ops.pockengine.flash_attention_unmasked_if.default
FLASH_UNMASKED_IF_BACKWARD = torch.ops.pockengine.flash_attention_unmasked_if_backward.default

# The ops as one ATen op each, for a program that cannot branch at run time (Inductor's graph, the ONNX export).
MASKED_COMPOSITIONS = {FLASH_UNMASKED_IF: flash_masked, FLASH_UNMASKED_IF_BACKWARD: flash_masked_backward}
