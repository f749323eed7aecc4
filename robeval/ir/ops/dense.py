"""Fully connected layer y = x W^T + b (ONNX Gemm/MatMul, torch Linear, Keras Dense)."""

from __future__ import annotations

import numpy

from ...backend import asnumpy
from ..registry import AffineOp, register

#: Relative slack on computed singular values: LAPACK's SVD is accurate to a few ulps of ||W||.
SVD_SLACK = 1e-9


def spectral_norm(matrix) -> float:
    """Sound upper bound of the largest singular value of a 2-D array (float64 SVD plus slack)."""
    m = numpy.asarray(asnumpy(matrix), dtype=numpy.float64)
    if m.size == 0:
        return 0.0
    s = numpy.linalg.svd(m, compute_uv=False)
    return float(s[0]) * (1 + SVD_SLACK) + 1e-300


@register("dense")
class Dense(AffineOp):
    """params: weight (out, in), bias (out,) optional; input (N, in) -> (N, out)."""

    def linear(self, xp, node, x):
        return x @ node.params["weight"].T

    def linear_t(self, xp, node, g):
        return (g @ node.params["weight"],)

    def abs_linear(self, xp, node, r):
        return r @ xp.abs(node.params["weight"]).T

    def bias(self, xp, node):
        return node.params.get("bias")

    def fan_in(self, node):
        return int(node.params["weight"].shape[1])

    def op_norm(self, node, in_shapes):
        return spectral_norm(node.params["weight"])
