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


class PickedTargets(nn.Module):
    """Targets picked out of padded labels by a mask and concatenated, as Hugging Face's CTC heads pass them:
    `labels.masked_select(mask)` (or `labels[mask]`), the lengths `mask.sum(-1)` or given with the batch."""

    def __init__(self, pick: str, given_lengths: bool):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 6))
        self.pick, self.given_lengths = pick, given_lengths

    def forward(self, frames, labels, input_lengths, target_lengths):
        log_probs = F.log_softmax(self.encoder(frames), -1).transpose(0, 1)
        mask = (labels != -100) & (labels != 0)  # padding, and the blank, which a transcript never holds
        targets = labels.masked_select(mask) if self.pick == "masked_select" else labels[mask]
        lengths = target_lengths if self.given_lengths else mask.sum(-1)
        return F.ctc_loss(log_probs, targets, input_lengths, lengths, reduction="mean", zero_infinity=True)


def _padded_labels(seed: int):
    (frames, targets, input_lengths, target_lengths), _ = _batch(seed)
    labels = targets.clone()
    for i, n in enumerate(target_lengths.tolist()):
        labels[i, n:] = -100
    labels[1, 0] = 0  # a blank inside a transcript: the mask drops it, so the picked entries are not a prefix
    return (frames, labels, input_lengths, (labels != -100).sum(-1) - (labels == 0).sum(-1)), None


@pytest.mark.parametrize("pick", ["masked_select", "index"])
@pytest.mark.parametrize("given_lengths", [False, True], ids=["lengths_from_mask", "lengths_given"])
def test_targets_picked_by_a_mask_match_autograd_and_have_fixed_shapes(pick, given_lengths):
    model = PickedTargets(pick, given_lengths)
    _compare(model, [_padded_labels(0), _padded_labels(1)])
    trainer = pe.compile(copy.deepcopy(model).double(), _loss, _padded_labels(0))
    listing = str(trainer.program().graph)
    assert "masked_select" not in listing and "sort.stable" in listing
    assert ("_assert_async" in listing) == given_lengths  # lengths other than the mask's counts are checked
    if given_lengths:
        (frames, labels, input_lengths, lengths), _ = _padded_labels(0)
        with pytest.raises(RuntimeError, match="target lengths are not the number of labels its mask picks"):
            trainer.loss(((frames, labels, input_lengths, lengths + 1), None))


def test_hugging_face_ctc_head_with_labels_trains_as_autograd_and_checks_its_labels_at_run_time():
    transformers = pytest.importorskip("transformers")
    from model_zoo.parity import autograd_gradients, gradient_errors

    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(vocab_size=12, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
                                         num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)
    # the library's defaults otherwise (sum reduction, blank = pad = 0); in eval mode, so that no dropout or
    # SpecAugment draw differs between autograd and pockengine (the model zoo's wav2vec2-ctc row checks train mode)
    model = transformers.Wav2Vec2ForCTC(config).eval()
    audio = torch.randn(2, 400, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[3, 4, 5, -100, -100], [6, 7, 8, 9, 10]])
    batch = ({"input_values": audio, "labels": labels}, None)

    def own_loss(output, target):
        return output.loss

    float64 = copy.deepcopy(model).double()
    ref = autograd_gradients(model, own_loss, batch)[1]
    trainer = pe.compile(model, own_loss, batch, optimizer=pe.optim.SGD(lr=0.01))
    assert not gradient_errors(trainer.gradients(batch), ref, exact=lambda: autograd_gradients(
        float64, own_loss, ({"input_values": audio.double(), "labels": labels}, None))[1])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bad = labels.clone()
    bad[0, 0] = 12  # out of the vocabulary: eager PyTorch raises "Label values must be <= vocab_size"
    with pytest.raises(RuntimeError, match=r"branched on a tensor's value at .*modeling_wav2vec2.py:\d+ "
                                           r"\(`if labels is not None and labels.max\(\) >= self.config.vocab_size:`\)"):
        trainer.step(({"input_values": audio, "labels": bad}, None))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()) and trainer.steps_done == 0
    other = torch.tensor([[5, 5, -100, -100, -100], [1, 2, 3, -100, -100]])  # other lengths, same shapes
    with torch.no_grad():
        expected = model(input_values=audio, labels=other).loss
    assert trainer.step(({"input_values": audio, "labels": other}, None)) == pytest.approx(expected.item(), rel=1e-5)
