"""pockengine's own ops (pockengine/kernels): the C kernels, their ATen fallback and ATen's backward ops agree."""

from __future__ import annotations

import pytest
import torch

from pockengine.kernels import APPLY_KEEP_, PACK_KEEP, batch_norm, native

aten = torch.ops.aten
NHWC = [0, 2, 3, 1]


@pytest.fixture
def aten_fallback(monkeypatch):
    """Run the ops' ATen compositions: the kernels turned off the way users do it."""
    monkeypatch.setenv("POCKENGINE_NATIVE", "0")
    native.library.cache_clear()
    yield
    monkeypatch.undo()
    native.library.cache_clear()


def activation(shape, channels_last):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 4
    x.view(-1)[:3] = torch.tensor([0.0, 6.0, -0.0])  # the boundaries stop the gradient
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


CASES = [((8, 24, 5, 3), True), ((2, 7, 3, 3), True), ((13,), False), ((4, 33), False), ((3,), False)]


def test_the_c_kernels_build_here():
    assert native.library() is not None  # CI has a C compiler: the fast path is what the other tests check


@pytest.mark.parametrize("shape,channels_last", CASES)
@pytest.mark.parametrize("backward", ["hardtanh", "relu"])
def test_masks_match_atens_backward_in_both_implementations(shape, channels_last, backward, monkeypatch):
    x, g = activation(shape, channels_last), activation(shape, channels_last).flip(0).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    order = NHWC if channels_last else list(range(len(shape)))
    lo, hi = (0.0, 6.0) if backward == "hardtanh" else (0.0, None)
    expected = aten.hardtanh_backward(g, x, lo, hi) if hi is not None else aten.threshold_backward(g, x, lo)
    results = {}
    for enabled in ("1", "0"):
        monkeypatch.setenv("POCKENGINE_NATIVE", enabled)
        native.library.cache_clear()
        bits = PACK_KEEP(x, lo, hi, order)
        assert bits.dtype == torch.uint8 and bits.shape == ((x.numel() + 7) // 8,)
        out = g.clone()
        assert APPLY_KEEP_(out, bits, order) is out
        results[enabled] = bits, out
    native.library.cache_clear()
    assert torch.equal(results["1"][0], results["0"][0])  # the same bits, padding included
    for _, out in results.values():
        assert torch.equal(out, expected)
        assert torch.equal(torch.signbit(out), torch.signbit(expected))  # +0.0 where stopped, as ATen writes


def test_a_nan_activation_stops_the_gradient():
    x = torch.tensor([float("nan"), 1.0] * 8)
    g = torch.ones(16)
    assert APPLY_KEEP_(g, PACK_KEEP(x, 0.0, 6.0, [0]), [0]).tolist() == [0.0, 1.0] * 8


def test_tensors_not_dense_in_the_given_order_take_the_aten_path():
    x = activation((4, 6, 5, 5), channels_last=False)  # NCHW, read in NHWC order: not a plain memory walk
    g = activation((4, 6, 5, 5), channels_last=True)
    bits = PACK_KEEP(x, 0.0, 6.0, NHWC)
    assert torch.equal(bits, PACK_KEEP(x.contiguous(memory_format=torch.channels_last), 0.0, 6.0, NHWC))
    assert torch.equal(APPLY_KEEP_(g.clone(), bits, NHWC), aten.hardtanh_backward(g, x, 0.0, 6.0))


def test_meta_tensors_give_the_shapes_for_the_memory_plan():
    x = torch.empty(3, 5, device="meta")
    assert PACK_KEEP(x, 0.0, None, [0, 1]).shape == (2,)
    assert APPLY_KEEP_(x, torch.empty(2, dtype=torch.uint8, device="meta"), [0, 1]).shape == (3, 5)


def test_without_a_compiler_the_masks_still_work_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("POCKENGINE_CACHE", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="building the native kernels"):
            assert native.library() is None
        x = activation((3, 8), channels_last=False)
        g = torch.ones(3, 8)
        assert torch.equal(APPLY_KEEP_(g.clone(), PACK_KEEP(x, 0.0, None, [0, 1]), [0, 1]),
                           aten.threshold_backward(g, x, 0.0))
    finally:
        native.library.cache_clear()


# ------------------------------------------------------------------------------------------------ batch norm
BN_CASES = [  # (N, C, H, W): odd channel counts and sizes; 2x1x1 values per channel (the backward cancels almost
    # entirely: ATen's kernels, contiguous ones too, leave 4e-4 of error there); more than FEW_ROWS rows (batch_norm.c)
    (2, 220, 1, 1), (3, 7, 5, 3), (2, 1, 4, 5), (5, 33, 3, 1), (16, 8, 32, 32), (4, 300, 8, 8)]


def _batch_norm_case(shape, affine: bool, stats: bool):
    g = torch.Generator().manual_seed(0)
    c = shape[1]
    x = (torch.randn(shape, generator=g) * 3 + 4).contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(c, generator=g), torch.randn(c, generator=g)) if affine else (None, None)
    running = (torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5) if stats else ()
    grad = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    return x, w, b, running, grad


