"""Capture of exported programs beyond plain ATen calls: effect tokens, data-dependent shapes, batch leaves that
are not tensors, writes into the batch, stacked recurrent layers with dropout. Each case once crashed inside capture
or captured the wrong function; now it works or fails with a CaptureError that names the op or input and the way
out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pockengine as pe
from pockengine.capture.export import _ModelWithLoss
from pockengine.errors import CaptureError

from model_zoo.parity import autograd_gradients, gradient_errors


def _square_mean(output: torch.Tensor, target: object) -> torch.Tensor:
    """A loss that ignores its target."""
    return (output ** 2).mean()


def _check_gradients(model: nn.Module, loss_fn, batch) -> pe.Trainer:
    ref = autograd_gradients(model, loss_fn, batch)[1]
    trainer = pe.compile(model, loss_fn, batch)
    grads = trainer.gradients(batch)
    assert grads.keys() == ref.keys()
    assert not gradient_errors(grads, ref, exact=lambda: pytest.fail("fp32 autograd is not the reference here"))
    return trainer


class _LinearAlgebra(nn.Module):
    """A layer followed by solves against matrices of the batch: torch.export orders the error checks of
    inv, cholesky and solve (`_linalg_check_errors`) with effect tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return y @ torch.linalg.inv(m) + y * torch.linalg.solve(m, x.mT).mT + y @ torch.linalg.cholesky(m @ m.mT)


def test_linalg_error_checks_are_captured_and_kept():
    torch.manual_seed(0)
    m = torch.randn(2, 3, 3) + 3 * torch.eye(3)
    batch = ((torch.randn(2, 4, 3), m), None)
    trainer = _check_gradients(_LinearAlgebra(), _square_mean, batch)
    checks = [n for n in trainer.program().graph.nodes if n.target is torch.ops.aten._linalg_check_errors.default]
    assert len(checks) == 3  # nothing reads them; they stay for their effect
    # ... which is PyTorch's error on a singular matrix, raised before any update
    singular = m.clone()
    singular[0] = 0
    before = trainer.model.layer.weight.detach().clone()
    with pytest.raises(torch.linalg.LinAlgError):
        trainer.step(((batch[0][0], singular), None))
    assert torch.equal(trainer.model.layer.weight, before)


class _MaskedSelect(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return torch.masked_select(y, y > 0)


class _TensorSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        return torch.tensor_split(self.layer(x), at, dim=1)[0]


def test_data_dependent_output_shape_is_a_capture_error():
    with pytest.raises(CaptureError,
                       match=r"masked_select.*the model's forward.*shape depends on the values.*torch\.where"):
        pe.compile(_MaskedSelect(), _square_mean, ((torch.randn(2, 3),), None))
    # Tensor indices are read into Python numbers to compute the sizes
    with pytest.raises(CaptureError, match=r"_local_scalar_dense.*reads a tensor's value.*Python integers"):
        pe.compile(_TensorSplit(), _square_mean, ((torch.randn(2, 4), torch.tensor([1, 3])), None))


class _CheckedLengths(nn.Module):
    """Numbers read out of a tensor only to be checked, as XLM's `assert lengths.max().item() <= slen` (torch.export
    records both forms as the same runtime assertion)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        torch._check(lengths.max().item() <= x.shape[1])
        torch._check(0 < lengths.min().item())
        return self.layer(x)


def test_a_checked_item_runs_as_a_tensor_assertion():
    model, x = _CheckedLengths(), torch.randn(2, 4)
    trainer = pe.compile(model, _square_mean, ((x, torch.tensor([4, 2])), None))
    ref = autograd_gradients(model, _square_mean, ((x, torch.tensor([4, 2])), None))[1]
    assert not gradient_errors(trainer.gradients(((x, torch.tensor([3, 1])), None)), ref,
                               exact=lambda: pytest.fail("fp32 autograd is not the reference here"))
    with pytest.raises(RuntimeError, match="Runtime assertion failed"):
        trainer.gradients(((x, torch.tensor([5, 1])), None))
    with pytest.raises(RuntimeError, match="Runtime assertion failed"):
        trainer.gradients(((x, torch.tensor([3, 0])), None))


class _CheckedTensor(nn.Module):
    """A check of the batch with `torch._check_tensor_all`, as transformers' `torch_compilable_check` makes it."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        torch._check_tensor_all(lengths > 0, lambda: "lengths must be positive")
        return self.layer(x) * lengths.unsqueeze(-1)


def test_check_tensor_all_runs_in_the_program_with_autograds_gradients():
    model, x = _CheckedTensor(), torch.randn(2, 4)
    trainer = _check_gradients(model, _square_mean, ((x, torch.tensor([4, 2])), None))
    listing = str(trainer.program().graph)
    assert "_assert_async.msg" in listing and "_local_scalar_dense" not in listing
    trainer = pe.compile(model, _square_mean, ((x, torch.tensor([4, 2])), None), optimizer=pe.optim.SGD(lr=0.1))
    before = model.layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"torch._check_tensor_all failed in the model's forward \(_CheckedTensor\)"
                                           r": an element of the checked condition is False"):
        trainer.step(((x, torch.tensor([3, 0])), None))
    assert torch.equal(model.layer.weight, before) and trainer.steps_done == 0  # checked before any update
    assert trainer.step(((x, torch.tensor([3, 1])), None)) > 0


