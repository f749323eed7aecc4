"""2-D convolution (cross-correlation, as in ONNX/PyTorch) with stride, padding, dilation and groups.

The forward pass is an im2col matrix product; the transpose multiplies by the kernel per sample and
scatters back one kernel offset at a time (a loop over kh*kw offsets, never over pixels or samples;
see ``scatter_taps``). The L2 operator-norm bound embeds the zero-padded convolution in a circular
one on the padded grid and takes the exact largest singular
value over all Fourier frequencies (Sedghi et al. 2019): restriction and subsampling (stride) can only
shrink the norm, so this is a guaranteed upper bound under the real padding and stride."""

from __future__ import annotations

import numpy

from ...backend import asnumpy
from ..registry import AffineOp, register
from .dense import SVD_SLACK


def pad2d(xp, x, pads, value=0.0):
    """Pad the two last axes by (top, left, bottom, right)."""
    t, l, b, r = pads
    if not any(pads):
        return x
    return xp.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), mode="constant", constant_values=value)


def windows(xp, x, kernel, stride, dilation):
    """A strided view (N, C, Ho, Wo, kh, kw) of the sliding windows of an already padded x."""
    n, c, h, w = x.shape
    kh, kw = kernel
    sh, sw = stride
    dh, dw = dilation
    ho = (h - dh * (kh - 1) - 1) // sh + 1
    wo = (w - dw * (kw - 1) - 1) // sw + 1
    x = xp.ascontiguousarray(x)
    s = x.strides
    shape = (n, c, ho, wo, kh, kw)
    strides = (s[0], s[1], s[2] * sh, s[3] * sw, s[2] * dh, s[3] * dw)
    return xp.lib.stride_tricks.as_strided(x, shape=shape, strides=strides)


def scatter_windows(xp, cols, in_shape, kernel, stride, dilation, pads):
    """Transpose of ``windows`` followed by padding: sum window entries (N, C, Ho, Wo, kh, kw) back
    into an (N, C, H, W) array, dropping the padding."""
    n, c, h, w = in_shape
    t, l, b, r = pads
    out = xp.zeros((n, c, h + t + b, w + l + r), dtype=cols.dtype)
    _, _, ho, wo, kh, kw = cols.shape
    sh, sw = stride
    dh, dw = dilation
    for i in range(kh):
        for j in range(kw):
            out[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw] += cols[..., i, j]
    return out[:, :, t: t + h, l: l + w]


