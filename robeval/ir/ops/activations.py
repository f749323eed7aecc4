"""Elementwise activations and pass-through ops: ReLU, LeakyReLU, PReLU, Sigmoid, Tanh, Clip, Identity,
and the output squashers Softmax / LogSoftmax (which certifiers strip from the end of a network)."""

from __future__ import annotations

import math

import numpy

from ...backend import asnumpy
from ..registry import ElementwiseOp, Op, StructuralOp, register, widen


def _chord(xp, f, lo, hi):
    """Slope and intercept of the chord of f between lo and hi (slope f'(lo) where lo == hi)."""
    width = hi - lo
    safe = xp.where(width > 0, width, 1.0)
    slope = xp.where(width > 0, (f(hi) - f(lo)) / safe, 0.0)
    return slope, f(lo) - slope * lo


def _s_shaped_upper(xp, f, df, lo, hi, steps=40):
    """Upper line of f, convex below 0 and concave above, on [lo, hi] (CROWN, Zhang et al. 2018):
    concave case (lo >= 0) the tangent at the midpoint; convex case (hi <= 0) the chord; mixed case
    the chord when f'(hi) >= its slope (then f - chord <= 0 on both pieces), else the tangent at a
    d in [0, hi] with f(d) + f'(d) (lo - d) >= f(lo), found by bisection (any such d is valid)."""
    width = hi - lo
    flo = f(lo)
    chord = xp.where(width > 0, (f(hi) - flo) / xp.where(width > 0, width, 1.0), df(lo))
    mixed = (lo < 0) & (hi > 0)
    a, b = xp.zeros_like(lo), xp.where(mixed, hi, 0.0)
    for _ in range(steps):  # bisection on every neuron at once: g(d) rises with d on [0, hi]
        d = 0.5 * (a + b)
        ok = f(d) + df(d) * (lo - d) >= flo
        a, b = xp.where(ok, a, d), xp.where(ok, d, b)
    point = xp.where(mixed, b, 0.5 * (lo + hi))
    tangent = df(point)
    use_chord = (hi <= 0) | (mixed & (df(hi) >= chord))
    slope = xp.where(use_chord, chord, tangent)
    return slope, xp.where(use_chord, flo - chord * lo, f(point) - tangent * point)


def _s_shaped_relax(xp, f, df, centre, lo, hi):
    """Sound lines for f point-symmetric about (0, centre): the upper line from _s_shaped_upper,
    the lower one mirrored (f(x) = 2 centre - f(-x)). Both are pushed out by 16 machine epsilons of
    |slope| max|x| + |intercept| + 1, which covers the few roundings of each line and the absolute
    error (a few ulps of 1) of computing f, f' (|f| <= 1 for sigmoid and tanh)."""
    us, ub = _s_shaped_upper(xp, f, df, lo, hi)
    ls, lb = _s_shaped_upper(xp, f, df, -hi, -lo)
    lb = 2 * centre - lb
    m = xp.maximum(xp.abs(lo), xp.abs(hi))
    fi = xp.finfo(lo.dtype)
    slack = lambda s, b: 16 * float(fi.eps) * (xp.abs(s) * m + xp.abs(b) + 1.0) + float(fi.tiny)  # noqa: E731
    return ls, lb - slack(ls, lb), us, ub + slack(us, ub)


def _logsumexp_others(xp, v, ax):
    """log sum_{j != i} exp(v_j) for every i along ``ax`` (at least two entries there), and a bound on
    its absolute rounding error.

    Each sum is shifted by the largest *other* entry, so it is >= 1: nothing underflows to 0, and
    nothing cancels (log(sum_j exp(v_j) - exp(v_i)) loses every digit when v_i dominates the sum)."""
    eps = float(xp.finfo(v.dtype).eps)
    m1 = v.max(axis=ax, keepdims=True)
    is_max = v == m1
    top = is_max & (is_max.sum(axis=ax, keepdims=True) == 1)  # the unique maximum: its others peak lower
    others = xp.where(top, -xp.inf, v)
    m2 = others.max(axis=ax, keepdims=True)
    e1 = xp.exp(v - m1)
    rest1 = e1.sum(axis=ax, keepdims=True) - e1  # >= 1 away from a unique maximum (it contributes exp(0))
    rest2 = xp.exp(others - m2).sum(axis=ax, keepdims=True)  # >= 1 (contains exp(0))
    lse = xp.where(top, m2, m1) + xp.log(xp.where(top, rest2, rest1))
    # Each term's relative error: its argument rounds (|v - m| u) and exp itself (~1 ulp); terms below
    # the smallest normal number are negligible against a sum >= 1. The sum adds K u, the subtraction
    # at most doubles that (the sum is at most twice the rest), log and the final add round once each.
    spread = xp.minimum(m1 - v.min(axis=ax, keepdims=True), -math.log(float(xp.finfo(v.dtype).tiny)))
    err = eps * (2 * v.shape[ax] + 2 * spread + 8 + xp.abs(lse))
    return lse, err


