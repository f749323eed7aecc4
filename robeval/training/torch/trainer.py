"""A small training loop: batches, a progress bar, evaluation each epoch, checkpoints and an
ONNX export of the plain (exported) network at the end. Users with their own loop need none of
it: every loss and regulariser in this package is a plain callable.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InvalidParameterError
from .. import _common
from .layers import export_model


@dataclass
class EpochResult:
    """What one epoch did: mean training loss, validation metrics, wall time in seconds."""

    epoch: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "loss": self.loss, **self.metrics, "seconds": self.seconds}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy; a single output is read as a binary score (> 0 means class +1 / 1)."""
    model.eval()
    hits = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            out, yy = model(x[i:i + batch_size]), y[i:i + batch_size]
            if out.dim() == 1 or out.shape[1] == 1:
                hits += int(((out.reshape(-1) > 0) == (yy.reshape(-1) > 0)).sum())
            else:
                hits += int((out.argmax(1) == yy).sum())
    return hits / max(x.shape[0], 1)


def _as_loss(loss: Any) -> Callable[[nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor]:
    """Normalise the three accepted loss forms to f(model, x, y, t)."""
    if loss is None:
        return lambda m, x, y, t: F.cross_entropy(m(x), y)
    if hasattr(loss, "model") and callable(loss):  # a regulariser that owns the model
        return lambda m, x, y, t: loss(x, y)
    target = loss.forward if isinstance(loss, nn.Module) else loss
    try:
        n_args = len(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        n_args = 2
    if n_args >= 4:
        return loss
    return lambda m, x, y, t: loss(m(x), y)


def _batches(data: Any, batch_size: int, shuffle: bool, generator: torch.Generator) -> Iterable:
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, torch.Tensor) for d in data):
        x, y = data
        order = torch.randperm(x.shape[0], generator=generator) if shuffle else torch.arange(x.shape[0])
        return [(x[idx], y[idx]) for idx in order.split(batch_size)]
    return data


def _length(batches: Any) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None


class Trainer:
    """Train ``model`` for ``epochs`` epochs with ``loss`` and evaluate after each epoch.

    Args:
        model: the network.
        optimizer: a torch optimiser; Adam(lr) over the model's parameters if None.
        loss: one of: a criterion ``f(logits, y)`` (e.g. ``HKRLoss()``); a regulariser owning the
            model, called as ``f(x, y)`` (``AdversarialRegularizer``, ``JacobianRegularizer``);
            or ``f(model, x, y, t)`` with t the fractional epoch (``IBPLoss``). Default: cross-entropy.
        epochs, batch_size, lr: the usual; batch_size is used when data are (x, y) tensors.
        metrics: name -> f(model, x_val, y_val) -> float, computed each epoch (accuracy is added).
        checkpoint: path for ``torch.save(model.state_dict())`` after every epoch.
        onnx_path: where to write the exported network as ONNX after the last epoch.
        progress: show a tqdm progress bar.
        seed: seed for the shuffling generator.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, loss: Any = None,
                 epochs: int = 1, batch_size: int = 128, lr: float = 1e-3,
                 scheduler: Any = None, metrics: dict[str, Callable] | None = None,
                 checkpoint: str | Path | None = None, onnx_path: str | Path | None = None,
                 progress: bool = True, seed: int = 0):
        self.model = model
        self.epochs = _common.check_int("epochs", epochs, 1)
        self.batch_size = _common.check_int("batch_size", batch_size, 1)
        lr = _common.check_positive("lr", lr)
        self.optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
        self.scheduler = scheduler
        self.loss = _as_loss(loss)
        self.metrics = dict(metrics or {})
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.onnx_path = Path(onnx_path) if onnx_path else None
        self.progress = progress
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[EpochResult] = []

    def train_epoch(self, data: Any, epoch: int) -> float:
        """One pass over ``data``; returns the mean loss."""
        batches = _batches(data, self.batch_size, True, self.generator)
        n = _length(batches)
        bar = batches
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(batches, total=n, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False, mininterval=5.0)
        self.model.train()
        total, count = 0.0, 0
        for i, (x, y) in enumerate(bar):
            t = epoch + (i / n if n else 0.0)
            loss = self.loss(self.model, x, y, t)
            if not torch.isfinite(loss):
                raise InvalidParameterError(
                    f"loss became {float(loss)} at epoch {epoch + 1}, batch {i}; lower the learning rate "
                    "or the perturbation radius"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total, count = total + float(loss.detach()), count + 1
            if self.progress and i % 50 == 0:
                bar.set_postfix(loss=f"{total / count:.4f}")
        if self.scheduler is not None:
            self.scheduler.step()
        return total / max(count, 1)

    def evaluate(self, data: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        """Accuracy and the user's metrics on (x, y) tensors."""
        x, y = data
        out = {"accuracy": accuracy(self.model, x, y)}
        for name, fn in self.metrics.items():
            self.model.eval()
            out[name] = float(fn(self.model, x, y))
        return out

    def fit(self, train: Any, val: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[EpochResult]:
        """Train on ``train`` ((x, y) tensors or an iterable of batches); returns the history."""
        for epoch in range(self.epochs):
            start = time.perf_counter()
            loss = self.train_epoch(train, epoch)
            metrics = self.evaluate(val) if val is not None else {}
            result = EpochResult(epoch + 1, loss, metrics, time.perf_counter() - start)
            self.history.append(result)
            if self.progress:
                from tqdm.auto import tqdm

                shown = " ".join(f"{k}={v:.4f}" for k, v in result.to_dict().items() if k != "epoch")
                tqdm.write(f"epoch {epoch + 1}/{self.epochs}: {shown}")
            if self.checkpoint is not None:
                self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
                torch.save(self.model.state_dict(), self.checkpoint)
        if self.onnx_path is not None:
            if val is not None:
                sample = val[0][:1]
            else:
                sample = next(iter(_batches(train, 1, False, self.generator)))[0][:1]
            export_onnx(self.model, self.onnx_path, sample)
        return self.history


def plain_model(model: nn.Module) -> nn.Module:
    """The model with robeval training layers replaced by plain ones (itself if it has none)."""
    has_plugin = any(hasattr(m, "export") for m in model.modules())
    return export_model(model) if has_plugin else model


def export_onnx(model: nn.Module, path: str | Path, sample: torch.Tensor, opset: int = 17) -> Path:
    """Write the plain version of ``model`` to ONNX with a dynamic batch axis; returns the path.

    Uses the TorchScript exporter (``dynamo=False``), which still works in torch 2.x and
    needs no onnxscript; the torch.export-based exporter is tried if it fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = plain_model(model).eval()
    kwargs = dict(input_names=["input"], output_names=["logits"],
                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(net, (sample,), str(path), dynamo=False, opset_version=opset, **kwargs)
        except Exception as legacy_error:  # noqa: BLE001 - retry with the other exporter
            try:
                torch.onnx.export(net, (sample,), str(path), dynamo=True,
                                  opset_version=max(opset, 18), **kwargs)
            except Exception as e:
                name = type(net).__name__
                raise InvalidParameterError(f"ONNX export of {name} failed: {e}") from legacy_error
    return path


__all__ = ["Trainer", "EpochResult", "accuracy", "export_onnx", "plain_model"]