def scatter_taps(xp, cols, in_hw, stride, dilation, pads):
    """The transposed convolution's scatter: per-tap products (N, g, kh, kw, Cin/g, Ho, Wo) summed
    into (N, g * Cin/g, H, W), dropping the padding (a view into a fresh array).

    Tap (i, j) lands on padded rows i * dh + sh * y, i.e. on row (i * dh) // sh + y of the phase
    (i * dh) % sh; accumulating per phase makes every addition a contiguous run of Wo floats (not
    every sh-th one), and one interleaving copy at the end restores the grid. Each output entry gets
    its terms in tap order, as a direct scatter would."""
    n, groups, kh, kw, cin_g, ho, wo = cols.shape
    h, w = in_hw
    t, l, b, r = pads
    sh, sw = stride
    dh, dw = dilation
    hq = max(-(-(h + t + b) // sh), (kh - 1) * dh // sh + ho)
    wq = max(-(-(w + l + r) // sw), (kw - 1) * dw // sw + wo)
    grid = xp.zeros((sh, sw, n, groups, cin_g, hq, wq), dtype=cols.dtype)
    for i in range(kh):
        row, p = divmod(i * dh, sh)
        for j in range(kw):
            col, q = divmod(j * dw, sw)
            grid[p, q, :, :, :, row:row + ho, col:col + wo] += cols[:, :, i, j]
    full = grid.transpose(2, 3, 4, 5, 0, 6, 1).reshape(n, groups * cin_g, hq * sh, wq * sw)
    return full[:, :, t:t + h, l:l + w]


#: Phase outputs x input channels (sh * sw * Cin) from which a strided transpose runs as one GEMM.
PHASE_GEMM_MIN = 16


def phase_transpose(xp, g, weight, stride, pads, in_hw):
    """The transpose of a strided convolution (groups 1, no dilation) as one matrix product per sample.

    Kernel row a = sh * m + p (zero-padded to a multiple of sh) sends g[i] to padded row
    sh * (i + m) + p: phase p of the input is a sum over m of g shifted down by m, times the kernel
    rows of that phase. The mh x mw shifted copies of g stack into (N, Cout * mh * mw, Hq * Wq),
    channels first like g, so a (sh * sw * Cin, Cout * mh * mw) kernel matrix gives every phase at
    once, and one interleaving copy restores the grid. Each entry sums the products of the direct
    scatter, plus exact zeros."""
    cout, cin, kh, kw = weight.shape
    n, _, ho, wo = g.shape
    h, w = in_hw
    t, l, _, _ = pads
    sh, sw = stride
    mh, mw = -(-kh // sh), -(-kw // sw)
    padded = xp.zeros((cout, cin, mh * sh, mw * sw), dtype=weight.dtype)
    padded[:, :, :kh, :kw] = weight
    kmat = padded.reshape(cout, cin, mh, sh, mw, sw).transpose(3, 5, 1, 0, 2, 4).reshape(sh * sw * cin, -1)
    hq, wq = ho + mh - 1, wo + mw - 1
    shifted = xp.zeros((n, cout, mh, mw, hq, wq), dtype=g.dtype)
    for m in range(mh):
        for q in range(mw):
            shifted[:, :, m, q, m:m + ho, q:q + wo] = g
    out = xp.matmul(kmat, shifted.reshape(n, cout * mh * mw, hq * wq))  # (N, sh * sw * Cin, Hq * Wq)
    out = out.reshape(n, sh, sw, cin, hq, wq).transpose(0, 3, 4, 1, 5, 2).reshape(n, cin, hq * sh, wq * sw)
    short_h, short_w = max(0, t + h - hq * sh), max(0, l + w - wq * sw)
    if short_h or short_w:  # input rows past every window's reach: no term reaches them
        out = pad2d(xp, out, (0, 0, short_h, short_w))
    return out[:, :, t:t + h, l:l + w]


def attrs_of(node):
    a = node.attrs
    return (tuple(a.get("stride", (1, 1))), tuple(a.get("padding", (0, 0, 0, 0))),
            tuple(a.get("dilation", (1, 1))), int(a.get("groups", 1)))


@register("conv")
class Conv(AffineOp):
    """params: weight (Cout, Cin/groups, kh, kw), bias (Cout,) optional;
    attrs: stride (sh, sw), padding (top, left, bottom, right), dilation (dh, dw), groups."""

    def _conv(self, xp, node, x, weight):
        stride, pads, dilation, groups = attrs_of(node)
        cout, cin_g, kh, kw = weight.shape
        win = windows(xp, pad2d(xp, x, pads), (kh, kw), stride, dilation)
        n, c, ho, wo = win.shape[:4]
        # (N, g, Cin/g, Ho, Wo, kh, kw) -> (g, N*Ho*Wo, Cin/g*kh*kw)
        cols = win.reshape(n, groups, cin_g, ho, wo, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6)
        cols = cols.reshape(groups, n * ho * wo, cin_g * kh * kw)
        wmat = weight.reshape(groups, cout // groups, cin_g * kh * kw)
        out = xp.matmul(cols, wmat.transpose(0, 2, 1))  # (g, N*Ho*Wo, Cout/g)
        out = out.reshape(groups, n, ho, wo, cout // groups).transpose(1, 0, 4, 2, 3)
        return out.reshape(n, cout, ho, wo)

    def linear(self, xp, node, x):
        return self._conv(xp, node, x, node.params["weight"])

    def abs_linear(self, xp, node, r):
        return self._conv(xp, node, r, xp.abs(node.params["weight"]))

    def bias(self, xp, node):
        b = node.params.get("bias")
        return None if b is None else b.reshape(1, -1, 1, 1)

    def linear_t(self, xp, node, g):
        stride, pads, dilation, groups = attrs_of(node)
        weight = node.params["weight"]
        cout, cin_g, kh, kw = weight.shape
        n, _, ho, wo = g.shape
        in_hw = tuple(node.attrs["in_shape"][1:])
        if groups == 1 and dilation == (1, 1) and stride != (1, 1) and stride[0] * stride[1] * cin_g >= PHASE_GEMM_MIN:
            return (phase_transpose(xp, g, weight, stride, pads, in_hw),)
        cg = cout // groups
        wmat = weight.reshape(groups, cg, cin_g, kh, kw).transpose(0, 3, 4, 2, 1).reshape(groups, -1, cg)
        cols = xp.matmul(wmat[None], g.reshape(n, groups, cg, ho * wo))  # (N, g, kh*kw*Cin/g, Ho*Wo)
        cols = cols.reshape(n, groups, kh, kw, cin_g, ho, wo)
        return (scatter_taps(xp, cols, in_hw, stride, dilation, pads),)

    def fan_in(self, node):
        _, cin_g, kh, kw = node.params["weight"].shape
        return int(cin_g * kh * kw)

    def op_norm(self, node, in_shapes):
        stride, pads, dilation, groups = attrs_of(node)
        return conv_norm_bound(asnumpy(node.params["weight"]), in_shapes[0][1:], pads, dilation, groups)


def dilate_kernel(weight, dilation):
    """The equivalent undilated kernel with zeros between taps."""
    dh, dw = dilation
    if (dh, dw) == (1, 1):
        return weight
    cout, cin, kh, kw = weight.shape
    out = numpy.zeros((cout, cin, dh * (kh - 1) + 1, dw * (kw - 1) + 1), dtype=weight.dtype)
    out[:, :, ::dh, ::dw] = weight
    return out


def conv_norm_bound(weight, in_hw, pads, dilation=(1, 1), groups=1) -> float:
    """Guaranteed upper bound of the L2 operator norm of a zero-padded 2-D convolution on inputs of
    spatial size ``in_hw``, whatever its stride (see the module docstring)."""
    w = dilate_kernel(numpy.asarray(weight, dtype=numpy.float64), dilation)
    cout, cin_g, kh, kw = w.shape
    t, l, b, r = pads
    n1 = max(in_hw[0] + t + b, kh)
    n2 = max(in_hw[1] + l + r, kw)
    best = 0.0
    per_group = cout // groups
    for k in range(groups):  # groups act on disjoint channels: the norm is the largest group's norm
        spectrum = numpy.fft.fft2(w[k * per_group:(k + 1) * per_group], s=(n1, n2))  # (Cout/g, Cin/g, n1, n2)
        mats = spectrum.transpose(2, 3, 0, 1).reshape(n1 * n2, per_group, cin_g)
        best = max(best, float(numpy.linalg.svd(mats, compute_uv=False)[:, 0].max()))
    fft_slack = 1e-9 * float(numpy.abs(w).sum())  # FFT rounding is relative to the l1 mass of the kernel
    return best * (1 + SVD_SLACK) + fft_slack + 1e-300
