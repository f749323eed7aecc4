"""Pooling: MaxPool (monotone), AveragePool and GlobalAveragePool (linear)."""

from __future__ import annotations

import math

from ..registry import AffineOp, MonotoneOp, register
from .conv import pad2d, scatter_windows, windows


def _pool_attrs(node):
    a = node.attrs
    kernel = tuple(a["kernel"])
    return kernel, tuple(a.get("stride", kernel)), tuple(a.get("padding", (0, 0, 0, 0)))


def _overlap(kernel, stride) -> int:
    """Largest number of windows that share one input element."""
    return math.ceil(kernel[0] / stride[0]) * math.ceil(kernel[1] / stride[1])


@register("maxpool")
class MaxPool(MonotoneOp):
    """attrs: kernel (kh, kw), stride, padding (top, left, bottom, right); padding never wins the max.
    L2-Lipschitz with constant sqrt(windows sharing an element)."""

    def forward(self, xp, node, x):
        # the maximum over kernel offsets of strided slices: kh*kw fast elementwise passes, much
        # quicker than reducing tiny trailing axes of a strided window view
        kernel, stride, pads = _pool_attrs(node)
        win = windows(xp, pad2d(xp, x, pads, value=-xp.inf), kernel, stride, (1, 1))
        out = win[..., 0, 0].copy()
        for i in range(kernel[0]):
            for j in range(kernel[1]):
                if i or j:
                    xp.maximum(out, win[..., i, j], out=out)
        return out

    def vjp(self, xp, node, xs, g):
        """Route each window's cotangent to its first maximal entry (row-major), one kernel offset
        at a time: kh*kw elementwise passes instead of an argmax over tiny strided axes."""
        kernel, stride, pads = _pool_attrs(node)
        x = xs[0]
        win = windows(xp, pad2d(xp, x, pads, value=-xp.inf), kernel, stride, (1, 1))
        out = self.forward(xp, node, x)
        taken = xp.zeros(out.shape, dtype=bool)
        n, c, h, w = x.shape
        t, l, b, r = pads
        grad = xp.zeros((n, c, h + t + b, w + l + r), dtype=g.dtype)
        sh, sw = stride
        ho, wo = out.shape[2:]
        for i in range(kernel[0]):
            for j in range(kernel[1]):
                hit = win[..., i, j] == out
                hit &= ~taken
                taken |= hit
                grad[:, :, i: i + sh * (ho - 1) + 1: sh, j: j + sw * (wo - 1) + 1: sw] += g * hit
        return (grad[:, :, t: t + h, l: l + w],)

    def lipschitz(self, node, in_lips, in_shapes):
        kernel, stride, _ = _pool_attrs(node)
        return math.sqrt(_overlap(kernel, stride)) * in_lips[0]


@register("avgpool")
class AvgPool(AffineOp):
    """attrs: kernel, stride, padding, count_include_pad (default False, as in ONNX): the mean over
    each window, with padded zeros counted in the divisor only when count_include_pad is set."""

    def _counts(self, xp, node, shape, dtype):
        kernel, stride, pads = _pool_attrs(node)
        if node.attrs.get("count_include_pad", False):
            return float(kernel[0] * kernel[1])
        ones = xp.ones((1, 1) + tuple(shape[2:]), dtype=dtype)
        return windows(xp, pad2d(xp, ones, pads), kernel, stride, (1, 1)).sum(axis=(4, 5))

    def linear(self, xp, node, x):
        kernel, stride, pads = _pool_attrs(node)
        total = windows(xp, pad2d(xp, x, pads), kernel, stride, (1, 1)).sum(axis=(4, 5))
        return total / self._counts(xp, node, x.shape, x.dtype)

    def linear_t(self, xp, node, g):
        kernel, stride, pads = _pool_attrs(node)
        in_shape = (g.shape[0],) + tuple(node.attrs["in_shape"])
        g = g / self._counts(xp, node, in_shape, g.dtype)
        cols = xp.broadcast_to(g[..., None, None], g.shape + kernel)
        return (scatter_windows(xp, cols, in_shape, kernel, stride, (1, 1), pads),)

    def fan_in(self, node):
        kernel = tuple(node.attrs["kernel"])
        return kernel[0] * kernel[1] + 1  # the sum and the division

    def op_norm(self, node, in_shapes):
        """sqrt(||A||_1 ||A||_inf) for the non-negative matrix A, from A^T 1 and A 1 computed exactly."""
        import numpy

        shape = (1,) + tuple(in_shapes[0])
        ones_in = numpy.ones(shape)
        row_sums = self.linear(numpy, node, ones_in)
        col_sums = self.linear_t(numpy, node, numpy.ones_like(row_sums))[0]
        return math.sqrt(float(row_sums.max()) * float(col_sums.max())) * (1 + 1e-12)


@register("global_avgpool")
class GlobalAvgPool(AffineOp):
    """Mean over all spatial axes, keeping them as size 1: (N, C, H, W) -> (N, C, 1, 1)."""

    def linear(self, xp, node, x):
        return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)

    def linear_t(self, xp, node, g):
        in_shape = tuple(node.attrs["in_shape"])
        size = math.prod(in_shape[1:])
        return (xp.broadcast_to(g / size, (g.shape[0],) + in_shape).copy(),)

    def fan_in(self, node):
        return math.prod(node.attrs["in_shape"][1:]) + 1

    def op_norm(self, node, in_shapes):
        return (1.0 + 1e-12) / math.sqrt(math.prod(in_shapes[0][1:]))  # slack: sqrt and 1/x round
