"""CROWN's backward rules for the nonlinear ops, keyed by op name in ``BACKWARD_RULES``.

A rule maps the linear coefficients ``lam`` (b, S, *out_shape) of a lower bound that reads the op's
output to coefficients on its inputs, for every point of the region: with lines
``lower(o) <= out_o <= upper(o)`` (each affine in the op's inputs and valid on the inputs' bounds),
lam . out >= lam+ . lower + lam- . upper (Zhang et al. 2018, CROWN, eq. 4). A rule returns a ``Step``:
the input coefficients, the constant it adds (B, S), and |lam| . w for a per-output-element weight w
that bounds the floating-point error the step commits (see ``robeval.certifiers.crown``).

Elementwise ops (relu, leaky_relu, sigmoid, tanh, clip) use the op's own ``relax`` rule. The others:

- ``maxpool`` and ``max``: the lower line is the input with the largest lower bound (DeepPoly, Singh
  et al. 2019; auto_LiRPA's BoundMaxPool); the upper line is the tighter, over the input box, of the
  constant max_j u_j (DeepPoly) and x_j + sum_{i != j} relu(x_i - x_j) with CROWN's chord for every
  relu (the decomposition max(a, b) = b + relu(a - b)); both are exact when one input dominates.
- ``min``: min(x) = -max(-x), the same lines mirrored.
- ``groupsort``: per group, the largest entry uses the max lines and the smallest the min lines;
  an entry whose rank the bounds fix is exact; other middle ranks get the constant bounds
  [sort(l)_r, sort(u)_r] (sorting is monotone).

Every line is computed in floating point and then pushed outwards by ``line_slack`` so that it is
valid in exact arithmetic (argued per rule below).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..backend import gamma
from ..ir.ops.arith import unbroadcast
from ..ir.ops.conv import pad2d, scatter_windows, windows
from ..ir.registry import get_op

#: Multiple of the machine epsilon by which computed lines are pushed outwards (see ``line_slack``).
KAPPA = 16.0


class Step(NamedTuple):
    """One backward step: coefficients per input (b, S, *in_shape) or None, the constant added to the
    bound (B, S) or None, and a bound (B, S) of the error the step commits (or None)."""

    grads: tuple
    const: Any
    err: Any


def line_slack(xp, scale):
    """How far a line computed in floating point may sit on the wrong side of the function, given
    ``scale`` >= |slopes| . max|x| + |intercept| + the magnitudes it was computed from: each slope and
    intercept comes out of at most a handful of roundings (a few units of roundoff relative to
    ``scale``), so KAPPA machine epsilons of ``scale`` (plus the smallest normal number) cover it."""
    fi = xp.finfo(scale.dtype)
    return KAPPA * float(fi.eps) * scale + float(fi.tiny)


def magnitude(xp, lo, hi):
    """Elementwise max(|lo|, |hi|): a bound of |x| over [lo, hi]."""
    return xp.maximum(xp.abs(lo), xp.abs(hi))


def bdot(xp, lam, v):
    """Per-sample dot products: lam (b, S, *shape) with v (B, *shape), b in {1, B} -> (B, S)."""
    b, s = lam.shape[:2]
    flat = lam.reshape(b, s, -1)
    vec = v.reshape(v.shape[0], -1)
    if b == 1:
        return xp.matmul(flat[0], vec.T).T
    return xp.matmul(flat, vec[:, :, None])[..., 0]


def bmat(xp, lam, mats):
    """Per-sample products: lam (b, S, *shape) with mats (B, *shape, c), b in {1, B} -> (B, S, c)."""
    b, s = lam.shape[:2]
    flat = lam.reshape(b, s, -1)
    n, c = mats.shape[0], mats.shape[-1]
    m = mats.reshape(n, -1, c)
    if b == 1:
        out = xp.matmul(flat[0], m.transpose(1, 0, 2).reshape(m.shape[1], n * c))
        return out.reshape(s, n, c).transpose(1, 0, 2)
    return xp.matmul(flat, m)


def signed_terms(xp, pos, neg, low, up, weight):
    """const = lam+ . low + lam- . up and err = |lam| . weight (= lam+ . w - lam- . w), in two products."""
    r = bmat(xp, pos, xp.stack([low, weight], axis=-1)) + bmat(xp, neg, xp.stack([up, -weight], axis=-1))
    return r[..., 0], r[..., 1]


def split_signs(xp, lam):
    """(lam+, lam-) with lam+ + lam- == lam exactly."""
    neg = xp.minimum(lam, 0)
    return lam - neg, neg


def line_weight(xp, lines, lo, hi):
    """Per-element error weight of a backward step through elementwise lines valid on [lo, hi]: the
    rounding of the step (each new coefficient is one product, error below u |lam| max(|al|, |au|);
    the constant is a dot product of n terms, error gamma_n |lam| |b|) plus ``line_slack``, by which
    the computed lines may sit on the wrong side of the function. The slack enters the error bound,
    not the intercepts: lam+ . slack - lam- . slack = |lam| . slack."""
    al, bl, au, bu = lines
    m = magnitude(xp, lo, hi)
    slope, icpt = xp.maximum(xp.abs(al), xp.abs(au)), xp.maximum(xp.abs(bl), xp.abs(bu))
    u = float(xp.finfo(lo.dtype).eps) / 2
    n = max(1, int(al[0].size))
    return u * slope * m + gamma(n + 1, lo.dtype) * icpt + line_slack(xp, slope * m + icpt)


def apply_lines(xp, lam, lines, weight):
    """Backward through elementwise lines al x + bl <= f(x) <= au x + bu (all (B, *shape)), charging
    |lam| . weight (``line_weight``) to the error bound."""
    al, bl, au, bu = lines
    pos, neg = split_signs(xp, lam)
    const, err = signed_terms(xp, pos, neg, bl, bu, weight)
    if pos.shape[0] == al.shape[0]:  # per-sample coefficients already: scale in place
        pos *= al[:, None]
        neg *= au[:, None]
        pos += neg
        return Step((pos,), const, err)
    return Step((pos * al[:, None] + neg * au[:, None],), const, err)


def elementwise_rule(xp, node, lam, bounds):
    """Any op with a ``relax`` rule; ``line_slack`` covers the rounding of its lines."""
    lo, hi = bounds[0]
    return lines_rule(xp, lam, get_op(node.op).relax(xp, node, lo, hi), lo, hi)


def relu_alpha_lines(xp, lo, hi, alpha):
    """ReLU's lines with the lower slope ``alpha`` (clipped to [0, 1]) on unstable entries (alpha-CROWN):
    alpha x <= relu(x) for every x when 0 <= alpha <= 1, so any alpha is sound."""
    al, bl, au, bu = get_op("relu").relax(xp, None, lo, hi)
    return xp.where((lo < 0) & (hi > 0), xp.clip(alpha, 0.0, 1.0), al), bl, au, bu


def relu_slopes_rule(xp, lam, lo, hi, alpha):
    """ReLU with alpha-CROWN lower slopes (see ``relu_alpha_lines``)."""
    return lines_rule(xp, lam, relu_alpha_lines(xp, lo, hi, alpha), lo, hi)


def lines_rule(xp, lam, lines, lo, hi):
    """Backward through elementwise lines valid on [lo, hi], widened by ``line_slack``."""
    return apply_lines(xp, lam, lines, line_weight(xp, lines, lo, hi))


def max_lines(xp, lo, hi, valid=None):
    """Linear bounds of max over the last axis (size k) of a box [lo, hi]; ``valid`` (broadcastable,
    default all True) marks the entries that exist (False for padding, which never wins the max).

    Returns (lower coefficients (..., k), lower constant (...), upper coefficients, upper constant).
    The relu chord on d_i = x_i - x_j uses the computed range [l_i - u_j, u_i - l_j]; that range may
    miss the true one by u (m_i + m_j), and the chord then errs by at most that much, so the slack
    covers sum_i (m_i + m_j) besides the line's own scale."""
    k = lo.shape[-1]
    valid = xp.ones(lo.shape, dtype=bool) if valid is None else xp.broadcast_to(valid, lo.shape)
    lo0, hi0 = xp.where(valid, lo, 0.0), xp.where(valid, hi, 0.0)
    j = xp.argmax(xp.where(valid, lo, -xp.inf), axis=-1)
    onehot = (xp.arange(k) == j[..., None])
    lower = onehot.astype(lo.dtype)
    lo_j = xp.take_along_axis(lo0, j[..., None], axis=-1)
    hi_j = xp.take_along_axis(hi0, j[..., None], axis=-1)
    dl, du = lo0 - hi_j, hi0 - lo_j
    others = valid & ~onehot
    unstable = others & (dl < 0) & (du > 0)
    width = xp.where(unstable, du - dl, 1.0)
    slope = xp.where(unstable, du / width, xp.where(others & (dl >= 0), 1.0, 0.0))
    icpt = xp.where(unstable, -slope * dl, 0.0)
    coef = slope + onehot * (1.0 - slope.sum(axis=-1, keepdims=True))
    const = icpt.sum(axis=-1)
    m = magnitude(xp, lo0, hi0)
    m_j = xp.take_along_axis(m, j[..., None], axis=-1)
    scale = (xp.abs(coef) * m).sum(axis=-1) + xp.abs(const) + xp.where(others, m + m_j, 0.0).sum(axis=-1)
    box_max = xp.maximum(coef * lo0, coef * hi0).sum(axis=-1) + const
    top = xp.where(valid, hi, -xp.inf).max(axis=-1)
    use_plane = box_max <= top  # decided before the slack, so that a dominant input stays exact
    const = const + line_slack(xp, scale)
    upper = xp.where(use_plane[..., None], coef, 0.0)
    upper_const = xp.where(use_plane, const, top)
    return lower, xp.zeros_like(upper_const), upper, upper_const


