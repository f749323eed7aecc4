"""ONNX converters for pooling (Max/Average/Global pools) and reductions (ReduceMean/Sum/Max/Min)."""

from __future__ import annotations

import math

import numpy

from ..ir import Node
from .onnx_ops import (
    Unsupported,
    _as_2d,
    _axis,
    _chain,
    _pads,
    _reshape,
    _spatial_2d,
    _wrap_1d,
    arg,
    attrs,
    converter,
)


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
