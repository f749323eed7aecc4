"""ONNX op converters: a table keyed by ``(op_type, since_version)`` as in onnx2torch.

Each converter takes the import context ``cx`` and one ONNX node with at least one input-dependent
input (nodes with only constant inputs were folded before) and returns robeval Nodes; the node named
after ONNX output ``k`` stands for that output. A converter raises ``Unsupported`` with a reason when
the op is used in a way robeval cannot represent (a Mul of two input-dependent tensors, a Slice of
the batch axis...); the importer collects those and reports them all at once.

The context offers: ``cx.dynamic(name)`` (input-dependent?), ``cx.src(name)`` (robeval node for it),
``cx.shape(name)`` (its per-sample shape), ``cx.const(name, what)`` (a batch-independent constant),
``cx.worlds(name)`` (a folded value in both batch worlds, see onnx_fold), ``cx.param(array)`` (cast
to the model's float dtype) and ``cx.fresh(base)`` (an unused node name).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy

from ..ir import Node
from .onnx_fold import BATCH_WORLDS, reshape_target

CONVERTERS: dict[tuple[str, int], Callable] = {}


class Unsupported(Exception):
    """A supported op type used in a way robeval cannot represent; the message says how."""


def converter(op_type: str, *versions: int):
    """Register a converter for these since_versions of an ONNX op."""

    def wrap(fn):
        for version in versions:
            if (op_type, version) in CONVERTERS:
                raise RuntimeError(f"converter for {op_type}-{version} is registered twice")
            CONVERTERS[(op_type, version)] = fn
        return fn

    return wrap


def attrs(node) -> dict:
    """The node's attributes as plain Python values (strings decoded)."""
    from onnx import helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def arg(node, i: int) -> str | None:
    """Name of input ``i``, or None when absent or empty (an omitted optional input)."""
    return node.input[i] if len(node.input) > i and node.input[i] else None


def _axis(axis: int, rank: int, what: str = "axis") -> int:
    """A normalised axis of a full tensor (batch axis 0) that must not be the batch axis."""
    a = int(axis) + rank if int(axis) < 0 else int(axis)
    if not 0 <= a < rank:
        raise Unsupported(f"{what} {axis} is out of range for rank {rank}")
    if a == 0:
        raise Unsupported(f"{what} {axis} is the batch axis; robeval keeps the batch axis 0 untouched")
    return a


def _unary(op: str, **fixed):
    def convert(cx, node):
        return [Node(node.output[0], op, (cx.src(node.input[0]),), attrs=dict(fixed))]
    return convert


def _reshape(name: str, src: str, shape) -> Node:
    return Node(name, "reshape", (src,), attrs={"shape": tuple(int(d) for d in shape)})


def _chain(cx, node, src: str, steps: list[tuple[str, dict, dict]]) -> list[Node]:
    """Nodes applying (op, params, attrs) steps one after the other; the last is named after output 0."""
    nodes = []
    for i, (op, params, at) in enumerate(steps):
        name = node.output[0] if i == len(steps) - 1 else cx.fresh(f"{node.output[0]}::{op}")
        nodes.append(Node(name, op, (src,), params=params, attrs=at))
        src = name
    return nodes


# ---------------------------------------------------------------------------------- linear layers
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


def _per_sample(cx, name: str, x: str, what: str):
    """A constant operand of an elementwise op with input x, without the batch axis, checked not to
    broadcast x to a larger shape."""
    c = cx.const(name, what, allow_batch_rows=True)
    rank = len(cx.shape(x)) + 1
    if c.ndim > rank:
        raise Unsupported(f"{what} of shape {c.shape} has more axes than the input (rank {rank})")
    if c.ndim == rank:
        if c.shape[0] != 1:
            raise Unsupported(f"{what} of shape {c.shape} differs between samples")
        c = c[0]
    try:
        grown = numpy.broadcast_shapes(cx.shape(x), c.shape) != cx.shape(x)
    except ValueError:
        grown = True
    if grown:
        raise Unsupported(f"{what} of shape {c.shape} broadcasts the input of per-sample shape "
                          f"{cx.shape(x)} to a larger shape")
    return c.astype(numpy.float64)