def test_siglip2s_grid_check_fails_at_run_time_naming_its_module():
    pytest.importorskip("transformers")
    from model_zoo import ZOO

    entry = ZOO["siglip2-vision"]
    model, batch = entry.build(), entry.batch()
    trainer = pe.compile(model, entry.loss, batch)
    ref = autograd_gradients(model, entry.loss, batch)[1]
    assert not gradient_errors(trainer.gradients(batch), ref,
                               exact=lambda: pytest.fail("fp32 autograd is not the reference here"))
    inputs, target = batch
    empty_grid = {**inputs, "spatial_shapes": torch.tensor([[4, 4], [0, 4]])}
    with pytest.raises(RuntimeError, match=r"torch._check_tensor_all failed in module 'embeddings' "
                                           r"\(Siglip2VisionEmbeddings\)"):
        trainer.gradients((empty_grid, target))


class _ValueBranches(nn.Module):
    """Branches on tensor values, as models write them: a validation (`if bad: raise`, Hugging Face's CTC heads'
    label check) and a branch that changes the computation (`if mask.any()`), twice at one line (a loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if ids.max() >= 10:
            raise ValueError("ids must be < 10")
        y = self.layer(x)
        for row in (0, 1):
            if (ids[row] == 0).any():  # a padded row
                y = y * 2
        return y


def test_branches_on_values_are_taken_as_on_the_example_batch_and_checked_at_run_time():
    x, ids = torch.randn(2, 4), torch.tensor([[3, 0], [4, 5]])  # row 0 padded, row 1 not
    trainer = _check_gradients(_ValueBranches(), _square_mean, ((x, ids), None))
    assert str(trainer.program().graph).count("_assert_async.msg") == 3
    trainer = pe.compile(_ValueBranches(), _square_mean, ((x, ids), None), optimizer=pe.optim.SGD(lr=0.1))
    model = trainer.model
    before = model.layer.weight.detach().clone()
    for bad in (torch.tensor([[3, 0], [4, 12]]), torch.tensor([[3, 0], [0, 5]]), torch.tensor([[3, 1], [4, 5]])):
        with pytest.raises(RuntimeError, match=r"branched on a tensor's value at .*test_capture.py:\d+ \(`if "
                                               r".*the example batch took \(the condition (True|False)\).*no update"):
            trainer.step(((x, bad), None))
        assert torch.equal(model.layer.weight, before) and trainer.steps_done == 0
    same_branches = torch.tensor([[0, 9], [7, 8]])
    expected = ((model.layer(x) * 2) ** 2).mean()  # row 0 padded: doubled once
    assert trainer.loss(((x, same_branches), None)) == pytest.approx(expected.item(), rel=1e-6)


class _BranchesOnNoise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        if (y + torch.randn_like(y)).sum() > 0:
            y = y * 2
        return y


def test_a_branch_on_a_random_value_is_a_capture_error_naming_its_line():
    """No branch decided once can follow a random draw: refused, with torch.where as the way out."""
    with pytest.raises(CaptureError, match=r"branches on a tensor's value at .*test_capture.py:\d+ "
                                           r"\(`if \(y \+ torch.randn_like\(y\)\).sum\(\) > 0:`\), computed from "
                                           r"random numbers \(aten.randn.*torch.where"):
        pe.compile(_BranchesOnNoise(), _square_mean, ((torch.randn(2, 4),), None))


class _BranchesOnABoolRead(nn.Module):
    """Longformer's global attention switch: a bool read into Python with `.item()`, branched on lines later."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, is_global: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        attends_globally = is_global.flatten().any().item()
        if attends_globally:
            y = y * 2
        return y


