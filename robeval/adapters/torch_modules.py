"""The nn.Module conversion table (``MODULES``), the walk over Sequential-like trees and plain_copy."""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from .torch_aten import ATEN
from .torch_build import (
    _adaptive,
    _avgpool,
    _batchnorm,
    _clip,
    _conv,
    _Ctx,
    _dense,
    _maxpool,
    _prelu,
    _reshape,
    _softmax,
)


def _is_plugin(m: nn.Module) -> bool:
    """robeval's training layers and look-alikes: GroupSort (``group_size``) or ``export()``."""
    return hasattr(m, "group_size") or callable(getattr(m, "export", None))


def _groupsort(b, x, ctx, group_size):
    if ctx.in_shape and ctx.in_shape[0] % int(group_size):
        return b.problem(f"GroupSort({group_size}) on {ctx.in_shape[0]} channels", ctx)
    return b.add("groupsort", [x], ctx, attrs={"group_size": int(group_size)})


def _m_conv(b, m, x, ctx):
    if m.padding_mode != "zeros":
        return b.problem(f"Conv2d(padding_mode={m.padding_mode!r})", ctx)
    return _conv(b, x, ctx, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)


def _m_bn(b, m, x, ctx):
    return _batchnorm(b, x, ctx, m.weight, m.bias, m.running_mean, m.running_var, m.eps)


def _m_maxpool(b, m, x, ctx):
    if m.return_indices:
        return b.problem("MaxPool2d(return_indices=True)", ctx)
    return _maxpool(b, x, ctx, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


def _m_avgpool(b, m, x, ctx):
    return _avgpool(b, x, ctx, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                    m.divisor_override)


def _alias(b, m, x, ctx):
    return x


#: Layer class -> converter(builder, module, input name, context) -> output name (None: reported).
MODULES = {
    nn.Linear: lambda b, m, x, c: _dense(b, x, c, m.weight, m.bias),
    nn.Conv2d: _m_conv,
    nn.BatchNorm1d: _m_bn,
    nn.BatchNorm2d: _m_bn,
    nn.MaxPool2d: _m_maxpool,
    nn.AvgPool2d: _m_avgpool,
    nn.AdaptiveAvgPool2d: lambda b, m, x, c: _adaptive(b, x, c, m.output_size, "avg"),
    nn.AdaptiveMaxPool2d: lambda b, m, x, c: _adaptive(b, x, c, m.output_size, "max"),
    nn.Flatten: lambda b, m, x, c: _reshape(b, x, c),
    nn.Unflatten: lambda b, m, x, c: _reshape(b, x, c),
    nn.ReLU: lambda b, m, x, c: b.add("relu", [x], c),
    nn.LeakyReLU: lambda b, m, x, c: b.add("leaky_relu", [x], c, attrs={"alpha": float(m.negative_slope)}),
    nn.PReLU: lambda b, m, x, c: _prelu(b, x, c, m.weight),
    nn.Sigmoid: lambda b, m, x, c: b.add("sigmoid", [x], c),
    nn.Tanh: lambda b, m, x, c: b.add("tanh", [x], c),
    nn.ReLU6: lambda b, m, x, c: _clip(b, x, c, 0.0, 6.0),
    nn.Hardtanh: lambda b, m, x, c: _clip(b, x, c, m.min_val, m.max_val),
    nn.Softmax: lambda b, m, x, c: _softmax(b, x, c, m.dim),
    nn.LogSoftmax: lambda b, m, x, c: _softmax(b, x, c, m.dim, "log_softmax"),
    nn.Identity: _alias,
    nn.Dropout: _alias,
    nn.Dropout1d: _alias,
    nn.Dropout2d: _alias,
    nn.AlphaDropout: _alias,
    nn.FeatureAlphaDropout: _alias,
}
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _prescan(model: nn.Module) -> list[tuple[str, str]]:
    """Every torch.nn layer in the tree that no converter handles, with its path."""
    problems, skip = [], []
    for path, m in model.named_modules():
        if any(path.startswith(s + ".") for s in skip):
            continue
        if type(m) in MODULES or _is_plugin(m):
            skip.append(path)
        elif not isinstance(m, _CONTAINERS) and type(m).__module__.startswith("torch.nn"):
            problems.append((type(m).__name__, path or "(model)"))
            skip.append(path)
    return problems


def _is_chain(m: nn.Module) -> bool:
    """Whether the model is a plain chain of supported layers (walked without tracing)."""
    if type(m) in MODULES or _is_plugin(m):
        return True
    return (isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
            and all(_is_chain(c) for c in m.children()))


def _convert_chain(b, m, x, example, path):
    """Convert a chain (see _is_chain), running ``example`` alongside for the shapes."""
    if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
        for name, child in m.named_children():
            x, example = _convert_chain(b, child, x, example, f"{path}.{name}" if path else name)
        return x, example
    if callable(getattr(m, "export", None)) and not hasattr(m, "group_size"):
        return _convert_chain(b, m.export().eval(), x, example, path)
    out = m(example)
    ctx = _Ctx(path or type(m).__name__.lower(), f"{path or '(model)'} ({type(m).__name__})",
               tuple(example.shape[1:]), tuple(out.shape[1:]))
    if hasattr(m, "group_size"):
        y = _groupsort(b, x, ctx, m.group_size)
    elif type(m) in MODULES:
        y = MODULES[type(m)](b, m, x, ctx)
    else:
        y = b.problem(type(m).__name__, ctx)
    return (x if y is None else y), out


def plain_copy(model: nn.Module) -> nn.Module:
    """The model with robeval's training layers replaced by their exports and GroupSorts by one op
    that torch.export keeps whole (a copy; the model itself when it has none)."""
    if not any(_is_plugin(m) for m in model.modules()):
        return model
    return _plain(copy.deepcopy(model))


def _plain(m: nn.Module) -> nn.Module:
    if hasattr(m, "group_size"):
        return _GroupSortOp(int(m.group_size))
    if callable(getattr(m, "export", None)):
        out = m.export()
        m = out if type(out) is not type(m) else m
    for name, child in list(m.named_children()):
        setattr(m, name, _plain(child))
    return m


@functools.cache
def _groupsort_op():
    @torch.library.custom_op("robeval::groupsort", mutates_args=())
    def groupsort(x: torch.Tensor, group_size: int) -> torch.Tensor:
        s = x.shape
        return x.reshape(s[0], s[1] // group_size, group_size, *s[2:]).sort(dim=2).values.reshape(s)

    groupsort.register_fake(lambda x, group_size: torch.empty_like(x))
    ATEN[torch.ops.robeval.groupsort.default] = lambda b, a, c: _groupsort(b, a[0], c, a[1])
    return torch.ops.robeval.groupsort.default


class _GroupSortOp(nn.Module):
    def __init__(self, group_size: int):
        super().__init__()
        self.group_size_ = group_size  # not `group_size`: this module is no plugin any more

    def forward(self, x):
        return _groupsort_op()(x, self.group_size_)

