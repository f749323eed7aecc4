"""Ops on two tensors that both depend on the input: Add / Sub (residual connections) and
elementwise Max / Min (MaxMin and GroupSort activations written out by exporters)."""

from __future__ import annotations

import math

import numpy

from ..registry import AffineOp, MonotoneOp, register, widen


def spread_lips(in_lips, in_shapes):
    """Input Lipschitz bounds scaled by sqrt(copies) for inputs that broadcasting repeats: an input of
    shape (C, 1, 1) added to (C, H, W) enters every output H * W times, multiplying its norm by sqrt(H W)."""
    out = math.prod(numpy.broadcast_shapes(*(tuple(s) for s in in_shapes)))
    return [lip * math.sqrt(out / max(math.prod(s), 1)) for lip, s in zip(in_lips, in_shapes)]


def unbroadcast(xp, g, shape):
    """Sum g over the axes that broadcasting added to reach g's shape from (N, *shape)."""
    target = (g.shape[0],) + tuple(shape)
    while g.ndim > len(target):
        g = g.sum(axis=1)
    axes = tuple(i for i in range(1, g.ndim) if target[i] == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


@register("add")
class Add(AffineOp):
    """x + y; Lipschitz L_x + L_y (each scaled up where broadcasting repeats an input)."""

    def linear(self, xp, node, x, y):
        return x + y

    def linear_t(self, xp, node, g):
        a, b = node.attrs["in_shapes"]
        return unbroadcast(xp, g, a), unbroadcast(xp, g, b)

    def interval(self, xp, node, bx, by):
        lo, hi = bx[0] + by[0], bx[1] + by[1]
        return widen(xp, lo, hi, float(xp.finfo(lo.dtype).eps))

    def lipschitz(self, node, in_lips, in_shapes):
        return sum(spread_lips(in_lips, in_shapes))


@register("sub")
class Sub(AffineOp):
    """x - y; Lipschitz L_x + L_y (each scaled up where broadcasting repeats an input)."""

    def linear(self, xp, node, x, y):
        return x - y

    def linear_t(self, xp, node, g):
        a, b = node.attrs["in_shapes"]
        return unbroadcast(xp, g, a), -unbroadcast(xp, g, b)

    def abs_linear(self, xp, node, rx, ry):
        return rx + ry

    def interval(self, xp, node, bx, by):
        lo, hi = bx[0] - by[1], bx[1] - by[0]
        return widen(xp, lo, hi, float(xp.finfo(lo.dtype).eps))

    def lipschitz(self, node, in_lips, in_shapes):
        return sum(spread_lips(in_lips, in_shapes))


class _Extremum(MonotoneOp):
    """Elementwise max/min of two tensors: |max(a,b) - max(a',b')| <= max(|a-a'|, |b-b'|), so the
    L2 Lipschitz bound is sqrt(L_a^2 + L_b^2) (each scaled up where broadcasting repeats an input)."""

    def lipschitz(self, node, in_lips, in_shapes):
        return math.sqrt(sum(v * v for v in spread_lips(in_lips, in_shapes)))


@register("max")
class Max(_Extremum):
    def forward(self, xp, node, x, y):
        return xp.maximum(x, y)

    def vjp(self, xp, node, xs, g):
        a, b = node.attrs["in_shapes"]
        take_x = xs[0] >= xs[1]
        return unbroadcast(xp, g * take_x, a), unbroadcast(xp, g * ~take_x, b)


@register("min")
class Min(_Extremum):
    def forward(self, xp, node, x, y):
        return xp.minimum(x, y)

    def vjp(self, xp, node, xs, g):
        a, b = node.attrs["in_shapes"]
        take_x = xs[0] <= xs[1]
        return unbroadcast(xp, g * take_x, a), unbroadcast(xp, g * ~take_x, b)