def _inv_one_plus_exp(xp, z, err):
    """1 / (1 + exp(z)) without overflow, and a bound on its relative error when z is off by <= err
    (d log p / dz = p - 1, so an absolute error in z becomes at most that relative error in p)."""
    eps = float(xp.finfo(z.dtype).eps)
    t = xp.exp(-xp.abs(z))
    p = xp.where(z > 0, t, 1.0) / (1.0 + t)
    return p, 2 * (err + eps * (xp.abs(z) + 4))  # factor 2: second-order terms and the ulps of exp


def _softplus(xp, z, err):
    """log(1 + exp(z)) without overflow, and a bound on its absolute error when z is off by <= err:
    the argument's own error (softplus is 1-Lipschitz: err plus the subtraction's eps |z|), and
    exp, log1p and the final addition, a few units of roundoff of |z| + 1 (factor 2 for safety)."""
    eps = float(xp.finfo(z.dtype).eps)
    value = xp.maximum(z, 0) + xp.log1p(xp.exp(-xp.abs(z)))
    return value, 2 * (err + eps * (2 * xp.abs(z) + 4))


@register("relu")
class ReLU(ElementwiseOp):
    """max(x, 0); 1-Lipschitz."""

    def forward(self, xp, node, x):
        return xp.maximum(x, 0)

    def vjp(self, xp, node, xs, g):
        return (g * (xs[0] > 0),)

    def relax(self, xp, node, lo, hi):
        """CROWN's adaptive relaxation: upper = chord for unstable neurons; lower slope 1 if hi > -lo else 0."""
        unstable = (lo < 0) & (hi > 0)
        width = xp.where(unstable, hi - lo, 1.0)
        up_slope = xp.where(unstable, hi / width, (lo >= 0).astype(lo.dtype))
        up_icpt = xp.where(unstable, -hi * lo / width, 0.0)
        low_slope = xp.where(unstable, (hi > -lo).astype(lo.dtype), (lo >= 0).astype(lo.dtype))
        return low_slope, xp.zeros_like(lo), up_slope, up_icpt

    def slope_bound(self, node):
        return 1.0


class _PiecewiseLinear(ElementwiseOp):
    """x if x > 0 else a * x for a slope a of any sign or size (per entry for PReLU).

    Only a >= 0 makes the op monotone; a < 0 makes it |x|-like, with its minimum 0 at x = 0 inside a
    box that straddles 0, so the interval rule takes the extremes over lo, hi and the kink (0).
    The op is convex for a <= 1 and concave for a > 1; the relaxation picks its lines per entry."""

    ulps = 2.0  # a * x rounds, and so may the slope a itself (see interval)

    def slope(self, xp, node):
        """The negative-side slope a (a scalar or per-entry array); each subclass says where it lives."""
        raise TypeError(f"{type(self).__name__} must define slope(xp, node)")

    def forward(self, xp, node, x):
        return xp.where(x > 0, x, x * self.slope(xp, node))

    def vjp(self, xp, node, xs, g):
        return (g * xp.where(xs[0] > 0, 1.0, self.slope(xp, node)),)

    def interval(self, xp, node, bounds):
        lo, hi = bounds
        f_lo, f_hi = self.forward(xp, node, lo), self.forward(xp, node, hi)
        straddle = (lo < 0) & (hi > 0)
        low = xp.where(straddle, xp.minimum(xp.minimum(f_lo, f_hi), 0.0), xp.minimum(f_lo, f_hi))
        high = xp.where(straddle, xp.maximum(xp.maximum(f_lo, f_hi), 0.0), xp.maximum(f_lo, f_hi))
        # two units of roundoff: the product a * x rounds, and so may a itself (a Python float slope
        # is rounded to float32 when the bounds are float32)
        eps = float(xp.finfo(lo.dtype).eps)
        return widen(xp, low, high, 2 * eps)

    def relax(self, xp, node, lo, hi):
        """Unstable entries: the chord on the side where the op is convex (a <= 1: above; a > 1:
        below) and, on the other side, a line through the origin with slope 1 or a, whichever leaves
        the smaller area (CROWN's adaptive choice; both slopes are supporting lines at the kink)."""
        a = xp.broadcast_to(xp.asarray(self.slope(xp, node), dtype=lo.dtype), lo.shape[1:])[None]
        unstable = (lo < 0) & (hi > 0)
        width = xp.where(unstable, hi - lo, 1.0)
        chord = (hi - a * lo) / width
        chord_icpt = hi - chord * hi
        stable = xp.where(lo >= 0, 1.0, a)
        origin = xp.where(hi > -lo, 1.0, a)  # area of the gap: linear in the slope, minimal at an end
        convex = a <= 1
        chord_s, chord_b = xp.where(unstable, chord, stable), xp.where(unstable, chord_icpt, 0.0)
        origin_s = xp.where(unstable, origin, stable)
        zero = xp.zeros_like(lo)
        low_s = xp.where(convex, origin_s, chord_s)
        low_b = xp.where(convex, zero, chord_b)
        up_s = xp.where(convex, chord_s, origin_s)
        up_b = xp.where(convex, chord_b, zero)
        return low_s, low_b, up_s, up_b


