"""Elementwise activations and pass-through ops: ReLU, LeakyReLU, Sigmoid, Tanh, Clip, Identity,
and the output squashers Softmax / LogSoftmax (which certifiers strip from the end of a network)."""

from __future__ import annotations

from ..registry import ElementwiseOp, Op, StructuralOp, register


def _chord(xp, f, lo, hi):
    """Slope and intercept of the chord of f between lo and hi (slope f'(lo) where lo == hi)."""
    width = hi - lo
    safe = xp.where(width > 0, width, 1.0)
    slope = xp.where(width > 0, (f(hi) - f(lo)) / safe, 0.0)
    return slope, f(lo) - slope * lo


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


@register("leaky_relu")
class LeakyReLU(ElementwiseOp):
    """x if x > 0 else alpha * x, with 0 <= alpha (attrs: alpha); Lipschitz max(1, alpha)."""

    ulps = 1.0

    def forward(self, xp, node, x):
        return xp.where(x > 0, x, x * node.attrs["alpha"])

    def vjp(self, xp, node, xs, g):
        return (g * xp.where(xs[0] > 0, 1.0, node.attrs["alpha"]),)

    def relax(self, xp, node, lo, hi):
        a = node.attrs["alpha"]
        unstable = (lo < 0) & (hi > 0)
        width = xp.where(unstable, hi - lo, 1.0)
        chord = (hi - a * lo) / width
        slope_stable = xp.where(lo >= 0, 1.0, a)
        if a <= 1:
            up_slope = xp.where(unstable, chord, slope_stable)
            up_icpt = xp.where(unstable, hi - chord * hi, 0.0)
            low_slope = xp.where(unstable, xp.where(hi > -lo, 1.0, a), slope_stable)
            low_icpt = xp.zeros_like(lo)
        else:  # convex becomes concave: swap the roles
            low_slope = xp.where(unstable, chord, slope_stable)
            low_icpt = xp.where(unstable, hi - chord * hi, 0.0)
            up_slope = xp.where(unstable, xp.where(hi > -lo, 1.0, a), slope_stable)
            up_icpt = xp.zeros_like(lo)
        return low_slope, low_icpt, up_slope, up_icpt

    def slope_bound(self, node):
        return max(1.0, abs(float(node.attrs["alpha"])))


@register("sigmoid")
class Sigmoid(ElementwiseOp):
    """1 / (1 + exp(-x)); 1/4-Lipschitz. Bounds widened by 4 ulps for the exp's rounding."""

    ulps = 4.0

    def forward(self, xp, node, x):
        return 0.5 * (xp.tanh(0.5 * x) + 1.0)

    def vjp(self, xp, node, xs, g):
        s = self.forward(xp, node, xs[0])
        return (g * s * (1 - s),)

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
        """p_i in [1/(1 + sum_{j!=i} exp(u_j - l_i)), 1/(1 + sum_{j!=i} exp(l_j - u_i))]."""
        lo, hi = bounds
        ax = self._axis(node)
        m = hi.max(axis=ax, keepdims=True)
        eu, el = xp.exp(hi - m), xp.exp(lo - m)
        low = el / (el + eu.sum(axis=ax, keepdims=True) - eu)
        high = eu / (eu + el.sum(axis=ax, keepdims=True) - el)
        u = 8 * float(xp.finfo(lo.dtype).eps)
        return xp.clip(low * (1 - u), 0, 1), xp.clip(high * (1 + u), 0, 1)

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

    def lipschitz(self, node, in_lips, in_shapes):
        k = in_shapes[0][self._axis(node)]
        return (1.0 + k ** 0.5) * in_lips[0]  # J = I - 1 p^T and ||1 p^T||_2 = sqrt(K) ||p||_2 <= sqrt(K)
