"""ONNX converters for affine layers: Gemm, MatMul, Conv, BatchNormalization, arithmetic with constants."""

from __future__ import annotations

import math

import numpy

from ..ir import Node
from .onnx_ops import Unsupported, _as_2d, _chain, _pads, _per_sample, _spatial_2d, _wrap_1d, arg, attrs, converter


@converter("Gemm", 13)
def gemm(cx, node):
    """alpha * A @ op(B) + beta * C with A input-dependent (N, K) and B, C constant -> dense."""
    a = attrs(node)
    if a.get("transA", 0):
        raise Unsupported("transA=1 would move the batch axis; only transA=0 is supported")
    x, b = node.input[0], node.input[1]
    if not cx.dynamic(x) or cx.dynamic(b):
        raise Unsupported("only A may depend on the input; B must be a constant weight")
    w = cx.const(b, "the weight B")
    weight = (w if a.get("transB", 0) else w.T) * a.get("alpha", 1.0)
    params = {"weight": cx.param(weight)}
    if arg(node, 2):
        c = cx.const(node.input[2], "the bias C") * a.get("beta", 1.0)
        if c.ndim == 2 and c.shape[0] != 1:
            raise Unsupported(f"the bias C of shape {c.shape} differs between samples")
        params["bias"] = cx.param(numpy.broadcast_to(c.reshape(-1), (weight.shape[0],)))
    if len(cx.shape(x)) != 1:
        raise Unsupported(f"A has per-sample shape {cx.shape(x)}; Gemm needs (N, K)")
    return [Node(node.output[0], "dense", (cx.src(x),), params)]


@converter("MatMul", 13)
def matmul(cx, node):
    """x @ W with a constant 2-D W -> dense (as a 1x1 convolution when x has more than 2 axes)."""
    x, w = node.input
    if not cx.dynamic(x) or cx.dynamic(w):
        raise Unsupported("only the first operand may depend on the input; the second must be a constant")
    weight = cx.const(w, "the weight")
    if weight.ndim != 2:
        raise Unsupported(f"the weight has shape {weight.shape}; only 2-D weights are supported")
    shape = cx.shape(x)
    k, m = weight.shape
    if shape[-1] != k:
        raise Unsupported(f"inner dimensions differ: input {shape}, weight {weight.shape}")
    if len(shape) == 1:
        return [Node(node.output[0], "dense", (cx.src(x),), {"weight": cx.param(weight.T)})]
    # (N, ..., K) @ (K, M): move K to the channel axis and apply a 1x1 convolution
    p = math.prod(shape[:-1])
    kernel = cx.param(weight.T.reshape(m, k, 1, 1))
    return _chain(cx, node, cx.src(x), [
        ("reshape", {}, {"shape": (p, k)}), ("transpose", {}, {"perm": (0, 2, 1)}),
        ("reshape", {}, {"shape": (k, p, 1)}), ("conv", {"weight": kernel}, {}),
        ("reshape", {}, {"shape": (m, p)}), ("transpose", {}, {"perm": (0, 2, 1)}),
        ("reshape", {}, {"shape": shape[:-1] + (m,)})])


def _scale(cx, node, x, scale, shift, key="scale") -> list[Node]:
    scale, shift = numpy.broadcast_arrays(scale, shift)
    return [Node(node.output[0], "scale", (cx.src(x),), {key: cx.param(scale), "shift": cx.param(shift)})]


@converter("Add", 13, 14)
@converter("Sub", 13, 14)
@converter("Mul", 13, 14)
@converter("Div", 13, 14)
def arith(cx, node):
    """With one constant operand -> scale (x*a + b); Add/Sub of two input-dependent tensors -> add/sub."""
    a, b = node.input
    op = node.op_type
    if cx.dynamic(a) and cx.dynamic(b):
        if op not in ("Add", "Sub"):
            raise Unsupported(f"{op} of two input-dependent tensors is not supported (not piecewise linear)")
        if len(cx.shape(a)) != len(cx.shape(b)):
            raise Unsupported(f"operands of per-sample shapes {cx.shape(a)} and {cx.shape(b)} differ in rank")
        return [Node(node.output[0], op.lower(), (cx.src(a), cx.src(b)))]
    x, const_first = (a, False) if cx.dynamic(a) else (b, True)
    c = _per_sample(cx, b if not const_first else a, x, "the constant operand")
    one, zero = numpy.ones_like(c), numpy.zeros_like(c)
    if op == "Add":
        return _scale(cx, node, x, one, c)
    if op == "Sub":
        return _scale(cx, node, x, -one, c) if const_first else _scale(cx, node, x, one, -c)
    if op == "Mul":
        return _scale(cx, node, x, c, zero)
    if const_first:
        raise Unsupported("division by an input-dependent tensor is not supported")
    return _scale(cx, node, x, c, zero, key="divisor")  # 1 / c is folded with its rounding bounded


@converter("Neg", 13)
def neg(cx, node):
    return _scale(cx, node, node.input[0], numpy.float64(-1.0), numpy.float64(0.0))


@converter("BatchNormalization", 9, 14, 15)
def batchnorm(cx, node):
    """Inference batch norm, kept as its stored statistics (the op folds them with rounding bounded)."""
    a = attrs(node)
    if a.get("training_mode", 0):
        raise Unsupported("training_mode=1; export the model in eval mode")
    x = node.input[0]
    shape = (-1,) + (1,) * (len(cx.shape(x)) - 1)
    params = {key: cx.param(cx.const(n, what).reshape(shape))
              for key, n, what in zip(("gamma", "beta", "mean", "var"), node.input[1:], ("scale", "B", "mean", "var"))}
    return [Node(node.output[0], "batchnorm", (cx.src(x),), params, {"eps": float(a.get("epsilon", 1e-5))})]


@converter("Conv", 11, 22)
def conv(cx, node):
    """Conv with constant weight and bias; 1-D convolutions become 2-D ones with width 1."""
    x, w = node.input[0], node.input[1]
    if cx.dynamic(w) or (arg(node, 2) and cx.dynamic(node.input[2])):
        raise Unsupported("the weight and bias must be constants")
    one_d = _as_2d(cx, x, "convolution")
    a = attrs(node)
    weight = cx.const(w, "the weight")
    kernel = weight.shape[2:]
    nd = len(kernel)
    strides, dil = a.get("strides", [1] * nd), a.get("dilations", [1] * nd)
    begin, end = _pads(a, cx.shape(x)[1:], kernel, strides, dil)
    params = {"weight": cx.param(weight[..., None] if one_d else weight)}
    if arg(node, 2):
        params["bias"] = cx.param(cx.const(node.input[2], "the bias"))
    at = {"stride": _spatial_2d(strides, one_d, 1), "dilation": _spatial_2d(dil, one_d, 1),
          "padding": _spatial_2d(begin, one_d, 0) + _spatial_2d(end, one_d, 0), "groups": int(a.get("group", 1))}
    if not one_d:
        return [Node(node.output[0], "conv", (cx.src(x),), params, at)]
    return _wrap_1d(cx, node, x, [("conv", params, at)])
