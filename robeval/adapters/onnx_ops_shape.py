"""ONNX shape converters: Flatten, Reshape, (Un)Squeeze, Transpose, Concat, Slice, Split, Gather, zero Pad."""

from __future__ import annotations

import numpy

from ..ir import Node
from .onnx_fold import BATCH_WORLDS, reshape_target
from .onnx_ops import Unsupported, _axis, _reshape, arg, attrs, converter


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
