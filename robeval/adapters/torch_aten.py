"""The ATen-op conversion table (``ATEN``) and the walk over a torch.export program's graph."""

from __future__ import annotations

import operator
from typing import Any

import torch

from .torch_build import (
    _POISON,
    _T,
    _UNCONVERTED,
    _adaptive,
    _affine,
    _avgpool,
    _batchnorm,
    _Builder,
    _clip,
    _conv,
    _Ctx,
    _dense,
    _maxpool,
    _prelu,
    _reshape,
    _softmax,
)


def _arith(kind):
    """add / sub / rsub / mul / div of two network values or of one and a constant."""

    def convert(b, a, c):
        x, y = a[0], a[1]
        alpha = a[2] if len(a) > 2 and kind in ("add", "sub", "rsub") else 1
        if kind == "rsub":
            kind_, x, y = "sub", y, x
        else:
            kind_ = kind
        if isinstance(x, _T) and isinstance(y, _T):
            if kind_ in ("add", "sub") and alpha == 1:
                return b.add(kind_, [x, y], c)
            return b.problem(f"{kind} of two computed tensors", c)
        if not isinstance(x, _T):  # constant first
            if kind_ == "add":
                x, y = y, x
            elif kind_ == "mul":
                x, y = y, x
            elif kind_ == "sub":
                return _affine(b, y, c, scale=-alpha, shift=x)
            else:
                return b.problem(f"{kind} by a computed tensor", c)
        y = torch.as_tensor(y, dtype=torch.float64)
        if kind_ == "add":
            return _affine(b, x, c, shift=y * alpha)
        if kind_ == "sub":
            return _affine(b, x, c, shift=-y * alpha)
        return _affine(b, x, c, scale=y if kind_ == "mul" else 1.0 / y)

    return convert


def _a_view(b, a, c):
    return _reshape(b, a[0], c)


def _a_mean(b, a, c):
    dims = sorted(int(d) % (len(c.in_shape) + 1) for d in a[1])
    if len(c.in_shape) != 3 or dims != [2, 3]:
        return b.problem(f"mean over axes {a[1]}", c)
    y = b.add("global_avgpool", [a[0]], c)
    return y if a[2] else b.add("flatten", [y], _Ctx(c.name + "_flat", c.where, (), ()))


def _a_permute(b, a, c):
    perm = [int(p) % (len(c.in_shape) + 1) for p in a[1]]
    return b.add("transpose", [a[0]], c, attrs={"perm": tuple(perm)}) if perm[0] == 0 else \
        b.problem("permute that moves the batch axis", c)


def _a_transpose(b, a, c):
    perm = list(range(len(c.in_shape) + 1))
    i, j = (int(d) % len(perm) for d in a[1:3])
    perm[i], perm[j] = perm[j], perm[i]
    return _a_permute(b, [a[0], perm], c)


def _a_tuple(fn, n):
    def convert(b, a, c):
        y = fn(b, a, c)
        return (y,) + (_POISON,) * (n - 1) if y is not None else None

    return convert


def _a_dropout(b, a, c):
    return a[0] if not a[2] else b.problem("dropout in training mode", c)


def _a_batchnorm(b, a, c):
    if a[5]:
        return b.problem("batch norm in training mode (batch statistics)", c)
    return _batchnorm(b, a[0], c, a[1], a[2], a[3], a[4], a[7])


def _a_pair(op):
    return lambda b, a, c: b.add(op, [a[0], a[1]], c) if all(isinstance(v, _T) for v in a[:2]) else \
        b.problem(f"{op} with a constant", c)


