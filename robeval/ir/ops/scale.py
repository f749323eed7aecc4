"""Elementwise affine maps with constant coefficients y = x * scale + shift: constant Add/Sub/Mul/Div
(input normalisation inside a model) and inference-mode batch normalisation."""

from __future__ import annotations

import numpy

from ...backend import asnumpy
from ..registry import AffineOp, register


@register("scale")
class Scale(AffineOp):
    """params: scale, shift, each broadcastable to the per-sample shape (no batch axis)."""

    def linear(self, xp, node, x):
        return x * node.params["scale"]

    def linear_t(self, xp, node, g):
        return (g * node.params["scale"],)

    def abs_linear(self, xp, node, r):
        return r * xp.abs(node.params["scale"])

    def bias(self, xp, node):
        return node.params["shift"]

    def interval(self, xp, node, bounds):
        """Pick the end by the sign of the scale, then widen by the rounding of one product and one sum."""
        lo, hi = bounds
        a, c = lo * node.params["scale"], hi * node.params["scale"]
        small, large = xp.minimum(a, c), xp.maximum(a, c)
        out_lo, out_hi = small + node.params["shift"], large + node.params["shift"]
        u = float(xp.finfo(out_lo.dtype).eps)
        tiny = float(xp.finfo(out_lo.dtype).tiny)
        out_lo = out_lo - (u * (xp.abs(out_lo) + xp.abs(small)) + tiny)
        out_hi = out_hi + (u * (xp.abs(out_hi) + xp.abs(large)) + tiny)
        return out_lo, out_hi

    def op_norm(self, node, in_shapes):
        return float(numpy.max(numpy.abs(asnumpy(node.params["scale"])), initial=0.0))


@register("batchnorm")
class BatchNorm(Scale):
    """Inference batch norm folded to scale = gamma / sqrt(var + eps), shift = beta - mean * scale,
    stored with shape (C, 1, 1) for images or (C,) for features so that they broadcast per channel."""
