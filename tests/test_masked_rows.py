"""`out[mask] = f(x[mask])` with a row-by-row `f` (X-MOD's per-language adapters) compiles to a fixed-shape
program (pockengine/capture/masked_rows.py) whose gradients equal autograd's (rel. err. <= 1e-4); a selection whose
row count matters (a reduction over the picked rows, the count itself) stays a CaptureError."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockengine as pe

TOL = 1e-4


class PerGroupAdapters(nn.Module):
    """Each sample's tokens go through the adapter of its group, as X-MOD's language adapters; `tail` is what
    happens to the picked rows before they are written back."""

    def __init__(self, tail=lambda y: y):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(4, 8)
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 8)) for _ in range(2))
        self.head = nn.Linear(8, 3)
        self.tail = tail

    def forward(self, x, group):
        h = self.encoder(x)
        out = torch.zeros_like(h)
        for i, adapter in enumerate(self.adapters):
            picked = group == i
            out[picked] = self.tail(adapter(h[picked]) * 2 + 1)
        return self.head((out + h).mean(dim=1))


def batch(groups=(0, 1, 1)):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(len(groups), 5, 4, generator=g), torch.tensor(groups)), torch.randint(0, 3, (len(groups),),
                                                                                              generator=g)


@pytest.mark.parametrize("groups", [(0, 1, 1), (1, 1, 1)], ids=["mixed", "one-group-empty"])
def test_rows_picked_by_a_mask_and_changed_row_by_row_train_as_in_eager(groups):
    model = PerGroupAdapters()
    ref = copy.deepcopy(model)
    trainer = pe.compile(model, pe.losses.cross_entropy(), batch(groups))
    grads = trainer.gradients(batch(groups))
    (x, group), y = batch(groups)
    names, params = zip(*ref.named_parameters())
    expected = dict(zip(names, torch.autograd.grad(F.cross_entropy(ref(x, group), y), params, allow_unused=True)))
    assert set(grads) == set(names)
    for name, g in grads.items():
        r = expected[name]
        if r is None or r.abs().max() == 0:  # the adapter of a group with no sample in the batch
            assert g.abs().max() == 0, name
        else:
            assert ((g - r).abs().max() / r.abs().max()).item() <= TOL, name
    # another batch of the same shape, other groups: the program picks the rows at run time
    (x, _), y = batch(groups)
    other = torch.tensor([1, 0, 0])
    loss = trainer.step(((x, other), y))
    assert abs(loss - F.cross_entropy(ref(x, other), y).item()) <= 1e-5


@pytest.mark.parametrize("tail", [lambda y: y - y.mean(dim=0), lambda y: y * y.shape[0]],
                         ids=["reduction-over-the-rows", "the-row-count"])
def test_a_selection_whose_row_count_matters_is_refused(tail):
    with pytest.raises(pe.CaptureError, match="shape depends on the values of its inputs|reads a tensor's value"):
        pe.compile(PerGroupAdapters(tail), pe.losses.cross_entropy(), batch())


class SortedExperts(nn.Module):
    """JetMoE's experts: rows sorted by expert, split at the experts' row counts read out of a tensor (`.tolist()`),
    each group through its expert's weights, concatenated back in order; two expert layers, the second splitting the
    first one's concatenation. `tail` is what happens to each group's rows before the concatenation."""

    def __init__(self, tail=lambda y: y):
        super().__init__()
        torch.manual_seed(0)
        self.router = nn.Linear(4, 3)
        self.up = nn.Parameter(torch.randn(3, 6, 4))
        self.down = nn.Parameter(torch.randn(3, 4, 6))
        self.head = nn.Linear(4, 3)
        self.tail = tail

    def forward(self, x):
        logits = self.router(x)
        gate, expert = logits.softmax(-1).max(-1)
        order = expert.argsort()
        counts = F.one_hot(expert, 3).sum(0).tolist()
        rows = x[order]
        h = torch.cat([self.tail(F.linear(g, w)) for g, w in zip(rows.split(counts), self.up)]).relu()
        y = torch.cat([F.linear(g, w) for g, w in zip(h.split(counts), self.down)])
        out = torch.zeros_like(x).index_add(0, order, y)
        return self.head(out * gate[:, None])


def expert_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(6, 4, generator=g),), torch.randint(0, 3, (6,), generator=g)


def test_rows_split_at_counts_read_out_of_a_tensor_train_as_in_eager():
    model = SortedExperts()
    ref = copy.deepcopy(model)
    trainer = pe.compile(model, pe.losses.cross_entropy(), expert_batch())
    grads = trainer.gradients(expert_batch())
    (x,), y = expert_batch()
    names, params = zip(*ref.named_parameters())
    expected = dict(zip(names, torch.autograd.grad(F.cross_entropy(ref(x), y), params)))
    assert set(grads) == set(names)
    for name, g in grads.items():
        r = expected[name]
        assert ((g - r).abs().max() / r.abs().max()).item() <= TOL, name
    # other batches of the same shape route other rows to each expert (the last one all rows to one expert): the
    # program groups the rows at run time
    routed = set()
    for seed in range(1, 5):
        (x,), y = expert_batch(seed)
        if seed == 4:
            x = x[:1].expand(6, 4).clone()
        routed.add(tuple(F.one_hot(ref.router(x).argmax(-1), 3).sum(0).tolist()))
        loss = trainer.step(((x,), y))
        assert abs(loss - F.cross_entropy(ref(x), y).item()) <= 1e-5
        ref.load_state_dict(model.state_dict())
    assert len(routed) > 1 and any(0 in counts for counts in routed)


def test_a_split_whose_group_is_reduced_is_refused():
    with pytest.raises(pe.CaptureError, match="shape depends on the values of its inputs|reads a tensor's value"):
        pe.compile(SortedExperts(lambda y: y - y.mean(dim=0)), pe.losses.cross_entropy(), expert_batch())


class EosClassifier(nn.Module):
    """BART's and T5's sequence classification heads: every sample must have as many <eos> tokens
    (`len(unique_consecutive(counts)) == 1`), and each is classified by its `position`-th one
    (`h[eos].view(B, -1, H)[:, position]`)."""

    def __init__(self, position=-1):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.position = position

    def forward(self, ids):
        h = torch.tanh(self.mix(self.embed(ids)))
        eos = ids.eq(2)
        torch._check(torch.unique_consecutive(eos.sum(1)).numel() == 1, lambda: "unequal <eos> counts")
        return self.head(h[eos, :].view(h.shape[0], -1, h.shape[-1])[:, self.position, :])


def eos_batch(eos_at):
    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 8, 7, 6, 5, 4], [5, 5, 5, 5, 5, 5]])
    for row, cols in enumerate(eos_at):
        ids[row, list(cols)] = 2
    return (ids,), torch.tensor([0, 2, 1])


@pytest.mark.parametrize("position", [-1, 0, 1])
def test_one_row_per_sample_picked_by_a_mask_trains_as_in_eager(position):
    model = EosClassifier(position)
    ref = copy.deepcopy(model)
    example = eos_batch([(1, 5), (0, 2), (3, 4)])
    trainer = pe.compile(model, pe.losses.cross_entropy(), example)
    assert "index_select" in str(trainer.program().graph)
    grads = trainer.gradients(example)
    (ids,), y = example
    names, params = zip(*ref.named_parameters())
    expected = dict(zip(names, torch.autograd.grad(F.cross_entropy(ref(ids), y), params)))
    assert set(grads) == set(names)
    for name, g in grads.items():
        r = expected[name]
        assert ((g - r).abs().max() / r.abs().max()).item() <= TOL, name
    # other <eos> positions in a batch of the same shape: the program finds them at run time
    (ids,), y = other = eos_batch([(0, 4), (2, 3), (1, 5)])
    assert abs(trainer.step(other) - F.cross_entropy(ref(ids), y).item()) <= 1e-5


@pytest.mark.parametrize("eos_at", [[(1, 5), (0,), (3, 4)], [(), (), ()]], ids=["unequal-counts", "none"])
def test_a_batch_eager_refuses_for_its_eos_counts_is_refused_as_the_program_runs(eos_at):
    trainer = pe.compile(EosClassifier(), pe.losses.cross_entropy(), eos_batch([(1, 5), (0, 2), (3, 4)]))
    with pytest.raises((RuntimeError, IndexError)):
        EosClassifier()(eos_batch(eos_at)[0][0])
    with pytest.raises(RuntimeError, match="Runtime assertion failed|do not divide into"):
        trainer.gradients(eos_batch(eos_at))


# ------------------------------------------------------------------------------------------------ writes under a mask
class MaskedWrite(nn.Module):
    """A layer's output written under a boolean mask, then a loss-shaping head: `write(h, mask, v)` is the write, `v`
    a trained vector (SpecAugment's learned embedding), so the gradients of both sides of the write are checked."""

    def __init__(self, write):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 4)
        self.v = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 3)
        self.write = write

    def forward(self, x, mask):
        h = self.layer(x)
        h = self.write(h, mask, self.v)
        return self.head(h.tanh()).flatten(0, -2)


