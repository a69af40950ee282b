"""VJP rules of matrix products and convolution.

These are where sparse training pays off, so each rule computes only what is asked: a bias-only convolution
reduces the output gradient and keeps no activation; an input gradient needs the weight, not the input; and a
partially trained weight (`ctx.slice_of(weight)`) gets its gradient from the selected input channels only, which
are sliced off in the forward section so the backward keeps just that fraction of the activation.
"""

import functools
import operator

import torch

from pockengine.autodiff.engine import VJPContext
from pockengine.autodiff.registry import InputCotangents, OutputCotangent, register
from pockengine.errors import MissingVJPError

aten = torch.ops.aten


def _t(ctx, x):
    """Swap the last two dimensions."""
    n = len(x.meta.shape)
    return ctx(aten.permute.default, x, list(range(n - 2)) + [n - 1, n - 2])


def _weight_grad(ctx, activation, g, weight, weight_dim):
    """`activation^T @ g` for the weight of `x @ weight`, restricted to the selected rows of the weight if it is
    partially trained (`weight_dim` is the weight's contraction dimension, the one a slice selects)."""
    sl = ctx.slice_of(weight)
    if sl is not None and sl.dim == weight_dim:
        activation = sl.take(ctx.saved, activation, len(activation.meta.shape) - 1)
    return ctx(aten.mm.default, _t(ctx, activation), g)


