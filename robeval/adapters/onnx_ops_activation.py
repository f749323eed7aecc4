"""ONNX converters for activations and other elementwise ops: Relu..Softmax, Max/Min, TopK, Cast, Dropout."""

from __future__ import annotations

import math

import numpy

from ..ir import Node
from .onnx_ops import Unsupported, _axis, _chain, _per_sample, arg, attrs, converter


def _unary(op: str, **fixed):
    def convert(cx, node):
        return [Node(node.output[0], op, (cx.src(node.input[0]),), attrs=dict(fixed))]
    return convert


converter("Relu", 13, 14)(_unary("relu"))
converter("Sigmoid", 13)(_unary("sigmoid"))
converter("Tanh", 13)(_unary("tanh"))
converter("Identity", 13, 14, 16, 19, 21, 23, 24, 25)(_unary("identity"))


@converter("LeakyRelu", 6, 16)
def leaky_relu(cx, node):
    return [Node(node.output[0], "leaky_relu", (cx.src(node.input[0]),),
                 attrs={"alpha": float(attrs(node).get("alpha", 0.01))})]


@converter("PRelu", 9, 16)
def prelu(cx, node):
    """x if x > 0 else slope * x with a constant slope broadcast to the input (any sign)."""
    if cx.dynamic(node.input[1]):
        raise Unsupported("the slope must be a constant")
    slope = _per_sample(cx, node.input[1], node.input[0], "the slope")
    return [Node(node.output[0], "prelu", (cx.src(node.input[0]),), {"slope": cx.param(slope)})]


@converter("Clip", 13)
def clip(cx, node):
    bounds = []
    for i, what in ((1, "min"), (2, "max")):
        if not arg(node, i):
            bounds.append(None)
            continue
        v = cx.const(node.input[i], what)
        if v.size != 1:
            raise Unsupported(f"{what} of shape {v.shape}; Clip takes scalar bounds")
        bounds.append(float(v.reshape(-1)[0]))
    return [Node(node.output[0], "clip", (cx.src(node.input[0]),), attrs={"low": bounds[0], "high": bounds[1]})]


@converter("Softmax", 13)
@converter("LogSoftmax", 13)
def softmax(cx, node):
    x = node.input[0]
    axis = _axis(attrs(node).get("axis", -1), len(cx.shape(x)) + 1)
    op = "softmax" if node.op_type == "Softmax" else "log_softmax"
    return [Node(node.output[0], op, (cx.src(x),), attrs={"axis": axis})]


@converter("Dropout", 13, 22)
def dropout(cx, node):
    if arg(node, 2) and (cx.dynamic(node.input[2]) or bool(cx.const(node.input[2], "training_mode"))):
        raise Unsupported("training_mode is true; export the model in eval mode")
    return [Node(node.output[0], "identity", (cx.src(node.input[0]),))]


@converter("Cast", 13, 19, 21, 23, 24, 25, 28)
def cast(cx, node):
    from onnx import TensorProto

    if attrs(node)["to"] not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16):
        raise Unsupported("casting an input-dependent tensor to a non-float type is not supported")
    return [Node(node.output[0], "identity", (cx.src(node.input[0]),))]


@converter("Max", 13)
@converter("Min", 13)
def extremum(cx, node):
    """Elementwise max/min of tensors; a constant operand becomes a clip (scalar) or relu (tensor)."""
    op = node.op_type.lower()
    dyn = [n for n in node.input if n and cx.dynamic(n)]
    consts = [_per_sample(cx, n, dyn[0], "the constant operand") for n in node.input if n and not cx.dynamic(n)]
    nodes: list[Node] = []
    src = cx.src(dyn[0])
    for i, other in enumerate(dyn[1:]):
        name = node.output[0] if i == len(dyn) - 2 and not consts else cx.fresh(f"{node.output[0]}::{op}")
        nodes.append(Node(name, op, (src, cx.src(other))))
        src = name
    if consts:
        c = numpy.maximum.reduce(consts) if op == "max" else numpy.minimum.reduce(consts)
        if c.size == 1:
            bound = float(c.reshape(-1)[0])
            at = {"low": bound, "high": None} if op == "max" else {"low": None, "high": bound}
            steps = [("clip", {}, at)]
        else:  # max(x, c) = relu(x - c) + c and min(x, c) = c - relu(c - x)
            sign = 1.0 if op == "max" else -1.0
            s = cx.param(numpy.full(c.shape, sign))
            steps = [("scale", {"scale": s, "shift": cx.param(-sign * c)}, {}), ("relu", {}, {}),
                     ("scale", {"scale": s, "shift": cx.param(c)}, {})]
        nodes += _chain(cx, node, src, steps)
    elif len(dyn) == 1:
        nodes.append(Node(node.output[0], "identity", (src,)))
    return nodes


@converter("TopK", 11, 24)
def topk(cx, node):
    """A full sort along a per-sample axis (torch.sort, GroupSort) -> groupsort: move the axis last so
    the groups are consecutive, sort ascending (between two negations for descending), move it back."""
    x = node.input[0]
    shape = cx.shape(x)
    rank = len(shape) + 1
    a = attrs(node)
    axis = _axis(a.get("axis", -1), rank)
    k = int(cx.const(node.input[1], "K").reshape(-1)[0])
    if k != shape[axis - 1] or not a.get("sorted", 1):
        raise Unsupported(f"K={k} of {shape[axis - 1]} (sorted={a.get('sorted', 1)}); only a full sorted TopK "
                          "(a sort) is supported")
    perm = [0] + [i for i in range(1, rank) if i != axis] + [axis]
    moved = [shape[p - 1] for p in perm[1:]]
    neg = ("scale", {"scale": cx.param(numpy.float64(-1)), "shift": cx.param(numpy.float64(0))}, {})
    sort = [("groupsort", {}, {"group_size": k})]
    steps = [("transpose", {}, {"perm": tuple(perm)})] if perm != list(range(rank)) else []
    steps += [("reshape", {}, {"shape": (math.prod(shape),)})] + ([neg] + sort + [neg] if a.get("largest", 1) else sort)
    steps.append(("reshape", {}, {"shape": tuple(moved)}))
    if perm != list(range(rank)):
        steps.append(("transpose", {}, {"perm": tuple(perm.index(i) for i in range(rank))}))
    return _chain(cx, node, cx.src(x), steps)
