"""PyTorch models behind the robeval adapter interface (see ``base.ModelAdapter``).

Accepted: an ``nn.Module`` object, a TorchScript file (``torch.jit.load``), a ``torch.export``
program (.pt2, ``torch.export.load``) and a state_dict file with ``model_class="package.module:Class"``
(``torch.load(weights_only=True)``). A fully pickled module is refused unless ``trust_pickle=True``:
unpickling can run arbitrary code.

Running: ``predict`` and ``input_gradient`` use the model itself (torch.autograd for gradients) with
every submodule in eval mode *for the duration of the call only*: each module's own training flag
is written back afterwards, so the user's module is left as it was given.

Conversion (``to_network``), in order of preference:

1. A Sequential-like tree (``nn.Sequential`` of supported layers, nested Sequentials, robeval's
   Lipschitz layers) is walked directly with the ``MODULES`` table keyed by layer class.
2. Anything else (a custom ``forward``: residual blocks, input normalisation, functional calls) is
   captured with ``torch.export`` and converted with the ``ATEN`` table keyed by ATen op. The same
   table converts .pt2 programs and TorchScript (turned into a program by torch's TS2EP converter).
   ``torch.export`` refuses data-dependent control flow rather than specialising it, which is
   what a verifier needs; an ONNX export would trace one path silently.

Unsupported layers are found by a scan of the module tree before anything is traced, so every one
is reported at once with its path."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import io
import json
import math
import operator
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
import torch
from torch import nn

from ..errors import InputShapeError, InvalidParameterError, ModelLoadError, UnsupportedOpError
from ..ir.graph import Network, Node
from .gradients import LOSSES
from .layout import check_batch

FRAMEWORK = "PyTorch"
#: Samples per forward/backward call of the native model.
BATCH_SIZE = 1024


# ---------------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Every submodule in eval mode inside the block; each gets its own training flag back after."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag  # set directly: calling train() may have side effects (caches)


def torch_loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample cross-entropy, or the margin max_{j != y} z_j - z_y (as in ``gradients.py``)."""
    if loss == "ce":
        return nn.functional.cross_entropy(logits, y, reduction="none")
    if loss == "margin":
        others = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), -math.inf)
        return others.max(dim=1).values - logits.gather(1, y[:, None])[:, 0]
    raise InvalidParameterError(f"loss={loss!r} is not known; expected one of {LOSSES}")