def test_a_bool_read_with_item_is_decided_as_on_the_example_batch_and_checked_at_run_time():
    x = torch.randn(2, 4)
    trainer = _check_gradients(_BranchesOnABoolRead(), _square_mean, ((x, torch.tensor([0, 1])), None))
    assert str(trainer.program().graph).count("_assert_async.msg") == 1
    with pytest.raises(RuntimeError, match=r"branched on a tensor's value at .*test_capture.py:\d+ \(`attends_globally "
                                           r"= is_global.flatten\(\).any\(\).item\(\)`\).*\(the condition True\)"):
        trainer.step(((x, torch.tensor([0, 0])), None))
    assert trainer.steps_done == 0
    # the other side, compiled from an example batch that takes it
    _check_gradients(_BranchesOnABoolRead(), _square_mean, ((x, torch.tensor([0, 0])), None))


class _BranchesOnANoisyBoolRead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        if (torch.rand(2) > 0.5).any().item():
            y = y * 2
        return y


def test_a_bool_read_of_a_random_value_is_a_capture_error_naming_its_line():
    with pytest.raises(CaptureError, match=r"branches on a tensor's value at .*test_capture.py:\d+ \(`if \(torch.rand"
                                           r"\(2\) > 0.5\).any\(\).item\(\):`\), computed from random numbers.*torch.where"):
        pe.compile(_BranchesOnANoisyBoolRead(), _square_mean, ((torch.randn(2, 4),), None))


class _OverlappingChunks(nn.Module):
    """Longformer's `_chunk`: windows of 2w rows every w rows, taken with as_strided of a transposed-and-reshaped
    value (a view whose strides are not row-major), so the windows read the storage in another order than the
    indices."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x)  # (seq 8, batch 2, 4)
        h = h.transpose(0, 1).reshape(2, 2, 4, 4)  # a view: (batch, chunks, 2w rows, 4)
        size, stride = list(h.size()), list(h.stride())
        size[1], stride[1] = size[1] * 2 - 1, stride[1] // 2
        return h.as_strided(size=size, stride=stride) * torch.arange(3.0).view(1, 3, 1, 1)


def test_overlapping_as_strided_windows_of_a_transposed_value_get_autograds_gradients():
    x = torch.randn(8, 2, 4)
    assert not _OverlappingChunks().layer(x).transpose(0, 1).reshape(2, 2, 4, 4).is_contiguous()
    _check_gradients(_OverlappingChunks(), _square_mean, ((x,), None))


class _TransposesWithAsStrided(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).as_strided([3, 3], [1, 3]) * torch.arange(9.0).view(3, 3)


def test_an_as_strided_of_the_same_size_in_another_order_gets_autograds_gradients():
    """Same size as its input but not a re-striding of it (a transpose): read in storage order like any window."""
    _check_gradients(_TransposesWithAsStrided(), _square_mean, ((torch.randn(3, 3),), None))


class _WindowsOverEveryOtherColumn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x)[:, ::2]  # a view with gaps in its storage
        return h.as_strided(size=[3, 4], stride=[8, 1])


def test_as_strided_windows_over_a_value_with_gaps_are_refused_by_name():
    with pytest.raises(pe.errors.MissingVJPError, match=r"as_strided to size \[3, 4\], stride \[8, 1\] of a \[4, 4\] "
                                                        r"value whose storage has gaps or overlaps \(module ''\)"):
        pe.compile(_WindowsOverEveryOtherColumn(), _square_mean, ((torch.randn(4, 8),), None))


class _LossOnActiveTokens(nn.Module):
    """ELECTRA's and Funnel's pretraining heads: the logits and the labels of the tokens the attention mask keeps,
    each picked with the mask, into a mean loss."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.layer(x).squeeze(-1)
        active = mask.view(-1) == 1
        return F.binary_cross_entropy_with_logits(logits.view(-1)[active], labels.view(-1)[active].float())