@register(aten.mm.default)
def mm(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    a, b = ctx.node.args
    return (ctx(aten.mm.default, g, _t(ctx, b)) if ctx.needs(a) else None,
            _weight_grad(ctx, a, g, b, 0) if ctx.needs(b) else None)


@register(aten.bmm.default)
def bmm(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    a, b = ctx.node.args
    return (ctx(aten.bmm.default, g, _t(ctx, b)) if ctx.needs(a) else None,
            ctx(aten.bmm.default, _t(ctx, a), g) if ctx.needs(b) else None)


def _scaled_and_bias_grad(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """For beta * bias + alpha * product (addmm, addmv, addbmm): the product's cotangent (alpha * g) and the
    bias's gradient (beta * g summed to its shape), if it needs one."""
    bias = ctx.node.args[0]
    beta, alpha = ctx.kwarg("beta"), ctx.kwarg("alpha")
    scaled = g if alpha == 1 else ctx(aten.mul.Tensor, g, alpha)
    gbias = ctx.sum_to(g if beta == 1 else ctx(aten.mul.Tensor, g, beta), bias.meta.shape) if ctx.needs(bias) else None
    return scaled, gbias


@register(aten.addmm.default)
def addmm(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    _, a, b = ctx.node.args
    scaled, gbias = _scaled_and_bias_grad(ctx, g)
    return (gbias,
            ctx(aten.mm.default, scaled, _t(ctx, b)) if ctx.needs(a) else None,
            _weight_grad(ctx, a, scaled, b, 0) if ctx.needs(b) else None)


def _sliced_conv_weight_grad(ctx, g, x, w, stride, padding, dilation, output_padding, groups):
    """Sub-operator slicing: the gradient of the selected input channels of a partially trained weight, from
    only those channels of x (sliced in the forward pass, so only they are saved)."""
    sl = ctx.slice_of(w)
    x = sl.take(ctx.saved, x, 1)
    w = sl.take(ctx, w)
    if groups > 1:  # depthwise: channel c of the input feeds channel c of the output only
        g, groups = sl.take(ctx, g, 1), len(sl.channels)
    out = ctx(aten.convolution_backward.default, g, x, w, None, stride, padding, dilation, False,
              output_padding, groups, [False, True, False])
    return ctx(operator.getitem, out, 1)


def _input_grad(ctx, g, x, w, stride, padding, dilation, groups):
    """The input gradient is a transposed convolution of g with w: unlike convolution_backward it takes no x,
    so it keeps no activation alive when the weight is frozen."""
    extra = [x.meta.shape[2 + i] - ((g.meta.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                    + dilation[i] * (w.meta.shape[2 + i] - 1) + 1) for i in range(len(stride))]
    return ctx(aten.convolution.default, g, w, None, stride, padding, dilation, True, extra, groups)


def _sliceable(ctx, x, w, transposed, groups):
    sl = ctx.slice_of(w)
    depthwise = groups > 1 and groups == x.meta.shape[1] == w.meta.shape[0] and w.meta.shape[1] == 1
    return sl is not None and not transposed and (groups == 1 and sl.dim == 1 or depthwise and sl.dim == 0)


@register(aten._fft_c2c.default)
def fft_c2c(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    # A discrete Fourier transform is linear; its adjoint is the transform the other way with the same
    # normalization (the unnormalized inverse of an unnormalized forward transform), as in PyTorch.
    _x, dims, normalization, forward = ctx.node.args
    return (ctx(aten._fft_c2c.default, g, dims, normalization, not forward),)


@register(aten._fft_r2c.default)
def fft_r2c(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    # The transform of a real input made complex, as in PyTorch: a one-sided output (the half spectrum along the
    # last transformed dimension) is zero-padded back to the full spectrum first.
    x, dims, normalization, onesided = ctx.node.args
    if onesided:
        last = dims[-1] % len(x.meta.shape)
        missing = x.meta.shape[last] - g.meta.shape[last]
        g = ctx(aten.constant_pad_nd.default, g, [0, 0] * (len(x.meta.shape) - 1 - last) + [0, missing])
    return (ctx(aten.real.default, ctx(aten._fft_c2c.default, g, dims, normalization, False)),)


@register(aten._fft_c2r.default)
def fft_c2r(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    # The inverse of a one-sided transform, as in PyTorch: the one-sided transform of g, where the entries that
    # stand for two of the full spectrum (all but the first and, for an even length, the last) count twice.
    x, dims, normalization, _last_size = ctx.node.args
    last = dims[-1] % len(x.meta.shape)
    gx = ctx(aten._fft_r2c.default, g, dims, normalization, True)
    doubled = g.meta.shape[last] - x.meta.shape[last]
    if doubled <= 0:
        return (gx,)
    parts = [ctx(aten.slice.Tensor, gx, last, 0, 1),
             ctx(aten.mul.Tensor, ctx(aten.slice.Tensor, gx, last, 1, 1 + doubled), 2.0),
             ctx(aten.slice.Tensor, gx, last, 1 + doubled, x.meta.shape[last])]
    return (ctx(aten.cat.default, [p for p in parts if p.meta.shape[last] > 0], last),)


@register(aten.convolution.default)
def convolution(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = ctx.node.args
    # ATen accepts one value for all spatial dimensions (EfficientNet's padding=[1] for a 2-d convolution);
    # the input gradient's output-size arithmetic reads one per dimension.
    spatial = len(x.meta.shape) - 2
    stride, padding, dilation, output_padding = (list(v) * spatial if len(v) == 1 else list(v)
                                                 for v in (stride, padding, dilation, output_padding))
    gx = gw = gb = None
    if ctx.needs(b):
        gb = ctx(aten.sum.dim_IntList, g, [0] + list(range(2, len(g.meta.shape))))
    if ctx.needs(w) and _sliceable(ctx, x, w, transposed, groups):
        gw = _sliced_conv_weight_grad(ctx, g, x, w, stride, padding, dilation, output_padding, groups)
    elif ctx.needs(w) or transposed:
        # x is saved anyway (or the op is transposed): one fused backward computes what is needed.
        mask = [ctx.needs(x), ctx.needs(w), False]
        out = ctx(aten.convolution_backward.default, g, x, w, None, stride, padding, dilation, transposed,
                  output_padding, groups, mask)
        gx, gw = (ctx(operator.getitem, out, i) if m else None for i, m in enumerate(mask[:2]))
        return gx, gw, gb
    if ctx.needs(x):
        gx = _input_grad(ctx, g, x, w, stride, padding, dilation, groups)
    return gx, gw, gb


@register(aten._cdist_forward.default)
def cdist(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """ATen's kernel reads the gradient and distances as dense arrays, as autograd hands them."""
    a, b, p, _mode = ctx.args
    dense = lambda x: ctx(aten.contiguous.default, x)  # noqa: E731
    ga = ctx(aten._cdist_backward.default, dense(g), a, b, p, ctx.node) if ctx.needs(a) else None
    gb = None
    if ctx.needs(b):
        gb = ctx(aten._cdist_backward.default, dense(_t(ctx, g)), b, a, p, dense(_t(ctx, ctx.node)))
    return ga, gb


@register(aten.addmv.default)
def addmv(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """beta * bias + alpha * (mat @ vec)."""
    _, mat, vec = ctx.node.args
    scaled, gbias = _scaled_and_bias_grad(ctx, g)
    gmat = ctx(aten.mul.Tensor, ctx(aten.unsqueeze.default, scaled, 1), vec) if ctx.needs(mat) else None
    gvec = ctx(aten.mv.default, _t(ctx, mat), scaled) if ctx.needs(vec) else None
    return gbias, gmat, gvec


@register(aten.addbmm.default)
def addbmm(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """beta * bias + alpha * sum_b(batch1[b] @ batch2[b])."""
    _, b1, b2 = ctx.node.args
    scaled, gbias = _scaled_and_bias_grad(ctx, g)
    batch = b1.meta.shape[0]
    expanded = ctx(aten.expand.default, ctx(aten.unsqueeze.default, scaled, 0), [batch, *scaled.meta.shape])
    g1 = ctx(aten.bmm.default, expanded, _t(ctx, b2)) if ctx.needs(b1) else None
    g2 = ctx(aten.bmm.default, _t(ctx, b1), expanded) if ctx.needs(b2) else None
    return gbias, g1, g2


@register("transformers.grouped_mm_fallback.default")
def grouped_mm(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """transformers' grouped matmul of mixture-of-experts layers (transformers/integrations/moe.py), which
    torch.export records for fp32 experts: `x` (S, K) holds the tokens' rows sorted by expert, `offs` (E,) the
    cumulative row counts (int, no gradient), so expert e owns rows offs[e-1]:offs[e] (from 0), and
    out[rows of e] = x[rows of e] @ w[e] for `w` (E, K, N); rows past offs[-1] are 0.

    The weight's gradient, x_e^T @ g_e per expert, comes from the op's own backward kernel (registered with it,
    a loop over the experts), which computes the input's, g_e @ w_e^T, alongside: one pass for both when both are
    needed. The input's alone is the same grouped matmul with each w_e transposed. A partially trained `w` gets
    its selected channels only: along K from those channels of `x`, saved in the forward pass; along N from those
    of `g`; the input gradient the kernel then makes of the slices is not the input's, and is dropped."""
    x, w, offs = ctx.args
    gx = gw = None
    if ctx.needs(w):
        backward = torch.ops.transformers.grouped_mm_fallback_backward.default  # exists where the forward does
        sl = ctx.slice_of(w)
        if sl is not None and sl.dim == 1:
            out = ctx(backward, sl.take(ctx.saved, x, 1), sl.take(ctx, w), offs, g)
        elif sl is not None and sl.dim == 2:
            out = ctx(backward, x, sl.take(ctx, w), offs, sl.take(ctx, g, 1))
        else:  # the whole weight (or chosen experts, which the engine cuts from it)
            out = ctx(backward, x, w, offs, g)
            gx = ctx(operator.getitem, out, 0) if ctx.needs(x) else None
        gw = ctx(operator.getitem, out, 1)
    if ctx.needs(x) and gx is None:
        gx = ctx(ctx.node.target, g, _t(ctx, w), offs)
    return gx, gw, None


def _mH(ctx, x):
    """The conjugate transpose of a batch of matrices (the transpose for real ones)."""
    t = _t(ctx, x)
    return ctx(aten.conj.default, t) if x.meta.dtype.is_complex else t


@register(aten._linalg_eigh.default)
def linalg_eigh(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """A = V diag(L) V^H: gA = V (diag(gL) + skew(V^H gV) / E) V^H with E_ij = L_j - L_i off the diagonal, the
    skew-Hermitian part of V^H gV being the one that moves V (PyTorch's linalg_eig_backward, Hermitian case)."""
    g_values, g_vectors = g[0], g[1]
    values, vectors = ctx.graph.getitem(ctx.node, 0), ctx.graph.getitem(ctx.node, 1)
    eye = ctx(aten.diag_embed.default, ctx(aten.ones_like.default, values))
    inner = None
    if g_vectors is not None:
        vhgv = ctx(aten.matmul.default, _mH(ctx, vectors), g_vectors)
        skew = ctx(aten.mul.Tensor, ctx(aten.sub.Tensor, vhgv, _mH(ctx, vhgv)), 0.5)
        gaps = ctx(aten.add.Tensor, ctx(aten.sub.Tensor, ctx(aten.unsqueeze.default, values, -2),
                                        ctx(aten.unsqueeze.default, values, -1)), eye)
        inner = ctx(aten.mul.Tensor, ctx(aten.div.Tensor, skew, gaps), ctx(aten.rsub.Scalar, eye, 1))
    if g_values is not None:
        diagonal = ctx(aten.diag_embed.default, ctx(aten._to_copy.default, g_values, dtype=vectors.meta.dtype)
                       if g_values.meta.dtype != vectors.meta.dtype else g_values)
        inner = diagonal if inner is None else ctx(aten.add.Tensor, inner, diagonal)
    return (ctx(aten.matmul.default, vectors, ctx(aten.matmul.default, inner, _mH(ctx, vectors))), None, None)


def _real_only(ctx, a):
    """Refuse a complex input: these rules are the real case of PyTorch's formulas."""
    if a.meta.dtype.is_complex:
        raise MissingVJPError(f"{ctx.node.target} of a complex matrix (node %{ctx.node.name}) has no VJP rule, only "
                              "real ones have; freeze the parameters before it or register a rule")


@register(aten._linalg_slogdet.default)
def linalg_slogdet(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """d log|det A| = tr(A^-1 dA): gA = g A^-H (real A: the sign is piecewise constant and takes no gradient)."""
    a = ctx.node.args[0]
    _real_only(ctx, a)
    inverse = ctx.graph.getitem(ctx(aten.linalg_inv_ex.default, a), 0)
    scale = ctx(aten.unsqueeze.default, ctx(aten.unsqueeze.default, g[1], -1), -1)
    return (ctx(aten.mul.Tensor, scale, _t(ctx, inverse)),)


def _cholesky_grad(ctx, factor, g, upper):
    """A = L L^H: gA = sym(L^-H Phi(L^H gL) L^-1), Phi taking the lower triangle with the diagonal halved (Murray,
    arXiv 1602.07527, as PyTorch's cholesky_backward)."""
    lower, g_lower = (factor, g) if not upper else (_mH(ctx, factor), _mH(ctx, g))
    phi = ctx(aten.tril.default, ctx(aten.matmul.default, _mH(ctx, lower), g_lower))
    phi = ctx(aten.sub.Tensor, phi, ctx(aten.mul.Tensor, ctx(aten.diag_embed.default, ctx(
        aten.diagonal.default, phi, 0, -2, -1)), 0.5))
    left = ctx(aten.linalg_solve_triangular.default, _mH(ctx, lower), phi, upper=True)
    ga = ctx(aten.linalg_solve_triangular.default, lower, left, upper=False, left=False)
    return ctx(aten.mul.Tensor, ctx(aten.add.Tensor, ga, _mH(ctx, ga)), 0.5)


@register(aten.cholesky.default)
def cholesky(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    _a, upper = ctx.args
    return _cholesky_grad(ctx, ctx.node, g, upper), None


@register(aten.linalg_cholesky_ex.default)
def linalg_cholesky_ex(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """(L, info): only L carries a gradient."""
    return (_cholesky_grad(ctx, ctx.graph.getitem(ctx.node, 0), g[0], ctx.kwarg("upper")),)


def _skew(ctx, x):
    return ctx(aten.sub.Tensor, x, _t(ctx, x))


def _last_dims(ctx, x, rows, columns):
    """x[..., :rows, :columns]."""
    if x.meta.shape[-2] != rows:
        x = ctx(aten.slice.Tensor, x, -2, 0, rows)
    if x.meta.shape[-1] != columns:
        x = ctx(aten.slice.Tensor, x, -1, 0, columns)
    return x


@register(aten._linalg_svd.default)
def linalg_svd(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """A = U diag(S) V^T, real A (PyTorch's svd_backward): with E_ij = S_j^2 - S_i^2,
    gA = U [(skew(U^T gU) S + S skew(V^T gV)) / E + diag(gS)] V^T, plus the parts of gU (gV) outside the span of U
    (V) when A is tall (wide). Full matrices: only their first min(m, n) columns take part, as in PyTorch. Without
    U and V (svdvals) they are computed for the backward pass."""
    a, full_matrices, compute_uv = ctx.args
    _real_only(ctx, a)
    m, n = a.meta.shape[-2:]
    k = min(m, n)
    g_u, g_s, g_vh = g
    if compute_uv:
        u, s, vh = (ctx.graph.getitem(ctx.node, i) for i in range(3))
    else:
        factors = ctx.saved(aten._linalg_svd.default, a, False, True)
        u, s, vh = (ctx.graph.getitem(factors, i) for i in range(3))
        g_u = g_vh = None
    u, vh = _last_dims(ctx, u, m, k), _last_dims(ctx, vh, k, n)
    g_u = None if g_u is None else _last_dims(ctx, g_u, m, k)
    g_vh = None if g_vh is None else _last_dims(ctx, g_vh, k, n)
    s_row, s_column = ctx(aten.unsqueeze.default, s, -2), ctx(aten.unsqueeze.default, s, -1)
    if g_u is None and g_vh is None:
        scaled = ctx(aten.mul.Tensor, ctx(aten.unsqueeze.default, g_s, -1), vh)
        return ctx(aten.matmul.default, u, scaled), None, None
    squares = ctx(aten.mul.Tensor, s, s)
    gaps = ctx(aten.add.Tensor, ctx(aten.sub.Tensor, ctx(aten.unsqueeze.default, squares, -2),
                                    ctx(aten.unsqueeze.default, squares, -1)),
               ctx(aten.diag_embed.default, ctx(aten.ones_like.default, s)))
    inner = None
    if g_u is not None:
        inner = ctx(aten.mul.Tensor, _skew(ctx, ctx(aten.matmul.default, _t(ctx, u), g_u)), s_row)
    if g_vh is not None:
        right = ctx(aten.mul.Tensor, s_column, _skew(ctx, ctx(aten.matmul.default, vh, _t(ctx, g_vh))))
        inner = right if inner is None else ctx(aten.add.Tensor, inner, right)
    inner = ctx(aten.div.Tensor, inner, gaps)
    if g_s is not None:
        inner = ctx(aten.add.Tensor, inner, ctx(aten.diag_embed.default, g_s))
    if m > n and g_u is not None:
        ga = ctx(aten.matmul.default, u, inner)
        outside = ctx(aten.div.Tensor, g_u, s_row)
        outside = ctx(aten.sub.Tensor, outside, ctx(aten.matmul.default, u, ctx(aten.matmul.default, _t(ctx, u),
                                                                                   outside)))
        ga = ctx(aten.matmul.default, ctx(aten.add.Tensor, ga, outside), vh)
    elif m < n and g_vh is not None:
        ga = ctx(aten.matmul.default, inner, vh)
        outside = ctx(aten.div.Tensor, g_vh, s_column)
        outside = ctx(aten.sub.Tensor, outside, ctx(aten.matmul.default, ctx(aten.matmul.default, outside, _t(ctx, vh)),
                                                    vh))
        ga = ctx(aten.matmul.default, u, ctx(aten.add.Tensor, ga, outside))
    else:
        ga = ctx(aten.matmul.default, u, ctx(aten.matmul.default, inner, vh))
    return ga, None, None


@register(aten.linalg_qr.default)
def linalg_qr(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """A = QR, real A (PyTorch's linalg_qr_backward, arXiv 2009.10071 sections 4.3 and 4.5): with
    M = gR R^T - Q^T gQ, a tall or square A gets gA = (gQ + Q copyltu(M)) R^-T; a wide one the same through the
    first square block of R, plus Q gR."""
    a, mode = ctx.args
    _real_only(ctx, a)
    m, n = a.meta.shape[-2:]
    if mode == "r":
        raise MissingVJPError(f"linalg_qr in mode 'r' (node %{ctx.node.name}) computes no Q, which its gradient "
                              "needs; call torch.linalg.qr(A, mode='reduced')")
    if mode == "complete" and m > n:
        raise MissingVJPError(f"linalg_qr in mode 'complete' of a tall matrix (node %{ctx.node.name}) is not "
                              "differentiable (the extra columns of Q are arbitrary); use mode='reduced'")
    q, r = ctx.graph.getitem(ctx.node, 0), ctx.graph.getitem(ctx.node, 1)
    g_q, g_r = g
    terms = []
    if g_r is not None:
        terms.append(ctx(aten.matmul.default, g_r, _t(ctx, r)))
    if g_q is not None:
        terms.append(ctx(aten.neg.default, ctx(aten.matmul.default, _t(ctx, q), g_q)))
    inner = terms[0] if len(terms) == 1 else ctx(aten.add.Tensor, *terms)
    if m >= n:
        upper = ctx(aten.triu.default, inner)
        hermitian = ctx(aten.sub.Tensor, ctx(aten.add.Tensor, upper, _t(ctx, upper)),
                        ctx(aten.diag_embed.default, ctx(aten.diagonal.default, upper, 0, -2, -1)))
        rhs = ctx(aten.matmul.default, q, hermitian)
        if g_q is not None:
            rhs = ctx(aten.add.Tensor, rhs, g_q)
        return (ctx(aten.linalg_solve_triangular.default, _t(ctx, r), rhs, upper=False, left=False),)
    rhs = ctx(aten.matmul.default, q, ctx(aten.tril.default, ctx(aten.neg.default, _skew(ctx, inner))))
    square = _last_dims(ctx, r, m, m)
    ga = ctx(aten.constant_pad_nd.default, ctx(aten.linalg_solve_triangular.default, _t(ctx, square), rhs,
                                                upper=False, left=False), [0, n - m])
    if g_r is not None:
        ga = ctx(aten.add.Tensor, ga, ctx(aten.matmul.default, q, g_r))
    return (ga,)


@register(aten.linalg_pinv.atol_rtol_tensor)
def linalg_pinv(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """P = A^+, real A: the transpose of dP = -P dA P + P P^T dA^T (I - AP) + (I - PA) dA^T P^T P (Golub and
    Pereyra), the products of the smaller side first (PyTorch's pinv_backward); the tolerances take no gradient."""
    a = ctx.node.args[0]
    _real_only(ctx, a)
    m, n = a.meta.shape[-2:]
    p = ctx.node
    mm = functools.partial(ctx, aten.matmul.default)
    p_t, g_t = _t(ctx, p), _t(ctx, g)
    if m <= n:
        k = mm(g_t, p)
        k_pt = mm(k, p_t)
        terms = [ctx(aten.neg.default, _t(ctx, mm(p, k))), k_pt,
                 ctx(aten.neg.default, mm(mm(a, p), k_pt)),
                 mm(mm(p_t, p), ctx(aten.sub.Tensor, g_t, mm(k, a)))]
    else:
        k = mm(p, g_t)
        pt_k = mm(p_t, k)
        terms = [ctx(aten.neg.default, _t(ctx, mm(k, p))),
                 mm(mm(ctx(aten.sub.Tensor, g_t, mm(a, k)), p), p_t), pt_k,
                 ctx(aten.neg.default, mm(mm(pt_k, p), a))]
    ga = terms[0]
    for term in terms[1:]:
        ga = ctx(aten.add.Tensor, ga, term)
    return (ga,)


@register(aten._linalg_det.default)
def linalg_det(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """gA = g cof(A), the cofactor matrix, through an SVD A = U S V^T so that it holds at singular matrices too
    (where det A A^-T does not exist): cof(A) = det(U) det(V^T) U diag(c) V^T with c_i the product of the singular
    values other than s_i (prefix and suffix products, no division). Only the determinant takes a gradient, not the
    LU factors returned beside it."""
    a = ctx.node.args[0]
    _real_only(ctx, a)
    u, s, vh = (ctx.graph.getitem(ctx(aten._linalg_svd.default, a, full_matrices=False), i) for i in range(3))
    n = a.meta.shape[-1]
    ones = ctx(aten.ones_like.default, ctx(aten.slice.Tensor, s, -1, 0, 1))

    def exclusive_products(values):  # prod(values[..., :i]) at i
        return ctx(aten.cat.default, [ones, ctx(aten.slice.Tensor, ctx(aten.cumprod.default, values, -1), -1, 0,
                                                                 n - 1)], -1)

    before = exclusive_products(s)
    after = ctx(aten.flip.default, exclusive_products(ctx(aten.flip.default, s, [-1])), [-1])
    others = ctx(aten.mul.Tensor, before, after)
    orientation = ctx(aten.mul.Tensor, ctx(aten.sign.default, ctx.graph.getitem(ctx(aten._linalg_det.default, u), 0)),
                      ctx(aten.sign.default, ctx.graph.getitem(ctx(aten._linalg_det.default, vh), 0)))
    cofactor = ctx(aten.matmul.default, ctx(aten.mul.Tensor, u, ctx(aten.unsqueeze.default, others, -2)), vh)
    scale = ctx(aten.mul.Tensor, g[0], orientation)
    return (ctx(aten.mul.Tensor, cofactor, ctx(aten.unsqueeze.default, ctx(aten.unsqueeze.default, scale, -1), -1)),)


@register(aten.linalg_matrix_exp.default)
def linalg_matrix_exp(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """gA is the upper right block of exp([[A^T, gX], [0, A^T]]) (the Fréchet derivative of exp at A^T applied to
    gX, as PyTorch's linalg_matrix_exp_differential)."""
    a = ctx.node.args[0]
    _real_only(ctx, a)
    a_t = _t(ctx, a)
    n = a.meta.shape[-1]
    top = ctx(aten.cat.default, [a_t, g], -1)
    bottom = ctx(aten.cat.default, [ctx(aten.zeros_like.default, a_t), a_t], -1)
    block = ctx(aten.linalg_matrix_exp.default, ctx(aten.cat.default, [top, bottom], -2))
    return (ctx(aten.slice.Tensor, ctx(aten.slice.Tensor, block, -2, 0, n), -1, n, 2 * n),)


def _triangular_part(ctx, product, upper, unitriangular):
    """The part of `product` that a triangular A's gradient keeps: its triangle, off the diagonal if unitriangular
    (those entries are not read)."""
    offset = (1 if upper else -1) if unitriangular else 0
    return ctx(aten.triu.default if upper else aten.tril.default, product, offset)


@register(aten.triangular_solve.default)
def triangular_solve(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """X = op(A)^-1 B, op(A) = A or A^T, A triangular (`upper`), its diagonal taken as ones if `unitriangular`:
    gB = op(A)^-T gX; gA = -gB X^T (or -X gB^T for op(A) = A^T) restricted to A's triangle, as PyTorch's
    triangular_solve_backward. The copy of A returned beside X is A itself: its cotangent is added as is."""
    b, a, upper, transpose, unitriangular = ctx.args
    _real_only(ctx, a)
    x = ctx.graph.getitem(ctx.node, 0)
    g_x, g_copy = g[0], g[1]
    g_b = g_a = None
    if g_x is not None:
        g_b = ctx.graph.getitem(ctx(aten.triangular_solve.default, g_x, a, upper, not transpose, unitriangular), 0)
        if ctx.needs(a):
            product = ctx(aten.matmul.default, x, _t(ctx, g_b)) if transpose else \
                ctx(aten.matmul.default, g_b, _t(ctx, x))
            g_a = ctx.sum_to(_triangular_part(ctx, ctx(aten.neg.default, product), upper, unitriangular), a.meta.shape)
        g_b = ctx.sum_to(g_b, b.meta.shape) if ctx.needs(b) else None
    if g_copy is not None and ctx.needs(a):
        g_a = g_copy if g_a is None else ctx(aten.add.Tensor, g_a, g_copy)
    return g_b, g_a


@register(aten.linalg_solve_triangular.default)
def linalg_solve_triangular(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """X = A^-1 B (left) or B A^-1, A triangular: gB solves with A^T (the other triangle); gA = -gB X^T (left) or
    -X^T gB, restricted to A's triangle (PyTorch's linalg_solve_triangular_backward)."""
    a, b = ctx.args
    upper, left, unitriangular = (ctx.kwarg(k) for k in ("upper", "left", "unitriangular"))
    _real_only(ctx, a)
    g_b = ctx(aten.linalg_solve_triangular.default, _t(ctx, a), g, upper=not upper, left=left,
              unitriangular=unitriangular)
    g_a = None
    if ctx.needs(a):
        x = ctx.node
        product = ctx(aten.matmul.default, g_b, _t(ctx, x)) if left else ctx(aten.matmul.default, _t(ctx, x), g_b)
        g_a = ctx.sum_to(_triangular_part(ctx, ctx(aten.neg.default, product), upper, unitriangular), a.meta.shape)
    return g_a, ctx.sum_to(g_b, b.meta.shape) if ctx.needs(b) else None


@register(aten.linalg_inv_ex.default)
def linalg_inv_ex(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """X = A^-1: gA = -X^T gX X^T (only the inverse carries a gradient, not the error code)."""
    _real_only(ctx, ctx.node.args[0])
    inverse_t = _t(ctx, ctx.graph.getitem(ctx.node, 0))
    return (ctx(aten.neg.default, ctx(aten.matmul.default, inverse_t, ctx(aten.matmul.default, g[0], inverse_t))),)


@register(aten._linalg_solve_ex.default)
def linalg_solve_ex(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """X = A^-1 B (left) or B A^-1: gB solves the transposed system with the forward's LU factors, gA = -gB X^T
    (left) or -X^T gB; a vector B (PyTorch's rule: B.ndim == 1, or A's shape without its last dimension) is a
    one-column matrix. Broadcast batch dimensions are summed back."""
    a, b = ctx.args
    _real_only(ctx, a)
    left = ctx.kwarg("left")
    x, lu, pivots = (ctx.graph.getitem(ctx.node, i) for i in range(3))
    vector = len(b.meta.shape) == 1 or b.meta.shape == a.meta.shape[:-1]
    g_x = g[0]
    if vector:  # only with left=True (torch refuses a vector B on the right)
        g_x, x = ctx(aten.unsqueeze.default, g_x, -1), ctx(aten.unsqueeze.default, x, -1)
    g_b = ctx(aten.linalg_lu_solve.default, lu, pivots, g_x, left=left, adjoint=True)
    g_a = None
    if ctx.needs(a):
        product = ctx(aten.matmul.default, g_b, _t(ctx, x)) if left else ctx(aten.matmul.default, _t(ctx, x), g_b)
        g_a = ctx.sum_to(ctx(aten.neg.default, product), a.meta.shape)
    if vector:
        g_b = ctx(aten.squeeze.dim, g_b, -1)
    return g_a, ctx.sum_to(g_b, b.meta.shape) if ctx.needs(b) else None


@register(aten.cholesky_solve.default)
def cholesky_solve(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """X = (L L^T)^-1 B: gB = (L L^T)^-1 gX, gL = -(gB X^T + X gB^T) L (U (...) for an upper factor), as
    PyTorch's cholesky_solve_backward."""
    b, factor, upper = ctx.args
    _real_only(ctx, factor)
    g_b = ctx(aten.cholesky_solve.default, g, factor, upper)
    g_factor = None
    if ctx.needs(factor):
        common = ctx(aten.matmul.default, g_b, _t(ctx, ctx.node))
        common = ctx(aten.add.Tensor, common, _t(ctx, common))
        g_factor = ctx(aten.neg.default, ctx(aten.matmul.default, factor, common) if upper
                       else ctx(aten.matmul.default, common, factor))
        g_factor = ctx.sum_to(g_factor, factor.meta.shape)
    return (ctx.sum_to(g_b, b.meta.shape) if ctx.needs(b) else None), g_factor, None


@register(aten.cholesky_inverse.default)
def cholesky_inverse(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """X = (L L^T)^-1: gL = -X (g + g^T) X L (L X (...) for an upper factor), as PyTorch's
    cholesky_inverse_backward."""
    factor, upper = ctx.args
    _real_only(ctx, factor)
    x = ctx.node
    common = ctx(aten.matmul.default, x, ctx(aten.matmul.default, ctx(aten.add.Tensor, g, _t(ctx, g)), x))
    return ctx(aten.neg.default, ctx(aten.matmul.default, factor, common) if upper
               else ctx(aten.matmul.default, common, factor)), None



def _lu_factors(ctx, lu, pivots, unpack_pivots=True):
    factors = ctx(aten.lu_unpack.default, lu, pivots, True, unpack_pivots)
    return tuple(ctx.graph.getitem(factors, i) for i in range(3))


def _lu_packed_grad(ctx, g_l, g_u, m, n):
    """The cotangent of the packed LU matrix from those of its unit-lower L (m x k) and upper U (k x n) parts."""
    lower, upper = ctx(aten.tril.default, g_l, -1), ctx(aten.triu.default, g_u)
    if m < n:
        lower = ctx(aten.constant_pad_nd.default, lower, [0, n - m])
    elif m > n:
        upper = ctx(aten.constant_pad_nd.default, upper, [0, 0, 0, m - n])
    return ctx(aten.add.Tensor, lower, upper)


def _lu_backward(ctx, g_l, g_u, permutation, lower, upper, pivot, m, n):
    """PA = LU (L m x k unit-lower, U k x n upper; PyTorch's linalg_lu_backward). Square A:
    gA = P L^-T [tril(L^T gL, -1) + triu(gU U^T)] U^-T; a wide (tall) A solves with U's (L's) first square block and
    passes the cotangent of the rest of U (L) through L^-T (U^-T)."""
    mm = functools.partial(ctx, aten.matmul.default)
    solve = functools.partial(ctx, aten.linalg_solve_triangular.default)
    k = min(m, n)
    if m == n:
        inner = ctx(aten.add.Tensor, ctx(aten.tril.default, mm(_t(ctx, lower), g_l), -1),
                    ctx(aten.triu.default, mm(g_u, _t(ctx, upper))))
        inner = solve(_t(ctx, upper), inner, upper=False, left=False)
        ga = solve(_t(ctx, lower), inner, upper=True, left=True, unitriangular=True)
    elif m < n:
        inner = ctx(aten.sub.Tensor, mm(_t(ctx, lower), g_l), mm(ctx(aten.triu.default, g_u), _t(ctx, upper)))
        inner = solve(_t(ctx, _last_dims(ctx, upper, k, k)), ctx(aten.tril.default, inner, -1), upper=False,
                      left=False)
        inner = ctx(aten.cat.default, [ctx(aten.add.Tensor, inner, ctx(aten.triu.default, _last_dims(ctx, g_u, k, k))),
                                       ctx(aten.slice.Tensor, g_u, -1, k, n)], -1)
        ga = solve(_t(ctx, lower), inner, upper=True, left=True, unitriangular=True)
    else:
        inner = ctx(aten.sub.Tensor, mm(g_u, _t(ctx, upper)), mm(_t(ctx, lower), ctx(aten.tril.default, g_l, -1)))
        inner = solve(_t(ctx, _last_dims(ctx, lower, k, k)), ctx(aten.triu.default, inner), upper=True, left=True,
                      unitriangular=True)
        inner = ctx(aten.cat.default, [ctx(aten.add.Tensor, inner, ctx(aten.tril.default, _last_dims(ctx, g_l, k, k),
                                                                         -1)),
                                       ctx(aten.slice.Tensor, g_l, -2, k, m)], -2)
        ga = solve(_t(ctx, upper), inner, upper=False, left=False)
    return mm(permutation, ga) if pivot else ga


@register(aten.linalg_lu_factor_ex.default)
def linalg_lu_factor_ex(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """The packed factor's cotangent: its strictly lower part is L's, its upper part U's."""
    a = ctx.node.args[0]
    _real_only(ctx, a)
    m, n = a.meta.shape[-2:]
    k = min(m, n)
    pivot = ctx.kwarg("pivot")
    factors = _lu_factors(ctx, ctx.graph.getitem(ctx.node, 0), ctx.graph.getitem(ctx.node, 1), pivot)
    g_l = ctx(aten.tril.default, _last_dims(ctx, g[0], m, k), -1)
    g_u = ctx(aten.triu.default, _last_dims(ctx, g[0], k, n))
    return (_lu_backward(ctx, g_l, g_u, *factors, pivot, m, n),)


@register(aten.linalg_lu.default)
def linalg_lu(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    a = ctx.node.args[0]
    _real_only(ctx, a)
    m, n = a.meta.shape[-2:]
    pivot = ctx.kwarg("pivot")
    permutation, lower, upper = (ctx.graph.getitem(ctx.node, i) for i in range(3))
    g_l = g[1] if g[1] is not None else ctx.zeros_like(lower)
    g_u = g[2] if g[2] is not None else ctx.zeros_like(upper)
    return (_lu_backward(ctx, g_l, g_u, permutation, lower, upper, pivot, m, n),)


@register(aten.lu_unpack.default)
def lu_unpack(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """(P, L, U) are copies of the packed factor's parts; the permutation takes no gradient."""
    lu = ctx.node.args[0]
    m, n = lu.meta.shape[-2:]
    k = min(m, n)
    g_l = g[1] if g[1] is not None else ctx(aten.zeros.default, [*lu.meta.shape[:-2], m, k], dtype=lu.meta.dtype)
    g_u = g[2] if g[2] is not None else ctx(aten.zeros.default, [*lu.meta.shape[:-2], k, n], dtype=lu.meta.dtype)
    return _lu_packed_grad(ctx, g_l, g_u, m, n), None


@register(aten.linalg_lu_solve.default)
def linalg_lu_solve(ctx: VJPContext, g: OutputCotangent) -> InputCotangents:
    """X solves op(A) X = B (or X op(A) = B) from A's packed LU factors (PyTorch's linalg_lu_solve_LU): gB solves the
    adjoint system; the factor's cotangent goes through an auxiliary gR, upper part to U, strictly lower to L."""
    lu, pivots, b = ctx.args
    _real_only(ctx, lu)
    left, adjoint = ctx.kwarg("left"), ctx.kwarg("adjoint")
    x = ctx.node
    g_lu = None
    if ctx.needs(lu):
        mm = functools.partial(ctx, aten.matmul.default)
        permutation, lower, upper = _lu_factors(ctx, lu, pivots, left == adjoint)
        if left != adjoint:
            product = mm(g, _t(ctx, x)) if left else mm(_t(ctx, g), x)
            g_r = ctx(aten.linalg_solve_triangular.default, _t(ctx, upper), ctx(aten.neg.default, product),
                      upper=False)
            g_l = ctx(aten.linalg_solve_triangular.default, _t(ctx, lower), mm(g_r, _t(ctx, upper)), upper=True,
                      left=True, unitriangular=True)
            g_lu = ctx(aten.add.Tensor, ctx(aten.tril.default, g_l, -1), ctx(aten.triu.default, g_r))
        else:
            product = mm(x, _t(ctx, g)) if left else mm(_t(ctx, x), g)
            g_r = ctx(aten.neg.default, mm(mm(_t(ctx, permutation), product), permutation))
            g_r = ctx(aten.linalg_solve_triangular.default, _t(ctx, lower), g_r, upper=True, left=False,
                      unitriangular=True)
            g_u = ctx(aten.linalg_solve_triangular.default, _t(ctx, upper), mm(_t(ctx, lower), g_r), upper=False,
                      left=False)
            g_lu = ctx(aten.add.Tensor, ctx(aten.tril.default, g_r, -1), ctx(aten.triu.default, g_u))
        g_lu = ctx.sum_to(g_lu, lu.meta.shape)
    g_b = None
    if ctx.needs(b):
        g_b = ctx.sum_to(ctx(aten.linalg_lu_solve.default, lu, pivots, g, left=left, adjoint=not adjoint),
                         b.meta.shape)
    return g_lu, None, g_b
