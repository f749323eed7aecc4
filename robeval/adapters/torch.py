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
is reported at once with its path.

Layout: this module holds the adapter; file loading is in ``torch_files``, the node builder and shared
emitters in ``torch_build``, the ``MODULES`` table in ``torch_modules`` and the ``ATEN`` table in
``torch_aten``. Their public names are re-exported here."""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any

import numpy
import torch
from torch import nn

from ..errors import InvalidParameterError, ModelLoadError, UnsupportedOpError
from ..ir.graph import Network
from .classifier import binary_scores, class_count, with_binary_head
from .gradients import LOSSES
from .layout import check_batch
from .torch_aten import ATEN as ATEN
from .torch_aten import aten as aten
from .torch_aten import convert_program as convert_program
from .torch_build import _Builder
from .torch_files import import_class as import_class
from .torch_files import load_torch_file as load_torch_file
from .torch_modules import MODULES as MODULES
from .torch_modules import _convert_chain, _is_chain, _prescan
from .torch_modules import plain_copy as plain_copy

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
        self.binary = False
        probe = self.predict(numpy.random.default_rng(0).random((2,) + self.input_shape))
        self.num_classes = class_count(probe.shape[1:], self.source)
        if self.num_classes == 1:  # a binary classifier's single logit z: presented as the scores [0, z]
            if self.kind == "module" and isinstance(list(self.model.modules())[-1], nn.Sigmoid):
                raise ModelLoadError(f"{self.source} has one output that ends in a Sigmoid; robeval needs the "
                                     "logit of a binary classifier: drop the final nn.Sigmoid (class 1 when the "
                                     "logit > 0)")
            self.binary, self.num_classes = True, 2
            probe = binary_scores(probe)
        self.outputs_probabilities = not self.binary and bool((probe >= 0).all()
                                                              and numpy.allclose(probe.sum(axis=1), 1, atol=1e-4))

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
        if self.binary:
            out = out.reshape(len(out), 1)
            return torch.cat([torch.zeros_like(out), out], dim=1)
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
            net = b.network(out, self.input_shape, {"framework": FRAMEWORK, "source": self.source})
            self._network = with_binary_head(net, self.source) if self.binary else net
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

def _raise_if(problems):
    if problems:
        raise UnsupportedOpError(problems, FRAMEWORK)