def test_a_mean_loss_over_rows_picked_by_a_mask_is_computed_over_every_row_and_kept_under_the_mask():
    """The logits and labels both picked by the mask (one row count, its picks joined by the loss's element-wise
    ops) into a mean: compiled as the sum over the kept rows over their count (capture/masked_rows.py), with
    autograd's gradients, and right for a batch whose mask keeps other rows."""
    x, labels = torch.randn(2, 3, 4), torch.tensor([[0, 1, 0], [1, 0, 1]])
    loss = lambda out, _: out  # noqa: E731
    trainer = _check_gradients(_LossOnActiveTokens(), loss, ((x, torch.tensor([[1, 1, 0], [1, 1, 1]]), labels), None))
    assert " index.Tensor(" not in str(trainer.program().graph)
    other = torch.tensor([[1, 0, 0], [0, 1, 1]])
    model = trainer.model
    assert trainer.loss(((x, other, labels), None)) == pytest.approx(model(x, other, labels).item(), rel=1e-6)


class _ChecksDroppedOutBoxes(nn.Module):
    """A validation branch on values computed through dropout (YOLOS's loss checks its predicted boxes)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.layer, self.dropout = nn.Linear(4, 4), nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(self.layer(x))
        if not (y.abs() >= 0).all():
            raise ValueError("boxes must be valid")
        return y


def test_a_branch_through_dropout_that_draws_nothing_is_decided_and_one_that_draws_is_refused():
    x = torch.randn(2, 4)
    _check_gradients(_ChecksDroppedOutBoxes(0.5).eval(), _square_mean, ((x,), None))  # train=False: no draw
    _check_gradients(_ChecksDroppedOutBoxes(0.0).train(), _square_mean, ((x,), None))  # p=0: no draw
    with pytest.raises(CaptureError, match=r"branches on a tensor's value at .*test_capture.py:\d+ \(`if not "
                                           r"\(y.abs\(\) >= 0\).all\(\):`\), computed from random numbers"):
        pe.compile(_ChecksDroppedOutBoxes(0.5).train(), _square_mean, ((x,), None))


class _RescalesItself(nn.Module):
    """RWKV in eval mode: its first forward pass rescales its weights in place."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.layer.weight.div_(2)
        return self.layer(x)


def test_a_forward_writing_into_a_parameter_is_a_capture_error():
    with pytest.raises(CaptureError, match=r"writes into its parameter 'layer.weight'.*outside the forward pass"):
        pe.compile(_RescalesItself(), _square_mean, ((torch.randn(2, 4),), None))


class _BoundedEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0))
        self.layer = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.layer(self.embed(ids))