def _scalar(h, m, v):
    h[m] = 0.5
    return h


def _vector(h, m, v):
    h[m] = v
    return h


def _vector_with_a_row_dim(h, m, v):
    h[m] = v.unsqueeze(0)  # (1, C): one row, broadcast over all picked ones
    return h


def _accumulate(h, m, v):
    return h.index_put((m,), v * 2, accumulate=True)


def _masked_fill_like(h, m, v):
    return h.index_put_((m,), torch.tensor(-1.0))


def _inverted_mask(h, m, v):
    h[~m] = v.sum()  # a 0-d tensor computed from v
    return h


def _later_dims(h, m, v):
    h[:, m[0]] = v  # the mask over dim 1 of (B, T, C): its first row's positions
    return h


# (write, mask over the leading dims of h: (rows,) of (rows, C) or (B, T) of (B, T, C))
WRITES = [(_scalar, 1), (_vector, 1), (_vector, 2), (_vector_with_a_row_dim, 2), (_accumulate, 2),
          (_masked_fill_like, 2), (_inverted_mask, 2), (_later_dims, 2)]


def _write_batch(mask_dims: int, mask: torch.Tensor) -> tuple:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*mask.shape, 4, generator=g) if mask_dims == 2 else torch.randn(mask.numel(), 4, generator=g)
    return (x, mask if mask_dims == 2 else mask.flatten()), torch.randint(0, 3, (mask.numel(),), generator=g)