def _scale(cx, node, x, scale, shift) -> list[Node]:
    scale, shift = numpy.broadcast_arrays(scale, shift)
    return [Node(node.output[0], "scale", (cx.src(x),), {"scale": cx.param(scale), "shift": cx.param(shift)})]


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
    return _scale(cx, node, x, 1.0 / c, zero)


@converter("Neg", 13)
def neg(cx, node):
    return _scale(cx, node, node.input[0], numpy.float64(-1.0), numpy.float64(0.0))


@converter("BatchNormalization", 9, 14, 15)
def batchnorm(cx, node):
    """Inference batch norm folded to scale = gamma / sqrt(var + eps), shift = beta - mean * scale."""
    a = attrs(node)
    if a.get("training_mode", 0):
        raise Unsupported("training_mode=1; export the model in eval mode")
    x = node.input[0]
    gamma, beta, mean, var = (cx.const(n, what).astype(numpy.float64)
                              for n, what in zip(node.input[1:], ("scale", "B", "mean", "var")))
    scale = gamma / numpy.sqrt(var + a.get("epsilon", 1e-5))
    shift = beta - mean * scale
    shape = (-1,) + (1,) * (len(cx.shape(x)) - 1)
    return [Node(node.output[0], "batchnorm", (cx.src(x),),
                 {"scale": cx.param(scale.reshape(shape)), "shift": cx.param(shift.reshape(shape))})]


# ---------------------------------------------------------------------------------- convolution
def _pads(a: dict, in_sizes, kernel, strides, dilations) -> tuple[list[int], list[int]]:
    """(begin, end) padding per spatial axis from ``pads`` or ``auto_pad``."""
    nd = len(kernel)
    auto = a.get("auto_pad", "NOTSET") or "NOTSET"
    if auto == "NOTSET":
        p = list(a.get("pads", [0] * 2 * nd))
        return p[:nd], p[nd:]
    if auto == "VALID":
        return [0] * nd, [0] * nd
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise Unsupported(f"auto_pad={auto!r} is not known")
    begin, end = [], []
    for n, k, s, d in zip(in_sizes, kernel, strides, dilations):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin, end


def _as_2d(cx, x: str, what: str) -> bool:
    """Whether x is a 1-D signal (N, C, L) that must be viewed as (N, C, L, 1); refuses other ranks."""
    rank = len(cx.shape(x)) + 1
    if rank not in (3, 4):
        raise Unsupported(f"{what} on a rank-{rank} tensor; only 1-D and 2-D {what} are supported")
    return rank == 3


def _spatial_2d(values, one_d: bool, fill: int):
    return (int(values[0]), fill) if one_d else tuple(int(v) for v in values)


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


def _wrap_1d(cx, node, x, steps):
    """Apply 2-D steps to a (N, C, L) signal viewed as (N, C, L, 1), then drop the width axis."""
    c, length = cx.shape(x)
    probe = numpy.zeros((1, c, length, 1), numpy.float32)
    from ..ir import get_op

    for op, params, at in steps:  # the output length, from a forward on one zero sample
        probe = get_op(op).forward(numpy, Node("probe", op, ("x",), params, at), probe)
    return _chain(cx, node, cx.src(x), [("reshape", {}, {"shape": (c, length, 1)})] + steps
                  + [("reshape", {}, {"shape": probe.shape[1:3]})])