def min_lines(xp, lo, hi):
    """min(x) = -max(-x): lower = -(upper of max(-x)), upper = -(lower of max(-x))."""
    lc, lb, uc, ub = max_lines(xp, -hi, -lo)
    return uc, -ub, lc, -lb


def _window_backward(xp, lam, coefs, m):
    """Backward through per-output lines over k inputs: coefs = (lc, lb, uc, ub) with lc, uc
    (B, *out, k) and lb, ub (B, *out); m (B, *out, k) bounds |inputs|. Returns (cols, const, err)
    with cols (B, S, *out, k); the error covers one product per entry plus sums of length k."""
    lc, lb, uc, ub = coefs
    pos, neg = split_signs(xp, lam)
    cols = pos[..., None] * lc[:, None] + neg[..., None] * uc[:, None]
    k = lc.shape[-1]
    dtype = lam.dtype
    coef_m = (xp.maximum(xp.abs(lc), xp.abs(uc)) * m).sum(axis=-1)
    n = max(1, int(lb[0].size))
    weight = gamma(k + 1, dtype) * coef_m + gamma(n + 1, dtype) * xp.maximum(xp.abs(lb), xp.abs(ub))
    const, err = signed_terms(xp, pos, neg, lb, ub, weight)
    return cols, const, err