aten = torch.ops.aten
#: ATen op overload -> converter(builder, bound arguments, context) -> output (None: reported).
ATEN: dict[Any, Any] = {
    aten.linear.default: lambda b, a, c: _dense(b, a[0], c, a[1], a[2]),
    aten.addmm.default: lambda b, a, c: _dense(b, a[1], c, a[2].t(), a[0]) if a[3] == a[4] == 1 else
    b.problem("addmm with beta/alpha != 1", c),
    aten.mm.default: lambda b, a, c: _dense(b, a[0], c, a[1].t(), None),
    aten.conv2d.default: lambda b, a, c: _conv(b, a[0], c, *a[1:7]),
    aten.conv2d.padding: lambda b, a, c: _conv(b, a[0], c, *a[1:7]),
    aten.convolution.default: lambda b, a, c: _conv(b, a[0], c, *a[1:6], a[8]) if not a[6] else
    b.problem("transposed convolution", c),
    aten.batch_norm.default: _a_batchnorm,
    aten._native_batch_norm_legit_no_training.default: _a_tuple(
        lambda b, a, c: _batchnorm(b, a[0], c, a[1], a[2], a[3], a[4], a[6]), 3),
    aten.relu.default: lambda b, a, c: b.add("relu", [a[0]], c),
    aten.relu_.default: lambda b, a, c: b.add("relu", [a[0]], c),
    aten.leaky_relu.default: lambda b, a, c: b.add("leaky_relu", [a[0]], c, attrs={"alpha": float(a[1])}),
    aten.prelu.default: lambda b, a, c: _prelu(b, a[0], c, a[1]),
    aten._prelu_kernel.default: lambda b, a, c: _prelu(b, a[0], c, a[1]),
    aten.sigmoid.default: lambda b, a, c: b.add("sigmoid", [a[0]], c),
    aten.tanh.default: lambda b, a, c: b.add("tanh", [a[0]], c),
    aten.hardtanh.default: lambda b, a, c: _clip(b, a[0], c, a[1], a[2]),
    aten.clamp.default: lambda b, a, c: _clip(b, a[0], c, a[1], a[2]),
    aten.softmax.int: lambda b, a, c: _softmax(b, a[0], c, a[1]),
    aten._softmax.default: lambda b, a, c: _softmax(b, a[0], c, a[1]),
    aten.log_softmax.int: lambda b, a, c: _softmax(b, a[0], c, a[1], "log_softmax"),
    aten._log_softmax.default: lambda b, a, c: _softmax(b, a[0], c, a[1], "log_softmax"),
    aten.max_pool2d.default: lambda b, a, c: _maxpool(b, a[0], c, *a[1:6]),
    aten.max_pool2d_with_indices.default: _a_tuple(lambda b, a, c: _maxpool(b, a[0], c, *a[1:6]), 2),
    aten.avg_pool2d.default: lambda b, a, c: _avgpool(b, a[0], c, *a[1:7]),
    aten.adaptive_avg_pool2d.default: lambda b, a, c: _adaptive(b, a[0], c, a[1], "avg"),
    aten._adaptive_avg_pool2d.default: lambda b, a, c: _adaptive(b, a[0], c, a[1], "avg"),
    aten.adaptive_max_pool2d.default: _a_tuple(lambda b, a, c: _adaptive(b, a[0], c, a[1], "max"), 2),
    aten.mean.dim: _a_mean,
    aten.permute.default: _a_permute,
    aten.transpose.int: _a_transpose,
    aten.cat.default: lambda b, a, c: b.add("concat", list(a[0]), c, attrs={"axis": int(a[1]) % (len(c.in_shape) + 1)})
    if all(isinstance(v, _T) for v in a[0]) else b.problem("concatenation with a constant", c),
    aten.maximum.default: _a_pair("max"),
    aten.minimum.default: _a_pair("min"),
    aten.dropout.default: _a_dropout,
    aten.feature_dropout.default: _a_dropout,
    aten.alpha_dropout.default: _a_dropout,
    aten.neg.default: lambda b, a, c: _affine(b, a[0], c, scale=-1.0),
    **{op: _arith(kind) for kind, ops in {
        "add": (aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor),
        "sub": (aten.sub.Tensor, aten.sub.Scalar, aten.sub_.Tensor),
        "rsub": (aten.rsub.Scalar, aten.rsub.Tensor),
        "mul": (aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor),
        "div": (aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor)}.items() for op in ops},
    **{op: _a_view for op in (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                              aten.flatten.using_ints, aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims,
                              aten.unsqueeze.default)},
    **{op: lambda b, a, c: a[0] for op in (aten.clone.default, aten.contiguous.default, aten.alias.default,
                                           aten.detach.default, aten.lift_fresh_copy.default)},
}


def _bind(target, args, kwargs) -> list:
    """Positional arguments with defaults filled in from the op's schema."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return list(args)
    out = list(args)
    for arg in schema.arguments[len(args):]:
        out.append(kwargs.get(arg.name, arg.default_value if arg.has_default_value() else None))
    return out


def _ctx(node, env) -> _Ctx:
    stack = node.meta.get("nn_module_stack") or {}
    path, cls = list(stack.values())[-1] if stack else ("", "")
    cls = str(cls).rpartition(".")[2]
    tensors = [a.meta.get("val") for a in node.all_input_nodes if isinstance(env.get(a), _T)]
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    val = node.meta.get("val")
    return _Ctx(node.name, f"{path} ({cls})" if path else node.name,
                tuple(int(d) for d in first.shape[1:]) if first is not None else (),
                tuple(int(d) for d in val.shape[1:]) if isinstance(val, torch.Tensor) else ())


def convert_program(b: _Builder, program) -> Any:
    """Convert an ExportedProgram's ATen graph into ``b``; returns the output value."""
    sig = program.graph_signature
    consts = {**program.state_dict, **getattr(program, "constants", {})}
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    env: dict[Any, Any] = {}
    for node in program.graph.nodes:
        if node.op == "placeholder":
            env[node] = _T("input") if node.name in sig.user_inputs else consts[lifted[node.name]]
            continue
        if node.op == "output":
            outs = node.args[0]
            out = outs[0] if isinstance(outs, (tuple, list)) else outs
            value = env[out]
            if value is not _POISON and not isinstance(value, _T) and not b.problems:
                b.problem("an output that does not depend on the input", _ctx(node, env))
            return value
        val = node.meta.get("val")
        if node.op != "call_function" or not isinstance(val, (torch.Tensor, tuple, list)):
            env[node] = val  # symbolic sizes and assertions: no network value
            continue
        args = torch.fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
        flat = list(torch.utils._pytree.tree_leaves((args, kwargs)))
        if any(v is _POISON or (isinstance(v, str) and v == _UNCONVERTED) for v in flat):
            env[node] = _stand_in(val)
        elif node.target is operator.getitem:
            env[node] = args[0][args[1]]
        elif not any(isinstance(v, _T) for v in flat):  # only constants: compute it now
            with torch.no_grad():
                env[node] = node.target(*args, **kwargs)
        elif node.target in ATEN:
            out = ATEN[node.target](b, _bind(node.target, args, kwargs), _ctx(node, env))
            env[node] = _stand_in(val) if out is None else out
        else:
            b.problem(str(node.target).replace(".default", ""), _ctx(node, env))
            env[node] = _stand_in(val)
    return _POISON


def _stand_in(val):
    """The value of something that could not be converted (already reported): the walk goes on
    with it so that every problem is found in one pass."""
    return _T(_UNCONVERTED) if isinstance(val, torch.Tensor) else _POISON
