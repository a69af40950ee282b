"""pockengine's own ops (pockengine/kernels): the C kernels, their ATen fallback and ATen's backward ops agree."""

from __future__ import annotations

import pytest
import torch

from pockengine.kernels import APPLY_KEEP_, PACK_KEEP, native

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