@converter("Pad", 13, 18, 19, 21, 23, 24, 25)
def pad(cx, node):
    """Zero padding of the spatial axes of (N, C, H, W) -> a depthwise 1x1 identity convolution."""
    a = attrs(node)
    if a.get("mode", "constant") != "constant":
        raise Unsupported(f"mode={a['mode']!r}; only constant (zero) padding is supported")
    x = node.input[0]
    if len(cx.shape(x)) != 3:
        raise Unsupported("only padding of (N, C, H, W) tensors is supported")
    pads = cx.const(node.input[1], "pads").astype(int).tolist()
    if arg(node, 2) and float(cx.const(node.input[2], "the pad value").reshape(-1)[0]) != 0:
        raise Unsupported("only zero padding is supported")
    axes = cx.const(node.input[3], "axes").astype(int).tolist() if arg(node, 3) else list(range(4))
    axes = [ax + 4 if ax < 0 else ax for ax in axes]
    full = [0] * 8
    for i, ax in enumerate(axes):
        full[ax], full[ax + 4] = pads[i], pads[i + len(axes)]
    if any(full[i] for i in (0, 1, 4, 5)) or min(full) < 0:
        raise Unsupported(f"pads {full} touch the batch or channel axis or crop; only H/W zero padding")
    c = cx.shape(x)[0]
    weight = cx.param(numpy.ones((c, 1, 1, 1)))
    at = {"padding": (full[2], full[3], full[6], full[7]), "groups": c}
    return [Node(node.output[0], "conv", (cx.src(x),), {"weight": weight}, at)]


