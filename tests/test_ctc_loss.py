"""CTC loss as speech models train with it: `nn.CTCLoss` / `F.ctc_loss` with each sequence's length given as a
tensor (torch.export cannot trace ATen's op: one of its outputs is as long as the longest target, a value), or as a
list, with padded (N, S) or concatenated 1-d targets, every reduction, `zero_infinity` on and off. Gradients against
torch.autograd in float64 (relative error <= 1e-10: the same ATen kernels run on both sides), and SGD steps against
eager PyTorch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pockengine as pe


class SpeechHead(nn.Module):
    """Frames -> per-frame class log-probabilities -> CTC loss, as an acoustic model's training forward."""

    def __init__(self, reduction: str, zero_infinity: bool, lengths_as_lists: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 6))
        self.ctc = nn.CTCLoss(blank=0, reduction=reduction, zero_infinity=zero_infinity)
        self.lengths_as_lists = lengths_as_lists

    def forward(self, frames, targets, input_lengths, target_lengths):
        log_probs = F.log_softmax(self.encoder(frames), -1).transpose(0, 1)  # (time, batch, classes)
        if self.lengths_as_lists:  # fixed lengths, known in Python (batch 0's)
            input_lengths, target_lengths = [12, 9, 10], [4, 2, 3]
        loss = self.ctc(log_probs, targets, input_lengths, target_lengths)
        return loss.mean() if loss.dim() else loss


def _batch(seed: int, impossible: bool = False, concatenated: bool = False):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(3, 12, 4, generator=g, dtype=torch.float64)
    targets = torch.randint(1, 6, (3, 4), generator=g)
    input_lengths = torch.tensor([12, 9, 6 if impossible else 10])
    target_lengths = torch.tensor([4, 2, 4 if impossible else 3])
    if impossible:  # 4 repeated labels need 7 frames: eager's loss is inf (0 with zero_infinity)
        targets[2] = 2
    if concatenated:
        targets = torch.cat([targets[i, :n] for i, n in enumerate(target_lengths.tolist())])
    return (frames, targets, input_lengths, target_lengths), None


def _loss(out, target):
    return out


def _compare(model: nn.Module, batches: list) -> None:
    trainer = pe.compile(copy.deepcopy(model).double(), _loss, batches[0])
    for batch in batches:
        ref = copy.deepcopy(trainer.model)
        expected = ref(*batch[0])
        expected.backward()
        assert trainer.loss(batch) == pytest.approx(expected.item(), rel=1e-12)
        grads = trainer.gradients(batch)
        for name, p in ref.named_parameters():
            assert torch.allclose(grads[name], p.grad, rtol=1e-10, atol=1e-14), name


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["padded", "concatenated", "lists"])
def test_ctc_loss_with_tensor_lengths_matches_autograd(reduction, layout):
    model = SpeechHead(reduction, zero_infinity=False, lengths_as_lists=layout == "lists")
    concatenated = layout == "concatenated"
    batches = [_batch(0, concatenated=concatenated)]
    if not concatenated:  # another batch of the same shapes, other lengths: the lengths are inputs, not constants
        batches.append(_batch(1))
    _compare(model, batches if layout != "lists" else batches[:1])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ctc_loss_zero_infinity_zeroes_the_impossible_alignment_as_eager(reduction):
    _compare(SpeechHead(reduction, zero_infinity=True), [_batch(0, impossible=True), _batch(1)])


def test_an_impossible_alignment_without_zero_infinity_stops_the_step_unchanged():
    trainer = pe.compile(SpeechHead("mean", zero_infinity=False).double(), _loss, _batch(0),
                         optimizer=pe.optim.SGD(lr=0.1))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(pe.NonFiniteLossError):
        trainer.step(_batch(0, impossible=True))
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_sgd_steps_on_ctc_loss_match_eager():
    model = SpeechHead("mean", zero_infinity=True).double()
    reference = copy.deepcopy(model)
    trainer = pe.compile(model, _loss, _batch(0), optimizer=pe.optim.SGD(lr=0.1, momentum=0.9))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for seed in range(4):
        batch = _batch(seed, impossible=seed == 2)
        optimizer.zero_grad()
        expected = reference(*batch[0])
        expected.backward()
        optimizer.step()
        assert trainer.step(batch) == pytest.approx(expected.item(), rel=1e-10)
    for name, p in reference.named_parameters():
        assert torch.allclose(dict(model.named_parameters())[name], p, rtol=1e-10, atol=1e-14), name