@register("leaky_relu")
class LeakyReLU(_PiecewiseLinear):
    """x if x > 0 else alpha * x (attrs: alpha, any sign); Lipschitz max(1, |alpha|)."""

    def slope(self, xp, node):
        return float(node.attrs["alpha"])

    def slope_bound(self, node):
        return max(1.0, abs(float(node.attrs["alpha"])))


@register("prelu")
class PReLU(_PiecewiseLinear):
    """x if x > 0 else slope * x with a learned slope (params: slope, broadcastable to the per-sample
    shape, e.g. (C, 1, 1) per channel; any sign); Lipschitz max(1, max |slope|)."""

    def slope(self, xp, node):
        return node.params["slope"]

    def slope_bound(self, node):
        s = numpy.abs(numpy.asarray(asnumpy(node.params["slope"]), dtype=numpy.float64))
        return max(1.0, float(s.max(initial=0.0)))


@register("sigmoid")
class Sigmoid(ElementwiseOp):
    """1 / (1 + exp(-x)); 1/4-Lipschitz. Bounds widened by 6 ulps: the forward is accurate to a few
    ulps relative (float32 exp is off by up to ~2.5 ulps), which the widening must cover."""

    ulps = 6.0

    def forward(self, xp, node, x):
        # exp(-|x|) never overflows, and nothing cancels: 0.5 * (tanh(x / 2) + 1) loses every digit
        # for x << 0, where tanh(x / 2) + 1 subtracts two numbers close to 1
        t = xp.exp(-xp.abs(x))
        return xp.where(x >= 0, 1.0, t) / (1.0 + t)

    def vjp(self, xp, node, xs, g):
        s = self.forward(xp, node, xs[0])
        return (g * s * (1 - s),)

    def relax(self, xp, node, lo, hi):
        """CROWN's tangent/chord lines (see _s_shaped_relax), sound in floating point."""
        f = lambda v: self.forward(xp, node, v)  # noqa: E731
        return _s_shaped_relax(xp, f, lambda v: f(v) * (1 - f(v)), 0.5, lo, hi)

    def slope_bound(self, node):
        return 0.25


@register("tanh")
class Tanh(ElementwiseOp):
    """tanh(x); 1-Lipschitz. Bounds widened by 4 ulps for the library's rounding."""

    ulps = 4.0

    def forward(self, xp, node, x):
        return xp.tanh(x)

    def vjp(self, xp, node, xs, g):
        t = xp.tanh(xs[0])
        return (g * (1 - t * t),)

    def relax(self, xp, node, lo, hi):
        """CROWN's tangent/chord lines (see _s_shaped_relax), sound in floating point."""
        return _s_shaped_relax(xp, xp.tanh, lambda v: 1 - xp.tanh(v) ** 2, 0.0, lo, hi)

    def slope_bound(self, node):
        return 1.0


@register("clip")
class Clip(ElementwiseOp):
    """min(max(x, lo), hi) with attrs low / high (None for unbounded); 1-Lipschitz."""

    def forward(self, xp, node, x):
        lo, hi = node.attrs.get("low"), node.attrs.get("high")
        return xp.clip(x, lo, hi) if (lo is not None or hi is not None) else x

    def vjp(self, xp, node, xs, g):
        x = xs[0]
        lo, hi = node.attrs.get("low"), node.attrs.get("high")
        mask = xp.ones_like(x, dtype=bool)
        if lo is not None:
            mask &= x >= lo
        if hi is not None:
            mask &= x <= hi
        return (g * mask,)

    def relax(self, xp, node, lo, hi):
        low, high = node.attrs.get("low"), node.attrs.get("high")
        f = lambda v: self.forward(xp, node, v)  # noqa: E731
        flat = lambda v: xp.clip(v, low if low is not None else -xp.inf, high if high is not None else xp.inf)  # noqa: E731
        s, b = _chord(xp, f, lo, hi)
        # clip is monotone, so its graph lies between the two constant lines; the chord is
        # sound on a side only when clip is convex/concave on [lo, hi]
        only_low = (high is None) or (hi <= high)
        only_high = (low is None) or (lo >= low)
        zero = xp.zeros_like(lo)
        up_s = xp.where(only_low, s, zero)
        up_b = xp.where(only_low, b, flat(hi))
        low_s = xp.where(only_high, s, zero)
        low_b = xp.where(only_high, b, flat(lo))
        return low_s, low_b, up_s, up_b

    def slope_bound(self, node):
        return 1.0


