"""Ops that only move or select entries: Flatten, Reshape, Transpose, Concat, Slice.
All keep the batch axis 0 untouched; shapes and axes in attrs are per sample (no batch axis)
except ``perm`` and ``axis``, which count the batch axis as 0 like ONNX does."""

from __future__ import annotations

import math

from ..registry import StructuralOp, register


@register("flatten")
class Flatten(StructuralOp):
    """(N, d1, d2, ...) -> (N, d1 * d2 * ...)."""

    def linear(self, xp, node, x):
        return x.reshape(x.shape[0], -1)

    def linear_t(self, xp, node, g):
        return (g.reshape((g.shape[0],) + tuple(node.attrs["in_shape"])),)


@register("reshape")
class Reshape(StructuralOp):
    """attrs: shape, the per-sample target shape."""

    def linear(self, xp, node, x):
        return x.reshape((x.shape[0],) + tuple(node.attrs["shape"]))

    def linear_t(self, xp, node, g):
        return (g.reshape((g.shape[0],) + tuple(node.attrs["in_shape"])),)


@register("transpose")
class Transpose(StructuralOp):
    """attrs: perm over all axes with perm[0] == 0 (the batch axis stays first)."""

    def linear(self, xp, node, x):
        return x.transpose(tuple(node.attrs["perm"]))

    def linear_t(self, xp, node, g):
        perm = list(node.attrs["perm"])
        inverse = [perm.index(i) for i in range(len(perm))]
        return (g.transpose(inverse),)


@register("concat")
class Concat(StructuralOp):
    """attrs: axis (>= 1); any number of inputs. Lipschitz: sqrt of the sum of squared input bounds."""

    def linear(self, xp, node, *xs):
        return xp.concatenate(xs, axis=node.attrs["axis"])

    def linear_t(self, xp, node, g):
        axis = node.attrs["axis"]
        sizes = [s[axis - 1] for s in node.attrs["in_shapes"]]
        cuts = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
        return tuple(xp.split(g, cuts, axis=axis))

    def lipschitz(self, node, in_lips, in_shapes):
        return math.sqrt(sum(v * v for v in in_lips))


@register("slice")
class Slice(StructuralOp):
    """attrs: axis (>= 1), start, stop, step (> 0): x[..., start:stop:step, ...] on one axis."""

    def _index(self, node, ndim):
        index = [slice(None)] * ndim
        a = node.attrs
        index[a["axis"]] = slice(a["start"], a["stop"], a.get("step", 1))
        return tuple(index)

    def linear(self, xp, node, x):
        return x[self._index(node, x.ndim)]

    def linear_t(self, xp, node, g):
        out = xp.zeros((g.shape[0],) + tuple(node.attrs["in_shape"]), dtype=g.dtype)
        out[self._index(node, g.ndim)] = g
        return (out,)