def _batch_norm(fwd, bwd, x, w, b, running, grad):
    """Forward and backward with the batch's statistics: (out, new running statistics, dx, dw, db)."""
    out = fwd(x, w, b, *running, True, 0.1, 1e-5)
    mask = [True, w is not None, b is not None]
    grads = bwd(grad, x, w, *(running or (None, None)), out[1], out[2], True, 1e-5, mask)
    return [out[0], *(out[3:5] if running else (None, None)), *grads]


def _aten_batch_norm(stats: bool):
    return aten._native_batch_norm_legit_functional if stats else aten._native_batch_norm_legit.no_stats


@pytest.mark.parametrize("shape", BN_CASES)
@pytest.mark.parametrize("affine,stats", [(True, True), (False, False), (True, False)])
def test_batch_norm_kernels_round_float64_results(shape, affine, stats, monkeypatch):
    """Output and gradients within a few roundings of float64 arithmetic on the same float32 inputs (ATen's
    channels-last kernels, summing in float, are up to 1e-5 off at these sizes and 4e-4 at 2 values per channel);
    the running statistics as ATen updates them. Three threads where there are enough rows."""
    from pockengine.kernels import BATCH_NORM, BATCH_NORM_BACKWARD, BATCH_NORM_NO_STATS

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    monkeypatch.setattr(batch_norm, "MIN_ELEMENTS_PER_THREAD", 64)
    x, w, b, running, grad = _batch_norm_case(shape, affine, stats)
    ours = _batch_norm(BATCH_NORM if stats else BATCH_NORM_NO_STATS, BATCH_NORM_BACKWARD, x, w, b, running, grad)
    as64 = [None if t is None else t.double() for t in (x, w, b, *running, grad)]
    exact = _batch_norm(_aten_batch_norm(stats), aten.native_batch_norm_backward, as64[0], *as64[1:3],
                        tuple(as64[3:-1]), as64[-1])
    assert ours[0].is_contiguous(memory_format=torch.channels_last) and ours[3].stride() == ours[0].stride()
    for name, o, e in zip(["out", "running_mean", "running_var", "dx", "dw", "db"], ours, exact):
        if e is None:
            assert o is None, name
            continue
        assert o.dtype == torch.float32 and o.shape == e.shape, name
        tolerance = 1e-6 if name.startswith("running") else 2e-7  # running: ATen's own float arithmetic
        assert ((o.double() - e).abs().max() / e.abs().max()).item() <= tolerance, name


def test_batch_norm_backward_with_a_contiguous_gradient():
    from pockengine.kernels import BATCH_NORM, BATCH_NORM_BACKWARD

    x, w, b, running, grad = _batch_norm_case((4, 6, 3, 5), True, True)
    dense = _batch_norm(BATCH_NORM, BATCH_NORM_BACKWARD, x, w, b, running, grad)
    mixed = _batch_norm(BATCH_NORM, BATCH_NORM_BACKWARD, x, w, b, running, grad.contiguous())
    for a, e in zip(dense, mixed):
        assert torch.equal(a, e)


@pytest.mark.parametrize("layout", ["fallback", "contiguous"])
def test_batch_norm_elsewhere_is_atens_op(layout, request):
    """Without the kernels (POCKENGINE_NATIVE=0), and for a contiguous (NCHW) input, whose ATen kernels sum in
    double already, the ops are ATen's, bit for bit."""
    from pockengine.kernels import BATCH_NORM, BATCH_NORM_BACKWARD, BATCH_NORM_NO_STATS

    if layout == "fallback":
        request.getfixturevalue("aten_fallback")
    for stats in (True, False):
        x, w, b, running, grad = _batch_norm_case((3, 5, 4, 4), True, stats)
        if layout == "contiguous":
            x, grad = x.contiguous(), grad.contiguous()
        ours = _batch_norm(BATCH_NORM if stats else BATCH_NORM_NO_STATS, BATCH_NORM_BACKWARD, x, w, b, running, grad)
        theirs = _batch_norm(_aten_batch_norm(stats), aten.native_batch_norm_backward, x, w, b, running, grad)
        for a, e in zip(ours, theirs):
            assert (a is None and e is None) or torch.equal(a, e)


def test_batch_norm_meta_shapes():
    from pockengine.kernels import BATCH_NORM, BATCH_NORM_BACKWARD

    x, w = torch.empty(2, 3, 4, 4, device="meta"), torch.empty(3, device="meta")
    out = BATCH_NORM(x, w, w, w, w, True, 0.1, 1e-5)
    assert [t.shape for t in out] == [(2, 3, 4, 4)] + [(3,)] * 4
    dx, dw, db = BATCH_NORM_BACKWARD(x, x, w, w, w, out[1], out[2], True, 1e-5, [True, False, True])
    assert dx.shape == x.shape and dw is None and db.shape == (3,)
