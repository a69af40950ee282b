"""VJP rule of CTC loss with tensor lengths (pockengine/kernels/ctc.py): the gradient reaches `log_probs` only, as
autograd's derivative of `_ctc_loss` (the targets and lengths are integers)."""

from pockengine.autodiff.engine import VJPContext
from pockengine.autodiff.registry import InputCotangents, OutputCotangent, register
from pockengine.kernels.ctc import CTC_LOSS, CTC_LOSS_BACKWARD


@register(CTC_LOSS)
def ctc_loss(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity = ctx.args
    return (ctx(CTC_LOSS_BACKWARD, g, log_probs, targets, input_lengths, target_lengths, blank, reduction,
                zero_infinity),) + (None,) * 6
