"""NHWC <-> NCHW in one place: the axis permutations, shape conversions and the Flatten re-ordering
that channels-last models (Keras, TF-exported ONNX) need. robeval's data and networks are NCHW.

Works on NumPy arrays and on anything with ``.transpose(perm)`` or a given ``transpose`` function
(``tf.transpose``), so the framework adapters never spell a permutation themselves."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy

#: Batched image permutations (batch axis stays first).
TO_NHWC = (0, 2, 3, 1)
TO_NCHW = (0, 3, 1, 2)


def to_nhwc(x: Any, transpose: Callable | None = None) -> Any:
    """(N, C, H, W) -> (N, H, W, C); arrays of another rank are returned unchanged."""
    if len(x.shape) != 4:
        return x
    return transpose(x, TO_NHWC) if transpose else numpy.ascontiguousarray(numpy.asarray(x).transpose(TO_NHWC))


def to_nchw(x: Any, transpose: Callable | None = None) -> Any:
    """(N, H, W, C) -> (N, C, H, W); arrays of another rank are returned unchanged."""
    if len(x.shape) != 4:
        return x
    return transpose(x, TO_NCHW) if transpose else numpy.ascontiguousarray(numpy.asarray(x).transpose(TO_NCHW))


def nchw_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Per-sample (H, W, C) -> (C, H, W); other ranks unchanged."""
    shape = tuple(int(d) for d in shape)
    return (shape[2], shape[0], shape[1]) if len(shape) == 3 else shape


def nhwc_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Per-sample (C, H, W) -> (H, W, C); other ranks unchanged."""
    shape = tuple(int(d) for d in shape)
    return (shape[1], shape[2], shape[0]) if len(shape) == 3 else shape


def nchw_axis(axis: int, rank: int) -> int:
    """The NCHW axis (batch = 0) of axis ``axis`` of a channels-last tensor of ``rank`` axes."""
    axis = axis % rank
    if rank != 4:
        return axis
    return (0, 2, 3, 1)[axis]


def channel_param(values: Any, rank: int) -> numpy.ndarray:
    """A per-channel (or scalar) parameter broadcast along the last axis of an NHWC tensor, reshaped
    to broadcast per sample in NCHW: (C,) -> (C, 1, 1) for images, unchanged for vectors."""
    values = numpy.asarray(values)
    if values.ndim == 0 or values.size == 1:
        return values.reshape(())
    values = values.reshape(-1)
    return values.reshape(-1, 1, 1) if rank == 4 else values


def flatten_permutation(chw: Sequence[int]) -> numpy.ndarray:
    """Index array ``idx`` with ``flatten_nhwc(x)[idx] == flatten_nchw(x)``.

    A Keras Flatten of an (H, W, C) map orders features h, w, c; the NCHW network flattens c, h, w.
    A Dense kernel ``W`` (out, in) written for the Keras order reads NCHW features as ``W[:, idx]``."""
    c, h, w = (int(d) for d in chw)
    return numpy.arange(c * h * w).reshape(h, w, c).transpose(2, 0, 1).reshape(-1)


def check_batch(x: Any, input_shape: Sequence[int]) -> numpy.ndarray:
    """``x`` as a NumPy batch of shape (N, *input_shape), with a message that says how to fix it."""
    from ..backend import asnumpy
    from ..errors import InputShapeError

    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    x = numpy.asarray(asnumpy(x))
    want = tuple(int(d) for d in input_shape)
    if tuple(x.shape[1:]) == want:
        return x
    hint = ""
    if tuple(x.shape) == want:
        hint = "; add a batch axis: x[None]"
    elif x.ndim == 4 and len(want) == 3 and tuple(x.shape[1:]) == nhwc_shape(want):
        hint = "; the data look channels-last (NHWC): transpose them with robeval.adapters.layout.to_nchw(x)"
    elif x.ndim == len(want) and tuple(x.shape[1:]) == want[1:]:
        hint = "; add a channel axis: x[:, None]"
    elif x.ndim >= 2 and int(numpy.prod(x.shape[1:])) == int(numpy.prod(want)):
        hint = f"; reshape it: x.reshape(-1, {', '.join(map(str, want))})"
    raise InputShapeError(f"input has shape {tuple(x.shape)}; expected (N, {', '.join(map(str, want))}) (NCHW)"
                          + hint)


def fold_flatten(net: Any) -> Any:
    """Fold ``transpose(to NHWC) -> flatten -> dense`` chains into ``flatten -> dense`` with the dense
    columns permuted (``flatten_permutation``): the same function, without the transpose node."""
    from ..ir.graph import Network

    uses = {net.output_name: 1}
    for node in net.nodes:
        for name in node.inputs:
            uses[name] = uses.get(name, 0) + 1
    by_name = {node.name: node for node in net.nodes}
    shapes = net.shapes()
    replaced, dropped = {}, set()
    for node in net.nodes:
        flat = by_name.get(node.inputs[0]) if node.op == "dense" else None
        if flat is None or flat.op != "flatten" or uses[flat.name] != 1:
            continue
        tr = by_name.get(flat.inputs[0])
        if tr is None or tr.op != "transpose" or tuple(tr.attrs["perm"]) != TO_NHWC or uses[tr.name] != 1:
            continue
        idx = flatten_permutation(shapes[tr.inputs[0]])
        replaced[node.name] = node.replace(params={**node.params, "weight": node.params["weight"][:, idx]})
        replaced[flat.name] = flat.replace(inputs=tr.inputs, attrs={})
        dropped.add(tr.name)
    if not dropped:
        return net
    nodes = [replaced.get(n.name, n) for n in net.nodes if n.name not in dropped]
    return Network(nodes, net.input_shape, net.input_name, net.output_name, net.meta)