def maxpool_rule(xp, node, lam, bounds):
    """Max pooling: max_lines over each window; coefficients are scattered back onto the input."""
    from ..ir.ops.pool import _pool_attrs

    lo, hi = bounds[0]
    kernel, stride, pads = _pool_attrs(node)

    def flat_windows(a, value):
        w = windows(xp, pad2d(xp, a, pads, value=value), kernel, stride, (1, 1))
        return w.reshape(w.shape[:4] + (kernel[0] * kernel[1],))

    wl, wh = flat_windows(lo, 0.0), flat_windows(hi, 0.0)
    valid = flat_windows(xp.ones_like(lo[:1]), 0.0) > 0  # False on padding
    flat_shape = wl.shape
    m = magnitude(xp, wl, wh)  # padding reads 0
    cols, const, err = _window_backward(xp, lam, max_lines(xp, wl, wh, valid), m)
    b, s = cols.shape[:2]
    cols = cols.reshape((b * s,) + flat_shape[1:4] + tuple(kernel))
    grad = scatter_windows(xp, cols, (b * s,) + tuple(lo.shape[1:]), kernel, stride, (1, 1), pads)
    return Step((grad.reshape((b, s) + tuple(lo.shape[1:])),), const, err)


def _extremum_rule(lines):
    def rule(xp, node, lam, bounds):
        (lx, hx), (ly, hy) = bounds
        out = (lx.shape[0],) + tuple(lam.shape[2:])
        lo = xp.stack([xp.broadcast_to(lx, out), xp.broadcast_to(ly, out)], axis=-1)
        hi = xp.stack([xp.broadcast_to(hx, out), xp.broadcast_to(hy, out)], axis=-1)
        cols, const, err = _window_backward(xp, lam, lines(xp, lo, hi), magnitude(xp, lo, hi))
        b, s = cols.shape[:2]
        grads = []
        for i, shape in enumerate(node.attrs["in_shapes"]):
            g = unbroadcast(xp, cols[..., i].reshape((b * s,) + out[1:]), shape)
            grads.append(g.reshape((b, s) + tuple(shape)))
        return Step(tuple(grads), const, err)

    return rule