@register("identity")
class Identity(StructuralOp):
    """Pass-through (ONNX Identity, inference-mode Dropout)."""

    def linear(self, xp, node, x):
        return x

    def linear_t(self, xp, node, g):
        return (g,)


class _Squasher(Op):
    """Softmax-like output layer; sound intervals from the extreme logits of the others."""

    def _axis(self, node):
        return int(node.attrs.get("axis", -1))

    def _gaps(self, xp, node, lo, hi):
        """z = logsumexp_{j!=i}(x) - x_i at the two box ends that bound output i, with bounds on their
        rounding: (z_low, err_low) from (lo_i, hi_others) and (z_high, err_high) from (hi_i, lo_others).
        The output falls as z rises. None when the axis holds one entry (the output is constant)."""
        ax = self._axis(node)
        if lo.shape[ax] == 1:
            return None
        lse_hi, err_hi = _logsumexp_others(xp, hi, ax)
        lse_lo, err_lo = _logsumexp_others(xp, lo, ax)
        return lse_hi - lo, err_hi, lse_lo - hi, err_lo


@register("softmax")
class Softmax(_Squasher):
    """exp(x_i) / sum_j exp(x_j) along attrs axis (default -1)."""

    def forward(self, xp, node, x):
        ax = self._axis(node)
        z = xp.exp(x - x.max(axis=ax, keepdims=True))
        return z / z.sum(axis=ax, keepdims=True)

    def vjp(self, xp, node, xs, g):
        s = self.forward(xp, node, xs[0])
        ax = self._axis(node)
        return (s * (g - (g * s).sum(axis=ax, keepdims=True)),)

    def interval(self, xp, node, bounds):
        """p_i in [1/(1 + sum_{j!=i} exp(u_j - l_i)), 1/(1 + sum_{j!=i} exp(l_j - u_i))], computed as
        1/(1 + exp(z)) with z = logsumexp_{j!=i}(.) - (.)_i, widened by a bound on its rounding."""
        lo, hi = bounds
        gaps = self._gaps(xp, node, lo, hi)
        if gaps is None:
            return xp.ones_like(lo), xp.ones_like(hi)
        z_low, err_low, z_high, err_high = gaps
        low, rel_low = _inv_one_plus_exp(xp, z_low, err_low)
        high, rel_high = _inv_one_plus_exp(xp, z_high, err_high)
        tiny = float(xp.finfo(lo.dtype).tiny)
        return xp.clip(low * (1 - rel_low) - tiny, 0, 1), xp.clip(high * (1 + rel_high) + tiny, 0, 1)

    def lipschitz(self, node, in_lips, in_shapes):
        return in_lips[0]  # softmax is 1-Lipschitz in L2 (Gao & Pavel 2017)


@register("log_softmax")
class LogSoftmax(_Squasher):
    """x_i - log sum_j exp(x_j) along attrs axis (default -1)."""

    def forward(self, xp, node, x):
        ax = self._axis(node)
        m = x.max(axis=ax, keepdims=True)
        return x - m - xp.log(xp.exp(x - m).sum(axis=ax, keepdims=True))

    def vjp(self, xp, node, xs, g):
        s = Softmax.forward(self, xp, node, xs[0])
        ax = self._axis(node)
        return (g - s * g.sum(axis=ax, keepdims=True),)

    def interval(self, xp, node, bounds):
        """log p_i = -softplus(logsumexp_{j!=i}(x) - x_i) rises with x_i and falls with every other x_j:
        lower from (lo_i, hi_others), upper from (hi_i, lo_others), each widened by a bound on its
        rounding (softplus is 1-Lipschitz, so the argument's error passes through undamped)."""
        lo, hi = bounds
        gaps = self._gaps(xp, node, lo, hi)
        if gaps is None:
            return xp.zeros_like(lo), xp.zeros_like(hi)
        z_low, err_low, z_high, err_high = gaps
        low, slack_low = _softplus(xp, z_low, err_low)
        high, slack_high = _softplus(xp, z_high, err_high)
        tiny = float(xp.finfo(lo.dtype).tiny)
        return -low - slack_low - tiny, xp.minimum(-high + slack_high + tiny, 0.0)

    def lipschitz(self, node, in_lips, in_shapes):
        ax = self._axis(node)  # counts the batch axis; in_shapes do not
        k = in_shapes[0][ax - 1 if ax > 0 else ax]
        return (1.0 + k ** 0.5) * in_lips[0]  # J = I - 1 p^T and ||1 p^T||_2 = sqrt(K) ||p||_2 <= sqrt(K)
