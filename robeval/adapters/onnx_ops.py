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

Layout: this module holds the registry (``CONVERTERS``, ``converter``), ``Unsupported`` and the helpers
that several op families share; the converters live in one module per family, imported at the end
of this one so that they register: ``onnx_ops_linear`` (Gemm, MatMul, Conv, BatchNormalization,
arithmetic with constants), ``onnx_ops_pool`` (pooling and reductions), ``onnx_ops_activation``
(activations, Max/Min, TopK, Cast, Dropout) and ``onnx_ops_shape`` (Flatten, Reshape, Transpose,
Concat, Slice, Split, Squeeze, Unsqueeze, Gather, Pad). Their names stay readable from here
(``onnx_ops.gemm``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy

from ..ir import Node

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


# ---------------------------------------------------------------------------------- convolution and pooling
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


def _wrap_1d(cx, node, x, steps):
    """Apply 2-D steps to a (N, C, L) signal viewed as (N, C, L, 1), then drop the width axis."""
    c, length = cx.shape(x)
    probe = numpy.zeros((1, c, length, 1), numpy.float32)
    from ..ir import get_op

    for op, params, at in steps:  # the output length, from a forward on one zero sample
        probe = get_op(op).forward(numpy, Node("probe", op, ("x",), params, at), probe)
    return _chain(cx, node, cx.src(x), [("reshape", {}, {"shape": (c, length, 1)})] + steps
                  + [("reshape", {}, {"shape": probe.shape[1:3]})])


# The family modules import the helpers above from this module, so they are imported last. A plain
# `from . import` also works when a family module is imported first (it finds the half-done module in
# sys.modules); the converters are then reached by name through __getattr__ below.
from . import onnx_ops_activation, onnx_ops_linear, onnx_ops_pool, onnx_ops_shape  # noqa: E402

_FAMILIES = (onnx_ops_linear, onnx_ops_pool, onnx_ops_activation, onnx_ops_shape)


def __getattr__(name: str):
    """A converter or family helper by its old name here (``onnx_ops.gemm``): it lives in a family module."""
    for module in _FAMILIES:
        if name in vars(module):
            return vars(module)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