def groupsort_lines(xp, lo, hi):
    """Lines for ascending sort over the last axis (size k) of a box: lc, uc (..., k_out, k_in) and
    lb, ub (..., k_out). Rank k-1 uses max_lines, rank 0 min_lines, and a middle rank r the entry
    whose rank the bounds fix (exact) or else the constants sort(lo)_r, sort(hi)_r."""
    k = lo.shape[-1]
    shape = lo.shape + (k,)
    lc, uc = xp.zeros(shape, dtype=lo.dtype), xp.zeros(shape, dtype=lo.dtype)
    lb = xp.sort(lo, axis=-1)
    ub = xp.sort(hi, axis=-1)
    below = (hi[..., None, :] <= lo[..., :, None]).sum(axis=-1) - (hi <= lo)  # others surely <= x_i
    above = (lo[..., None, :] > hi[..., :, None]).sum(axis=-1)  # others surely > x_i
    fixed = (below + above) == (k - 1)
    for r in range(1, k - 1):
        hit = fixed & (below == r)
        has = hit.any(axis=-1)
        i = xp.argmax(hit, axis=-1)
        onehot = (xp.arange(k) == i[..., None]) & has[..., None]
        lc[..., r, :] = onehot
        uc[..., r, :] = onehot
        lb[..., r] = xp.where(has, 0.0, lb[..., r])
        ub[..., r] = xp.where(has, 0.0, ub[..., r])
    for r, lines in ((0, min_lines), (k - 1, max_lines)):
        c_l, b_l, c_u, b_u = lines(xp, lo, hi)
        lc[..., r, :], uc[..., r, :] = c_l, c_u
        lb[..., r], ub[..., r] = b_l, b_u
    return lc, lb, uc, ub


def _grouped(xp, a, k):
    """(N, C, *rest) -> (N, C/k, R, k): group members on the last axis."""
    return xp.moveaxis(a.reshape((a.shape[0], a.shape[1] // k, k, -1)), 2, 3)


def _ungrouped(xp, a, shape):
    """Inverse of _grouped: (N, G, R, k) -> (N, *shape)."""
    return xp.moveaxis(a, 3, 2).reshape((a.shape[0],) + tuple(shape))


def groupsort_rule(xp, node, lam, bounds):
    """GroupSort along axis 1 in groups of ``group_size``: groupsort_lines per group."""
    lo, hi = bounds[0]
    k = int(node.attrs["group_size"])
    shape = tuple(lo.shape[1:])
    glo, ghi = _grouped(xp, lo, k), _grouped(xp, hi, k)
    lc, lb, uc, ub = groupsort_lines(xp, glo, ghi)  # (N, G, R, k_out, k_in), (N, G, R, k_out)
    b, s = lam.shape[:2]
    glam = _grouped(xp, lam.reshape((b * s,) + shape), k)
    glam = glam.reshape((b, s) + glam.shape[1:])
    pos, neg = split_signs(xp, glam)
    grad = xp.matmul(pos[..., None, :], lc[:, None]) + xp.matmul(neg[..., None, :], uc[:, None])
    bb = grad.shape[0]
    grad = _ungrouped(xp, grad[..., 0, :].reshape((bb * s,) + glo.shape[1:]), shape).reshape((bb, s) + shape)
    coef_m = xp.matmul(xp.maximum(xp.abs(lc), xp.abs(uc)), magnitude(xp, glo, ghi)[..., None])[..., 0]
    dtype = lam.dtype
    weight = gamma(k + 1, dtype) * coef_m + gamma(lo[0].size + 1, dtype) * xp.maximum(xp.abs(lb), xp.abs(ub))
    const, err = signed_terms(xp, pos, neg, lb, ub, weight)
    return Step((grad,), const, err)


#: op name -> backward rule for nonlinear ops without an elementwise ``relax`` rule.
BACKWARD_RULES = {
    "maxpool": maxpool_rule,
    "max": _extremum_rule(max_lines),
    "min": _extremum_rule(min_lines),
    "groupsort": groupsort_rule,
}


def backward_rule(op):
    """The rule CROWN uses for a nonlinear op, or None when it has none."""
    if op.name in BACKWARD_RULES:
        return BACKWARD_RULES[op.name]
    if op.supports("relax"):
        return elementwise_rule
    return None