def test_an_embedding_with_max_norm_is_refused_naming_the_renorm_and_the_way_out():
    ids = torch.randint(0, 10, (2, 3))
    with pytest.raises(CaptureError) as e:
        pe.compile(_BoundedEmbedding(), _square_mean, ((ids,), None))
    message = str(e.value)
    assert "nn.Embedding(max_norm=...)" in message and "'embed.0.weight'" in message
    assert "in module 'embed.0'" in message and "model.get_submodule('embed.0').max_norm = None" in message
    assert "RWKV" not in message
    # the way out it names works: without max_norm the same model compiles with autograd's gradients
    model = _BoundedEmbedding()
    model.embed[0].max_norm = None
    _check_gradients(model, _square_mean, ((ids,), None))


def test_other_writes_into_a_parameter_keep_the_general_advice():
    with pytest.raises(CaptureError) as e:
        pe.compile(_RescalesItself(), _square_mean, ((torch.randn(2, 4),), None))
    assert "RWKV" in str(e.value) and "max_norm" not in str(e.value)


def _line_of(function, text: str) -> str:
    """'file:line' of the line of `function`'s source containing `text`."""
    import inspect

    lines, first = inspect.getsourcelines(function)
    return f"{inspect.getsourcefile(function)}:{first + next(i for i, line in enumerate(lines) if text in line)}"


class _BranchesOnAnItem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum().item() > 0:  # Python control flow on a number read out of a tensor: torch.export cannot trace it
            return self.layer(x)
        return x


class _SizesByFoundPositions(nn.Module):
    """Longformer's global attention: its global keys sized by how many positions `nonzero()` finds."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, is_global: torch.Tensor) -> torch.Tensor:
        found = is_global.nonzero(as_tuple=True)
        keys = x.new_zeros(len(found[0]), 4)
        return self.layer(x) + keys.sum()


class _WithGlobalAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = _SizesByFoundPositions()

    def forward(self, x: torch.Tensor, is_global: torch.Tensor) -> torch.Tensor:
        return self.attention(x, is_global)


def test_a_size_counted_from_found_positions_is_refused_naming_the_module_line_and_the_way_out():
    with pytest.raises(CaptureError) as e:
        pe.compile(_WithGlobalAttention(), _square_mean, ((torch.randn(2, 4), torch.tensor([True, False])), None))
    message = str(e.value)
    assert message.startswith("torch.export could not capture the model with its loss in module 'attention' "
                              "(_SizesByFoundPositions.forward), at ")
    line = _line_of(_SizesByFoundPositions.forward, "keys = x.new_zeros")
    assert f"{line} (in forward): `keys = x.new_zeros(len(found[0]), 4)`" in message
    assert "pockengine needs a model whose forward (and loss_fn) torch.export can trace" in message


class _WritesThroughData(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.layer.weight.data.clamp_(-0.1, 0.1)
        return self.layer(x)


def test_an_export_failure_names_the_models_class_and_line():
    model = nn.Sequential(nn.Linear(4, 4), _BranchesOnAnItem())
    with pytest.raises(CaptureError) as e:
        pe.compile(model, _square_mean, ((torch.randn(2, 4),), None))
    message = str(e.value)
    assert message.startswith("torch.export could not capture the model with its loss in module '1' "
                              "(_BranchesOnAnItem.forward), at ")
    assert f"{_line_of(_BranchesOnAnItem.forward, 'if x.sum().item() > 0')} (in forward): `if x.sum().item() > 0:" in message
    assert "GuardOnDataDependentSymNode" in message and "pockengine/capture" not in message


def test_a_write_through_data_is_refused_as_a_write_into_the_parameter():
    """`.data` is traced as `detach()` (capture/stop_gradient.py), so the write it hides is seen: a write into the
    parameter, refused by name (Gemma3n's AltUp in train mode, which clips its coefficients so, now captures)."""
    model = nn.Sequential(nn.Sequential(_WritesThroughData()))
    with pytest.raises(CaptureError, match=r"writes into its parameter '0\.0\.layer\.weight' in module '0\.0'"):
        pe.compile(model, _square_mean, ((torch.randn(2, 4),), None))


class _Combinations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.combinations(self.layer(x)[0])


def test_what_torch_export_cannot_trace_is_a_capture_error():
    batch = ((torch.randn(2, 4),), None)
    with pytest.raises(Exception):  # torch.export's own limit, not pockengine's
        torch.export.export(_ModelWithLoss(_Combinations(), _square_mean), batch)
    with pytest.raises(CaptureError, match="torch.export could not capture"):
        pe.compile(_Combinations(), _square_mean, batch)


def test_a_none_target_is_allowed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    batch = ((torch.randn(5, 3),), None)
    trainer = _check_gradients(model, _square_mean, batch)
    before = trainer.loss(batch)
    trainer.step(batch)
    assert trainer.loss(batch) < before


class _WritesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        scale.mul_(2)
        return self.layer(x) * scale


def test_writing_into_an_input_is_a_capture_error_naming_it():
    batch = ((torch.randn(2, 3), torch.ones(3)), None)
    with pytest.raises(CaptureError,
                       match=r"writes in place to its input 'scale' \(batch leaf 1\) in the model's forward.*clone"):
        pe.compile(_WritesItsInput(), _square_mean, batch)
    assert torch.equal(batch[0][1], torch.ones(3))  # capture did not change the batch either


class _Recurrent(nn.Module):
    def __init__(self, layer: type[nn.RNNBase], dropout: float) -> None:
        super().__init__()
        self.layer = layer(4, 8, num_layers=3, dropout=dropout, batch_first=True, bidirectional=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x)[0][:, -1])


