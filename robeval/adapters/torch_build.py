"""The node builder and the layer emitters shared by the nn.Module and ATen conversion tables."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy
import torch

from ..ir.graph import Network, Node


class _T(str):
    """A value computed by the network: the name of the node that computes it."""


_POISON = object()  # an unconverted non-tensor value (a tuple of outputs)
_UNCONVERTED = "<unconverted>"  # stands for an unconverted tensor


@dataclass
class _Ctx:
    name: str  # node name to use
    where: str  # for messages: module path and class
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


class _Builder:
    """Collects nodes and the problems found while a model is converted."""

    def __init__(self, dtype: torch.dtype):
        self.nodes: list[Node] = []
        self.problems: list[tuple[str, str]] = []
        self.dtype = numpy.dtype(str(dtype).replace("torch.", ""))
        self._used = {"input"}

    def array(self, v) -> numpy.ndarray:
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().double().numpy()
        return numpy.asarray(v, dtype=numpy.float64).astype(self.dtype)

    def add(self, op: str, inputs, ctx: _Ctx, params=None, attrs=None) -> _T:
        name = "".join(ch if ch.isalnum() or ch in "._" else "_" for ch in ctx.name) or op
        base, k = name, 1
        while name in self._used:
            name, k = f"{base}_{k}", k + 1
        self._used.add(name)
        params = {key: self.array(v) for key, v in (params or {}).items() if v is not None}
        self.nodes.append(Node(name, op, tuple(inputs), params, dict(attrs or {})))
        return _T(name)

    def problem(self, what: str, ctx: _Ctx) -> None:
        self.problems.append((what, ctx.where))

    def network(self, out, input_shape, meta) -> Network:
        if out == "input":
            out = self.add("identity", ["input"], _Ctx("output", "", (), ()))
        keep, need = [], {out}
        for node in reversed(self.nodes):  # drop nodes the output does not depend on
            if node.name in need:
                keep.append(node)
                need.update(node.inputs)
        return Network(keep[::-1], input_shape, output_name=str(out), meta=meta)


def _pair(v) -> tuple[int, int]:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return (int(v[0]), int(v[-1]))


def _pads(padding, kernel, dilation) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) from torch's padding: ints, 'valid', or 'same' (extra on bottom/right)."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        th, tw = (d * (k - 1) for d, k in zip(_pair(dilation), _pair(kernel)))
        return (th // 2, tw // 2, th - th // 2, tw - tw // 2)
    ph, pw = _pair(padding)
    return (ph, pw, ph, pw)


def _ceil_extra(size, k, s, p) -> int:
    """Extra end padding that makes floor-mode pooling give torch's ceil_mode output size."""
    out = -(-(size + 2 * p - k) // s) + 1
    if (out - 1) * s >= size + p:  # torch: the last window must start inside the input or left padding
        out -= 1
    return max(0, (out - 1) * s + k - (size + 2 * p))


# -- emitters shared by the module table and the ATen table
def _dense(b, x, ctx, weight, bias):
    if not isinstance(weight, torch.Tensor):
        return b.problem("a dense layer whose weight is computed from the input", ctx)
    return b.add("dense", [x], ctx, {"weight": weight, "bias": bias})


def _conv(b, x, ctx, weight, bias, stride, padding, dilation, groups):
    if not isinstance(weight, torch.Tensor):
        return b.problem("a convolution whose kernel is computed from the input", ctx)
    if weight.dim() != 4:
        return b.problem(f"{weight.dim() - 2}-D convolution", ctx)
    return b.add("conv", [x], ctx, {"weight": weight, "bias": bias},
                 {"stride": _pair(stride), "padding": _pads(padding, weight.shape[2:], dilation),
                  "dilation": _pair(dilation), "groups": int(groups)})


def _batchnorm(b, x, ctx, gamma, beta, mean, var, eps):
    if mean is None or var is None:
        return b.problem("batch norm without running statistics (uses batch statistics)", ctx)
    shape = (-1,) + (1,) * (len(ctx.in_shape) - 1)
    ones = torch.ones_like(mean)
    stats = {"gamma": gamma if gamma is not None else ones, "beta": beta if beta is not None else 0 * ones,
             "mean": mean, "var": var}
    return b.add("batchnorm", [x], ctx, {k: v.detach().reshape(shape) for k, v in stats.items()},
                 {"eps": float(eps)})


def _prelu(b, x, ctx, weight):
    """PReLU's learned slope: one per channel (axis 1) or one shared by all entries."""
    if not isinstance(weight, torch.Tensor):
        return b.problem("a PReLU slope computed from the input", ctx)
    w = weight.detach().reshape(-1)
    if w.numel() == 1:
        return b.add("prelu", [x], ctx, {"slope": w.reshape(())})
    if not ctx.in_shape or w.numel() != ctx.in_shape[0]:
        return b.problem(f"PReLU with {w.numel()} slopes on input of shape {ctx.in_shape}", ctx)
    return b.add("prelu", [x], ctx, {"slope": w.reshape((-1,) + (1,) * (len(ctx.in_shape) - 1))})


def _maxpool(b, x, ctx, kernel, stride, padding, dilation=1, ceil_mode=False):
    kernel, padding = _pair(kernel), _pair(padding)
    stride = _pair(stride) if stride else kernel
    if _pair(dilation) != (1, 1):
        return b.problem("max pooling with dilation", ctx)
    extra = [_ceil_extra(n, k, s, p) if ceil_mode else 0
             for n, k, s, p in zip(ctx.in_shape[1:], kernel, stride, padding)]
    pads = (padding[0], padding[1], padding[0] + extra[0], padding[1] + extra[1])
    return b.add("maxpool", [x], ctx, attrs={"kernel": kernel, "stride": stride, "padding": pads})


def _avgpool(b, x, ctx, kernel, stride, padding, ceil_mode=False, count_include_pad=True, divisor=None):
    kernel, padding = _pair(kernel), _pair(padding)
    stride = _pair(stride) if stride else kernel
    if divisor is not None:
        return b.problem("average pooling with divisor_override", ctx)
    extra = [_ceil_extra(n, k, s, p) if ceil_mode else 0
             for n, k, s, p in zip(ctx.in_shape[1:], kernel, stride, padding)]
    if any(extra):  # torch then divides by the window inside input + padding: only equal to ours without padding
        if count_include_pad and any(padding):
            return b.problem("average pooling with ceil_mode, padding and count_include_pad", ctx)
        count_include_pad = False
    pads = (padding[0], padding[1], padding[0] + extra[0], padding[1] + extra[1])
    return b.add("avgpool", [x], ctx, attrs={"kernel": kernel, "stride": stride, "padding": pads,
                                            "count_include_pad": bool(count_include_pad and any(padding))})


def _adaptive(b, x, ctx, output_size, op):
    hw = ctx.in_shape[1:]
    size = output_size if isinstance(output_size, (tuple, list)) else (output_size, output_size)
    out = [n if o is None else int(o) for n, o in zip(hw, size)]
    if op == "avg" and out == [1, 1]:
        return b.add("global_avgpool", [x], ctx)
    if any(n % o for n, o in zip(hw, out)):
        return b.problem(f"adaptive pooling from {tuple(hw)} to {tuple(out)} (windows of unequal size)", ctx)
    kernel = tuple(n // o for n, o in zip(hw, out))
    return _maxpool(b, x, ctx, kernel, kernel, 0) if op == "max" else _avgpool(b, x, ctx, kernel, kernel, 0)


def _reshape(b, x, ctx):
    if ctx.out_shape == ctx.in_shape:
        return x
    if math.prod(ctx.out_shape) != math.prod(ctx.in_shape):
        return b.problem(f"reshape from {ctx.in_shape} to {ctx.out_shape} mixes samples of the batch", ctx)
    if len(ctx.out_shape) == 1:
        return b.add("flatten", [x], ctx)
    return b.add("reshape", [x], ctx, attrs={"shape": tuple(ctx.out_shape)})


def _softmax(b, x, ctx, dim, op="softmax"):
    rank = len(ctx.in_shape) + 1
    axis = (0 if rank in (1, 3) else 1) if dim is None else int(dim) % rank  # torch's legacy implicit dim
    if axis == 0:
        return b.problem(f"{op} over the batch axis", ctx)
    return b.add(op, [x], ctx, attrs={"axis": axis})


def _clip(b, x, ctx, low, high):
    if low == 0 and high is None:
        return b.add("relu", [x], ctx)
    return b.add("clip", [x], ctx, attrs={"low": None if low is None else float(low),
                                         "high": None if high is None else float(high)})


def _affine(b, x, ctx, scale=None, shift=None):
    """x * scale + shift with constants broadcast per sample (a leading batch axis of 1 dropped)."""
    rank = len(ctx.in_shape) + 1
    out = {}
    for key, value, default in (("scale", scale, 1.0), ("shift", shift, 0.0)):
        v = b.array(default if value is None else value)
        if v.ndim == rank:
            if v.shape[0] != 1:
                return b.problem("arithmetic with a constant that differs between samples", ctx)
            v = v[0]
        elif v.ndim > rank:
            return b.problem(f"arithmetic with a constant of shape {v.shape}", ctx)
        out[key] = v
    return b.add("scale", [x], ctx, out)