class TorchModel:
    """A PyTorch model: ``nn.Module``, ``torch.jit.ScriptModule`` or ``torch.export.ExportedProgram``.

    Args:
        model: the model (not modified: eval mode is set per call and undone).
        input_shape: per-sample NCHW shape, e.g. (1, 28, 28); read from a program when omitted.
        batch_size: samples per native call.

    >>> # adapter = TorchModel(net, input_shape=(1, 28, 28))
    >>> # adapter.predict(x).shape == (len(x), 10); adapter.to_network()
    """

    framework = FRAMEWORK
    channels_last = False

    def __init__(self, model: Any, input_shape: tuple[int, ...] | None = None, batch_size: int = BATCH_SIZE,
                 source: str | None = None):
        if isinstance(model, torch.export.ExportedProgram):
            self.kind, self.program, self.model = "exported", model, model.module()
            shape, self._static_batch = _program_input(model)
            input_shape = input_shape or shape
        elif isinstance(model, torch.jit.ScriptModule):
            self.kind, self.program, self.model, self._static_batch = "torchscript", None, model, None
        elif isinstance(model, nn.Module):
            self.kind, self.program, self.model, self._static_batch = "module", None, model, None
            input_shape = input_shape or _guess_input_shape(model)
        else:
            raise ModelLoadError(f"TorchModel needs an nn.Module, a ScriptModule or an ExportedProgram, "
                                 f"not {type(model).__module__}.{type(model).__name__}")
        if input_shape is None:
            raise InvalidParameterError(
                f"input_shape is needed for this {type(model).__name__}: PyTorch layers do not record the "
                "input size; pass input_shape=(C, H, W) per sample, e.g. input_shape=(1, 28, 28)")
        self.input_shape = tuple(int(d) for d in input_shape)
        self.batch_size = int(batch_size)
        self.source = source or type(model).__name__
        self.dtype = _model_dtype(self.model)
        self._network: Network | None = None
        probe = self.predict(numpy.random.default_rng(0).random((2,) + self.input_shape))
        if probe.ndim != 2:
            raise InputShapeError(f"the model returns shape {probe.shape[1:]} per sample; a classifier "
                                  "must return one vector of logits per sample")
        self.num_classes = int(probe.shape[1])
        self.outputs_probabilities = bool((probe >= 0).all() and numpy.allclose(probe.sum(axis=1), 1, atol=1e-4))

    @classmethod
    def from_file(cls, path: str | Path, fmt: str | None = None, input_shape: tuple[int, ...] | None = None,
                  model_class: str | None = None, model_kwargs: dict | None = None, trust_pickle: bool = False,
                  **options) -> TorchModel:
        """Load a .pt/.pth (state_dict + ``model_class``, or a trusted pickle), TorchScript or .pt2 file."""
        from .base import sniff_format

        path = Path(path)
        fmt = fmt or sniff_format(path)
        model = load_torch_file(path, fmt, model_class, model_kwargs, trust_pickle)
        return cls(model, input_shape=input_shape, source=f"{fmt}:{path.name}", **options)

    # -- native runtime
    def _call(self, xt: torch.Tensor) -> torch.Tensor:
        if self._static_batch and len(xt) != self._static_batch:  # program exported for one batch size
            parts = []
            for start in range(0, len(xt), self._static_batch):
                chunk = xt[start:start + self._static_batch]
                pad = self._static_batch - len(chunk)
                chunk = torch.cat([chunk, chunk[:1].expand(pad, *chunk.shape[1:])]) if pad else chunk
                parts.append(self._call_once(chunk)[:len(chunk) - pad])
            return torch.cat(parts)
        return self._call_once(xt)

    def _call_once(self, xt):
        out = self.model(xt)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(out, torch.Tensor):
            raise ModelLoadError(f"the model returned a {type(out).__name__}; expected a tensor of logits")
        return out

    def _mode(self):
        return eval_mode(self.model) if self.kind != "exported" else contextlib.nullcontext()

    def _tensor(self, x) -> torch.Tensor:
        return torch.as_tensor(check_batch(x, self.input_shape), dtype=self.dtype, device=_device(self.model))

    def _out(self, t: torch.Tensor) -> numpy.ndarray:
        out = t.detach().cpu().numpy()
        return out if out.dtype == numpy.float64 else out.astype(numpy.float32)

    def predict(self, x) -> numpy.ndarray:
        """The model's output for NCHW inputs (N, *input_shape): logits, or probabilities when
        ``outputs_probabilities``; float32 (float64 for a float64 model)."""
        xt = self._tensor(x)
        with self._mode(), torch.no_grad():
            outs = [self._call(xt[i:i + self.batch_size]) for i in range(0, len(xt), self.batch_size)]
        return self._out(torch.cat(outs)) if outs else numpy.zeros((0, self.num_classes), numpy.float32)

    def input_gradient(self, x, y, loss: str = "ce") -> numpy.ndarray:
        """dL/dx by torch.autograd, each row the gradient of that sample's own loss on the logits
        (log-probabilities for a softmax output, which give the same gradient)."""
        return self.logits_and_gradient(x, y, loss)[1]

    def logits_and_gradient(self, x, y, loss: str = "ce") -> tuple[numpy.ndarray, numpy.ndarray]:
        """(logits, dL/dx) from one forward and one backward pass (what attacks need per step);
        the logits are log-probabilities for a softmax output."""
        if loss not in LOSSES:
            raise InvalidParameterError(f"loss={loss!r} is not known; expected one of {LOSSES}")
        xt = self._tensor(x)
        yt = torch.as_tensor(numpy.asarray(y), dtype=torch.int64, device=xt.device)
        logits_all, grads = [], []
        with self._mode():
            for i in range(0, len(xt), self.batch_size):
                xb = xt[i:i + self.batch_size].clone().requires_grad_(True)
                out = self._call(xb)
                logits = out.clamp_min(torch.finfo(out.dtype).tiny).log() if self.outputs_probabilities else out
                (g,) = torch.autograd.grad(torch_loss(logits, yt[i:i + self.batch_size], loss).sum(), xb)
                logits_all.append(logits.detach())
                grads.append(g)
        if not grads:
            return (numpy.zeros((0, self.num_classes), numpy.float32),
                    numpy.zeros((0,) + self.input_shape, numpy.float32))
        return self._out(torch.cat(logits_all)), self._out(torch.cat(grads))

    # -- conversion
    def to_network(self) -> Network:
        """The robeval Network computing what the model computes (cached)."""
        if self._network is None:
            b = _Builder(self.dtype)
            if self.kind == "module":
                _raise_if(_prescan(self.model))
                if _is_chain(self.model):
                    with eval_mode(self.model), torch.no_grad():
                        out, _ = _convert_chain(b, self.model, "input", self._example(), "")
                else:
                    out = convert_program(b, self._export())
            elif self.kind == "torchscript":
                out = convert_program(b, self._script_program())
            else:
                out = convert_program(b, self.program)
            _raise_if(b.problems)
            self._network = b.network(out, self.input_shape, {"framework": FRAMEWORK, "source": self.source})
        return self._network

    def _example(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.rand((2,) + self.input_shape, generator=g).to(self.dtype).to(_device(self.model))

    def _export(self) -> torch.export.ExportedProgram:
        plain = plain_copy(self.model)
        try:
            with eval_mode(plain), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.export.export(plain, (self._example(),), strict=False)
        except Exception as exc:
            raise ModelLoadError(
                f"cannot capture the graph of {type(self.model).__name__} with torch.export: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Fix: keep forward() free of "
                "data-dependent control flow, or write the model as an nn.Sequential, or export it to ONNX "
                "yourself and load the .onnx file") from exc

    def _script_program(self) -> torch.export.ExportedProgram:
        try:
            from torch._export.converter import TS2EPConverter

            with eval_mode(self.model), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return TS2EPConverter(self.model, (self._example(),)).convert()
        except Exception as exc:
            raise ModelLoadError(
                f"cannot convert this TorchScript model ({type(exc).__name__}: {str(exc)[:200]}); fix: save the "
                "original module with torch.export.save (.pt2), or as a state_dict with its class") from exc


def _device(model) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _model_dtype(model) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _guess_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """(in_features,) when the first layer of a Sequential is a Linear; None otherwise."""
    first = model
    while isinstance(first, nn.Sequential) and len(first):
        first = first[0]
    return (first.in_features,) if isinstance(first, nn.Linear) else None


def _program_input(program) -> tuple[tuple[int, ...] | None, int | None]:
    """The per-sample input shape and the static batch size (None if dynamic) of a program."""
    names = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in names and isinstance(node.meta.get("val"), torch.Tensor):
            shape = node.meta["val"].shape
            batch = shape[0] if isinstance(shape[0], int) else None
            return tuple(int(d) for d in shape[1:]), batch
    return None, None


# ---------------------------------------------------------------------------------------------- files
def load_torch_file(path: Path, fmt: str, model_class: str | None = None, model_kwargs: dict | None = None,
                    trust_pickle: bool = False) -> Any:
    """The model object in a PyTorch file; pickled Python objects only with ``trust_pickle``."""
    if fmt == "torchscript":
        return torch.jit.load(str(path), map_location="cpu")
    if fmt == "pt2":
        unsafe = _unsafe_pt2_members(path)
        if unsafe and not trust_pickle:
            raise ModelLoadError(f"{path} holds pickled objects ({', '.join(unsafe[:3])}) that torch.export.load "
                                 "unpickles without restriction, which can run arbitrary code; robeval refuses "
                                 "them. Fix: re-export without custom objects, or pass trust_pickle=True "
                                 "(CLI --trust-pickle) if you trust the file")
        with open(path, "rb") as fh:  # a file object: torch wants the .pt2 suffix on paths only
            return torch.export.load(fh)
    if fmt != "torch":
        raise ModelLoadError(f"{path}: format {fmt!r} is not a PyTorch format (torch, torchscript, pt2)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            reason = next((line for line in str(exc).splitlines() if "GLOBAL" in line), "").strip()
            raise ModelLoadError(
                f"{path} holds pickled Python objects, not only tensors (a whole pickled module?); unpickling "
                f"runs code named by the file, so robeval refuses it by default ({reason or 'not weights-only'}). "
                "Fix: save model.state_dict() and load it with model_class='package.module:Class', or save with "
                "torch.export.save / torch.jit.save; if you trust this file, opt in with trust_pickle=True "
                "(CLI --trust-pickle)") from None
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        state = obj.get("state_dict", obj.get("model_state_dict", obj))
        if model_class is None:
            raise ModelLoadError(f"{path} holds a state_dict (weights only, {len(state)} tensors); give the model "
                                 "class that they belong to: model_class='package.module:Class' (CLI --model-class)")
        model = import_class(model_class)(**(model_kwargs or {}))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"the state_dict in {path} does not fit {model_class}: {exc}") from exc
        return model
    raise ModelLoadError(f"{path} holds a {type(obj).__name__}; expected a state_dict or a module")


def import_class(spec: str) -> type:
    """The nn.Module subclass named by 'package.module:Class' (the module is imported: trusted code)."""
    mod_name, sep, attr = spec.partition(":")
    if not sep:
        mod_name, _, attr = spec.rpartition(".")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ModelLoadError(f"model_class={spec!r} cannot be imported ({exc}); expected 'package.module:Class' "
                             "importable from the current environment") from exc
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ModelLoadError(f"model_class={spec!r} is a {type(obj).__name__}, not an nn.Module subclass")
    return obj


def _unsafe_pt2_members(path: Path) -> list[str]:
    """Members of a .pt2 archive that torch.export.load would unpickle without weights_only."""
    unsafe = []
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        for name in names:
            folder = name.rpartition("/")[0]
            if name.endswith("_config.json") and "/data/" in name:
                for entry in json.loads(z.read(name)).get("config", {}).values():
                    member = f"{folder}/{entry.get('path_name', '')}"
                    if "custom_obj" in member or "opaque_obj" in member:
                        unsafe.append(member)
                    elif entry.get("use_pickle") and not _weights_only(z.read(member)):
                        unsafe.append(member)
            elif "/sample_inputs/" in name and not _weights_only(z.read(name)):
                unsafe.append(name)
    return sorted(unsafe)


def _weights_only(data: bytes) -> bool:
    try:
        torch.load(io.BytesIO(data), weights_only=True)
        return True
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------- building
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


def _raise_if(problems):
    if problems:
        raise UnsupportedOpError(problems, FRAMEWORK)


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
    scale = 1.0 / torch.sqrt(var.double() + eps)
    scale = scale * gamma.double() if gamma is not None else scale
    shift = -mean.double() * scale + (beta.double() if beta is not None else 0.0)
    shape = (-1,) + (1,) * (len(ctx.in_shape) - 1)
    return b.add("batchnorm", [x], ctx, {"scale": scale.reshape(shape), "shift": shift.reshape(shape)})


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


# ---------------------------------------------------------------------------------------------- modules
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


# ---------------------------------------------------------------------------------------------- ATen graphs
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