@pytest.mark.parametrize("write,mask_dims", WRITES, ids=[f"{w.__name__[1:]}-{d}d" for w, d in WRITES])
def test_a_value_written_under_a_mask_is_a_where_with_autograds_gradients(write, mask_dims):
    from model_zoo.parity import autograd_gradients, gradient_errors

    model, loss = MaskedWrite(write), pe.losses.cross_entropy()
    masks = [torch.tensor([[True, False, True], [False, False, True]]), torch.ones(2, 3, dtype=torch.bool),
             torch.zeros(2, 3, dtype=torch.bool)]
    trainer = pe.compile(model, loss, _write_batch(mask_dims, masks[0]))
    ops = {str(n.target) for n in trainer.program().graph.nodes}
    assert "aten.where.self" in ops and not {"aten.index_put.default", "aten.nonzero.default"} & ops, sorted(ops)
    v_reached = False
    for mask in masks:  # the mask is read as the program runs: other counts of picked rows, none, all
        batch = _write_batch(mask_dims, mask)
        ref = autograd_gradients(model, loss, batch)[1]
        v_reached |= bool(ref["v"].abs().max() > 0)
        assert not gradient_errors(trainer.gradients(batch), ref,  # relative error <= 1e-4
                                   exact=lambda: pytest.fail("fp32 autograd is not the reference here"))
    assert v_reached == (write not in (_scalar, _masked_fill_like))  # v's side of the write is checked too