RECURRENT_BATCH = ((torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0)),), torch.tensor([0, 2]))


@pytest.mark.parametrize("layer", [nn.LSTM, nn.GRU, nn.RNN])
def test_stacked_recurrent_layers_keep_their_dropout_in_training_mode(layer):
    """torch 2.13's decomposition of stacked LSTM/GRU/RNN layers drops the dropout between them; capture puts it back.
    At rate 1 the dropout is deterministic (the layers above the first see zeros), so eager autograd is the oracle;
    without the dropout the loss and every gradient below the last layer would differ."""
    torch.manual_seed(0)
    model = _Recurrent(layer, dropout=1.0).train()
    trainer = _check_gradients(model, pe.losses.cross_entropy(), RECURRENT_BATCH)
    dropouts = [n for n in trainer.program(gradients=True).graph.nodes
                if n.target is torch.ops.aten.native_dropout.default]
    assert len(dropouts) == 2  # between layers 0-1 and 1-2, on both directions' concatenated output

    model.eval()
    assert not [n for n in pe.compile(model, pe.losses.cross_entropy(), RECURRENT_BATCH).program().graph.nodes
                if n.target is torch.ops.aten.native_dropout.default]


def test_a_generator_made_in_forward_is_refused_by_name():
    class DrawsItsOwn(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            generator = torch.Generator().manual_seed(0)
            return self.linear(x) * torch.rand(4, generator=generator)

    with pytest.raises(CaptureError, match="not a tensor.*torch.Generator made in forward"):
        pe.compile(DrawsItsOwn(), nn.functional.mse_loss, ((torch.randn(2, 4),), torch.randn(2, 4)))


class _Seq2Seq(nn.Module):
    """nn.Transformer as its documentation uses it: a causal target mask, no `tgt_is_causal` hint."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.transformer = nn.Transformer(8, 2, 1, 1, 16, dropout=dropout, batch_first=True)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.transformer(src, tgt, tgt_mask=mask)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torch_transformer_with_a_causal_mask_and_no_hint(mode: str):
    """torch.nn's transformers read the causality hint off the mask's values (`bool((mask == causal).all())`),
    which torch.export cannot trace; the hint only picks a kernel, so the capture applies the mask as given."""
    torch.manual_seed(0)
    model = getattr(_Seq2Seq(dropout=0.0), mode)()
    batch = ((torch.randn(2, 4, 8), torch.randn(2, 5, 8)), torch.randn(2, 5, 8))
    _check_gradients(model, nn.functional.mse_loss, batch)


def test_a_failed_capture_prints_nothing_of_torchs_own(capfd):
    """torch.export prints the graph it had traced to stderr before it re-raises, and warns that it found no user
    code: the CaptureError says what failed and where, so none of that reaches the user's terminal."""
    with pytest.raises(CaptureError):
        pe.compile(nn.Sequential(nn.Linear(4, 4), _BranchesOnAnItem()), _square_mean, ((torch.randn(2, 4),), None))
    err = capfd.readouterr().err
    assert "def forward(" not in err and "Unable to find user code" not in err


class _CastsItsRouter(nn.Module):
    """Switch Transformers' router: `self.classifier = self.classifier.to(self.dtype)` at every call."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.classifier = nn.Linear(4, 3)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.classifier = self.classifier.to(self.dtype)
        return self.classifier(x.to(self.dtype)).softmax(-1).to(x.dtype) * self.out(x)


def test_a_module_cast_in_forward_that_changes_nothing_is_skipped():
    """In eager PyTorch the cast is a no-op; torch.export alone fails on it ("_apply(): Couldn't swap
    Linear.weight")."""
    torch.manual_seed(0)
    model = _CastsItsRouter(torch.float32)
    batch = ((torch.randn(2, 4),), None)
    with pytest.raises(Exception, match="Couldn't swap"):
        torch.export.export(_ModelWithLoss(model, _square_mean), batch)
    _check_gradients(model, _square_mean, batch)
    assert model.classifier.weight.dtype == torch.float32


def test_a_module_cast_in_forward_that_changes_its_weights_is_refused_by_name():
    with pytest.raises(CaptureError, match=r"module 'classifier' \(Linear\) is converted with .to\(torch.float64\) "
                                           r"in the forward pass.*before pockengine.compile "
                                           r"\(model.get_submodule\('classifier'\).to\(torch.float64\)\)"):
        pe.compile(_CastsItsRouter(torch.float64), _square_mean, ((torch.randn(2, 4),), None))


class _BatchNormOverTime(nn.Module):
    """PatchTST's batch norm: over the channels of (batch, time, channels), transposed there and back, then viewed
    as rows. ATen's CPU kernel returns a contiguous tensor where the meta function keeps the transposed strides."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.out(y.reshape(-1, 6))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_view_of_batch_norm_over_transposed_input_runs(mode: str):
    torch.manual_seed(0)
    model = getattr(_BatchNormOverTime(), mode)()
    _check_gradients(model, _square_mean, ((torch.randn(3, 4, 6),), None))


class _GaussianHead(nn.Module):
    """A distribution head: the loss is the negative log-likelihood of the target under Normal(mu, sigma)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.distributions.Normal:
        out = self.layer(x)
        return torch.distributions.Normal(out[:, 0], nn.functional.softplus(out[:, 1]))


def _negative_log_likelihood(output: torch.distributions.Normal, target: torch.Tensor) -> torch.Tensor:
    return -output.log_prob(target).mean()


def test_a_distributions_argument_checks_are_not_traced():
    """torch.distributions check their arguments with a branch on tensor values (`if not valid.all()`), which
    torch.export alone cannot trace."""
    torch.manual_seed(0)
    batch = ((torch.randn(4, 3),), torch.randn(4))
    with pytest.raises(Exception, match="data-dependent"):
        torch.export.export(_ModelWithLoss(_GaussianHead(), _negative_log_likelihood), batch)
    _check_gradients(_GaussianHead(), _negative_log_likelihood, batch)
    assert torch.distributions.Distribution._validate_args  # the default is back after the capture