# ---------------------------------------------------------------------------------- pooling
def _pool_geometry(cx, node, x, one_d):
    a = attrs(node)
    kernel = list(a["kernel_shape"])
    nd = len(kernel)
    strides = list(a.get("strides", [1] * nd))
    if any(d != 1 for d in a.get("dilations", [1] * nd)):
        raise Unsupported(f"dilations={a['dilations']}; only dilation 1 is supported for pooling")
    sizes = cx.shape(x)[1:]
    begin, end = _pads(a, sizes, kernel, strides, [1] * nd)
    count_pad = bool(a.get("count_include_pad", 0))
    if a.get("ceil_mode", 0):
        # ceil_mode adds a partial last window; as in onnxruntime and torch, none starts in the end padding.
        # Its overhang becomes extra end padding: -inf never wins a max, and an average divides by the
        # entries inside input + explicit pads, which count_include_pad=False reproduces when there are no
        # explicit pads (and nothing can reproduce when there are).
        explicit = any(begin) or any(end)
        for i in range(nd):
            span = sizes[i] + begin[i] + end[i] - kernel[i]
            out = -(-span // strides[i]) + 1
            if (out - 1) * strides[i] >= sizes[i] + begin[i]:
                out -= 1
            extra = (out - 1) * strides[i] + kernel[i] - (sizes[i] + begin[i] + end[i])
            if extra > 0:
                if node.op_type == "AveragePool" and count_pad and explicit:
                    raise Unsupported("ceil_mode=1 with count_include_pad=1 and explicit pads divides the partial "
                                      "last window by a count robeval cannot express; use ceil_mode=0")
                count_pad = False
                end[i] += extra
    at = {"kernel": _spatial_2d(kernel, one_d, 1), "stride": _spatial_2d(strides, one_d, 1),
          "padding": _spatial_2d(begin, one_d, 0) + _spatial_2d(end, one_d, 0)}
    if node.op_type == "AveragePool":
        at["count_include_pad"] = count_pad
    return at


@converter("MaxPool", 12, 22)
def maxpool(cx, node):
    x = node.input[0]
    one_d = _as_2d(cx, x, "pooling")
    at = _pool_geometry(cx, node, x, one_d)
    return _wrap_1d(cx, node, x, [("maxpool", {}, at)]) if one_d else [
        Node(node.output[0], "maxpool", (cx.src(x),), attrs=at)]


@converter("AveragePool", 11, 19, 22)
def avgpool(cx, node):
    x = node.input[0]
    one_d = _as_2d(cx, x, "pooling")
    at = _pool_geometry(cx, node, x, one_d)
    return _wrap_1d(cx, node, x, [("avgpool", {}, at)]) if one_d else [
        Node(node.output[0], "avgpool", (cx.src(x),), attrs=at)]


@converter("GlobalAveragePool", 1, 22)
def global_avgpool(cx, node):
    return [Node(node.output[0], "global_avgpool", (cx.src(node.input[0]),))]


@converter("GlobalMaxPool", 1, 22)
def global_maxpool(cx, node):
    return _reduce(cx, node, "max", list(range(2, len(cx.shape(node.input[0])) + 1)), True)


def _reduce(cx, node, kind: str, axes: list[int], keepdims: bool) -> list[Node]:
    """Mean/sum/max/min over per-sample axes: move them last, view as (N, kept, reduced), then a global
    average pool (mean, sum) or a max pool over the reduced block (max, and min as -max(-x))."""
    x = node.input[0]
    shape = cx.shape(x)
    rank = len(shape) + 1
    axes = sorted({_axis(ax, rank) for ax in axes})
    kept = [i for i in range(1, rank) if i not in axes]
    k, r = math.prod(shape[i - 1] for i in kept), math.prod(shape[i - 1] for i in axes)
    out = [1 if i in axes else shape[i - 1] for i in range(1, rank)] if keepdims else [shape[i - 1] for i in kept]
    if kind == "mean" and kept == [1] and axes == list(range(2, rank)):  # a global average pool
        pool = Node(node.output[0] if keepdims else cx.fresh(f"{node.output[0]}::pool"), "global_avgpool",
                    (cx.src(x),))
        return [pool] if keepdims else [pool, _reshape(node.output[0], pool.name, out)]
    steps = []
    if kept + axes != list(range(1, rank)):
        steps.append(("transpose", {}, {"perm": (0, *kept, *axes)}))
    if kind in ("mean", "sum"):
        steps += [("reshape", {}, {"shape": (k, r)}), ("global_avgpool", {}, {})]
        if kind == "sum":
            steps.append(("scale", {"scale": cx.param(numpy.float64(r)), "shift": cx.param(numpy.float64(0))}, {}))
    else:
        neg = ("scale", {"scale": cx.param(numpy.float64(-1)), "shift": cx.param(numpy.float64(0))}, {})
        pool = ("maxpool", {}, {"kernel": (r, 1), "stride": (r, 1)})
        steps += [("reshape", {}, {"shape": (k, r, 1)})] + ([neg, pool, neg] if kind == "min" else [pool])
    steps.append(("reshape", {}, {"shape": tuple(out)}))
    return _chain(cx, node, cx.src(x), steps)


def _reduce_converter(kind: str):
    def convert(cx, node):
        a = attrs(node)
        axes = a.get("axes")
        if arg(node, 1):
            axes = cx.const(node.input[1], "axes").astype(int).tolist()
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return [Node(node.output[0], "identity", (cx.src(node.input[0]),))]
            raise Unsupported("reducing over all axes would mix the batch axis")
        return _reduce(cx, node, kind, list(axes), bool(a.get("keepdims", 1)))
    return convert


converter("ReduceMean", 13, 18)(_reduce_converter("mean"))
converter("ReduceSum", 13)(_reduce_converter("sum"))
converter("ReduceMax", 13, 18, 20)(_reduce_converter("max"))
converter("ReduceMin", 13, 18, 20)(_reduce_converter("min"))


# ---------------------------------------------------------------------------------- activations
converter("Relu", 13, 14)(_unary("relu"))
converter("Sigmoid", 13)(_unary("sigmoid"))
converter("Tanh", 13)(_unary("tanh"))
converter("Identity", 13, 14, 16, 19, 21, 23, 24, 25)(_unary("identity"))


@converter("LeakyRelu", 6, 16)
def leaky_relu(cx, node):
    return [Node(node.output[0], "leaky_relu", (cx.src(node.input[0]),),
                 attrs={"alpha": float(attrs(node).get("alpha", 0.01))})]


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


# ---------------------------------------------------------------------------------- shapes
@converter("Flatten", 13, 21, 23, 24, 25)
def flatten(cx, node):
    x = node.input[0]
    shape = cx.shape(x)
    axis = int(attrs(node).get("axis", 1))
    axis = axis + len(shape) + 1 if axis < 0 else axis
    if axis == 0 or any(d != 1 for d in shape[:axis - 1]):
        raise Unsupported(f"axis={axis} merges the batch axis with per-sample axes of shape {shape}")
    return [Node(node.output[0], "flatten", (cx.src(x),))]


@converter("Reshape", 13, 14, 19, 21, 23, 24, 25)
def reshape(cx, node):
    """Target checked in both batch worlds: it must map a batch of N samples to N samples."""
    x, target = node.input
    if cx.dynamic(target):
        raise Unsupported("the target shape depends on the input values")
    shape = cx.shape(x)
    allowzero = bool(attrs(node).get("allowzero", 0))
    outs = []
    for batch, t in zip(BATCH_WORLDS, cx.worlds(target)):
        t = numpy.array(t, dtype=numpy.int64).reshape(-1)
        if cx.fixed_batch is not None and t.size and t[0] == cx.fixed_batch:
            t[0] = batch  # a model exported with a fixed batch size writes it into its targets
        try:
            outs.append(reshape_target((batch,) + shape, t, allowzero))
        except ValueError as exc:
            raise Unsupported(str(exc)) from None
    if any(o[0] != b for o, b in zip(outs, BATCH_WORLDS)) or outs[0][1:] != outs[1][1:]:
        raise Unsupported(f"the target shape merges or splits the batch axis (per-sample shape {shape})")
    return [_reshape(node.output[0], cx.src(x), outs[0][1:])]


def _axes_input(cx, node, rank_for_negative: int) -> list[int] | None:
    if arg(node, 1):
        axes = cx.const(node.input[1], "axes").astype(int).tolist()
    else:
        axes = attrs(node).get("axes")
    return None if axes is None else sorted(_axis(a, rank_for_negative) for a in axes)


@converter("Squeeze", 13, 21, 23, 24, 25)
def squeeze(cx, node):
    x = node.input[0]
    shape = cx.shape(x)
    axes = _axes_input(cx, node, len(shape) + 1)
    if axes is None:  # the batch size is never assumed to be 1
        axes = [i + 1 for i, d in enumerate(shape) if d == 1]
    if any(shape[a - 1] != 1 for a in axes):
        raise Unsupported(f"cannot squeeze axes {axes} of per-sample shape {shape}")
    return [_reshape(node.output[0], cx.src(x), [d for i, d in enumerate(shape) if i + 1 not in axes])]


@converter("Unsqueeze", 13, 21, 23, 24, 25)
def unsqueeze(cx, node):
    x = node.input[0]
    shape = list(cx.shape(x))
    n_axes = len(_axes_input(cx, node, 10**6) or [])  # count first, then normalise against the output rank
    axes = _axes_input(cx, node, len(shape) + 1 + n_axes)
    for a in axes:
        shape.insert(a - 1, 1)
    return [_reshape(node.output[0], cx.src(x), shape)]


@converter("Transpose", 13, 21, 23, 24, 25)
def transpose(cx, node):
    x = node.input[0]
    rank = len(cx.shape(x)) + 1
    perm = [int(p) for p in attrs(node).get("perm", range(rank - 1, -1, -1))]
    if perm[0] != 0:
        raise Unsupported(f"perm={perm} moves the batch axis")
    return [Node(node.output[0], "transpose", (cx.src(x),), attrs={"perm": tuple(perm)})]


@converter("Concat", 13)
def concat(cx, node):
    names = [n for n in node.input if n]
    if not all(cx.dynamic(n) for n in names):
        raise Unsupported("concatenating a constant with input-dependent tensors is not supported")
    axis = _axis(attrs(node)["axis"], len(cx.shape(names[0])) + 1)
    if len(names) == 1:
        return [Node(node.output[0], "identity", (cx.src(names[0]),))]
    return [Node(node.output[0], "concat", tuple(cx.src(n) for n in names), attrs={"axis": axis})]


def _slice_nodes(cx, x: str, out: str, cuts: list[tuple[int, int, int, int]]) -> list[Node]:
    """One slice node per (axis, start, stop, step) on per-sample axes, skipping whole-axis cuts."""
    shape = list(cx.shape(x))
    cuts = [c for c in cuts if (c[1], c[2], c[3]) != (0, shape[c[0] - 1], 1)]
    nodes: list[Node] = []
    src = cx.src(x)
    for i, (axis, start, stop, step) in enumerate(cuts):
        if len(range(start, stop, step)) == 0:
            raise Unsupported(f"the slice {start}:{stop}:{step} of axis {axis} is empty")
        name = out if i == len(cuts) - 1 else cx.fresh(f"{out}::slice")
        nodes.append(Node(name, "slice", (src,), attrs={"axis": axis, "start": start, "stop": stop, "step": step}))
        src = name
    return nodes or [Node(out, "identity", (src,))]


@converter("Slice", 13)
def slice_(cx, node):
    x = node.input[0]
    shape = cx.shape(x)
    rank = len(shape) + 1
    starts, ends = (cx.const(n, w).astype(numpy.int64).tolist() for n, w in zip(node.input[1:3], ("starts", "ends")))
    axes = cx.const(node.input[3], "axes").astype(int).tolist() if arg(node, 3) else list(range(len(starts)))
    steps = cx.const(node.input[4], "steps").astype(numpy.int64).tolist() if arg(node, 4) else [1] * len(starts)
    cuts = []
    for ax, s, e, st in zip(axes, starts, ends, steps):
        if st <= 0:
            raise Unsupported(f"step {st}; only positive slice steps are supported")
        a = int(ax) + rank if int(ax) < 0 else int(ax)
        if a == 0:
            if any(slice(s, e, st).indices(b) != (0, b, 1) for b in BATCH_WORLDS):
                raise Unsupported(f"the slice {s}:{e}:{st} selects samples from the batch axis")
            continue
        cuts.append((_axis(a, rank), *slice(s, e, st).indices(shape[a - 1])))
    return _slice_nodes(cx, x, node.output[0], cuts)


@converter("Split", 13, 18)
def split(cx, node):
    x = node.input[0]
    shape = cx.shape(x)
    a = attrs(node)
    axis = _axis(a.get("axis", 0), len(shape) + 1)
    dim = shape[axis - 1]
    n = len(node.output)
    if arg(node, 1):
        sizes = cx.const(node.input[1], "split").astype(int).tolist()
    elif "num_outputs" in a:
        chunk = -(-dim // a["num_outputs"])
        sizes = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
    else:
        if dim % n:
            raise Unsupported(f"axis {axis} of size {dim} does not split evenly into {n} outputs")
        sizes = [dim // n] * n
    if sum(sizes) != dim or len(sizes) != n:
        raise Unsupported(f"split sizes {sizes} do not cover axis {axis} of size {dim} with {n} outputs")
    nodes, start = [], 0
    for out, size in zip(node.output, sizes):
        if out:
            nodes += _slice_nodes(cx, x, out, [(axis, start, start + size, 1)])
        start += size
    return nodes


@converter("Gather", 13)
def gather(cx, node):
    """Constant indices along a per-sample axis -> slices (and a reshape for a scalar index)."""
    x, idx = node.input
    if cx.dynamic(idx):
        raise Unsupported("the indices depend on the input")
    shape = cx.shape(x)
    axis = _axis(attrs(node).get("axis", 0), len(shape) + 1)
    dim = shape[axis - 1]
    index = cx.const(idx, "indices").astype(numpy.int64)
    if index.ndim > 1:
        raise Unsupported(f"indices of shape {index.shape}; only scalar or 1-D indices are supported")
    flat = [int(i) % dim for i in index.reshape(-1)]
    out = node.output[0]
    if index.ndim == 0:
        sliced = _slice_nodes(cx, x, cx.fresh(f"{out}::slice"), [(axis, flat[0], flat[0] + 1, 1)])
        dropped = [d for i, d in enumerate(shape) if i != axis - 1]
        return sliced + [_reshape(out, sliced[-1].name, dropped)]
    step = flat[1] - flat[0] if len(flat) > 1 else 1
    if step > 0 and flat == list(range(flat[0], flat[0] + step * len(flat), step)):
        return _slice_nodes(cx, x, out, [(axis, flat[0], flat[-1] + 1, step)])
    pieces = [_slice_nodes(cx, x, cx.fresh(f"{out}::pick"), [(axis, i, i + 1, 1)])[0] for i in flat]
    return pieces + [Node(out, "concat", tuple(p.name for p in pieces), attrs={"axis": axis})]
