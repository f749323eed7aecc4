"""Shared machinery of the certifiers: parameter checks, the input box, batching, verdicts, timing.

A certifier subclass supplies one method that bounds a batch; the final ``certify`` template keeps
every check to itself, so no subclass can skip the validation or the verdict rule. With a
``sharding`` (robeval.executors) the template validates once, then runs itself on every shard of
samples on the sharding's executor and merges the shards in sample order."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy

from ..backend import asnumpy, to_device, xp_for_device
from ..errors import DataRangeError, InvalidParameterError, UnsupportedOpError
from ..ir.graph import Network
from ..report.results import FALSIFIED, UNKNOWN, VERIFIED, CertificationResult
from ..util import progress_bar

NORMS = ("linf", "l2")
#: Memory the automatic batch size aims for, in MiB (override with $ROBEVAL_MEMORY_MB).
DEFAULT_MEMORY_MB = 1024


def check_eps(eps: float | Sequence[float]) -> tuple[float, ...]:
    values = (eps,) if isinstance(eps, (int, float)) else tuple(eps)
    if not values:
        raise InvalidParameterError("no eps given; pass one or more radii, e.g. eps=0.1 or --eps 0.01,0.05")
    for e in values:
        if not isinstance(e, (int, float)) or not math.isfinite(e) or e < 0:
            raise InvalidParameterError(f"eps={e!r} is not allowed; every eps must be a finite number >= 0")
    return tuple(float(e) for e in values)


def check_norm(norm: str, allowed: Sequence[str]) -> str:
    key = str(norm).lower().replace("-", "").replace("_", "")
    key = {"inf": "linf", "linfinity": "linf", "2": "l2"}.get(key, key)
    if key not in allowed:
        raise InvalidParameterError(f"norm={norm!r} is not supported here; expected one of {tuple(allowed)}")
    return key


def check_domain(domain) -> tuple[float, float]:
    if domain is None:
        return (-math.inf, math.inf)
    lo, hi = (float(domain[0]), float(domain[1]))
    if not lo < hi:
        raise InvalidParameterError(f"domain={domain!r} must be (low, high) with low < high, e.g. (0, 1)")
    return lo, hi


def check_data(x, y, domain, num_classes: int | None = None) -> None:
    """Refuse NaN/inf, values outside the domain and labels outside [0, K)."""
    x_np = numpy.asarray(asnumpy(x))
    if not numpy.isfinite(x_np).all():
        raise DataRangeError(f"inputs contain {int((~numpy.isfinite(x_np)).sum())} NaN/inf value(s); clean the data")
    lo, hi = domain
    if x_np.size and (x_np.min() < lo or x_np.max() > hi):
        raise DataRangeError(
            f"inputs range over [{x_np.min():.4g}, {x_np.max():.4g}], outside the input domain [{lo}, {hi}]; "
            "scale the data (e.g. divide uint8 images by 255) or declare the domain (--domain / domain=)")
    y_np = numpy.asarray(asnumpy(y))
    if y_np.ndim != 1 or y_np.shape[0] != x_np.shape[0]:
        raise DataRangeError(f"labels have shape {y_np.shape}; expected ({x_np.shape[0]},), one per input")
    if num_classes is not None and y_np.size and (y_np.min() < 0 or y_np.max() >= num_classes):
        raise DataRangeError(f"labels range over [{y_np.min()}, {y_np.max()}]; the model has {num_classes} classes")


def input_box(xp, x, eps: float, domain) -> tuple[Any, Any]:
    """The L-inf box [x - eps, x + eps] intersected with the domain."""
    lo, hi = x - eps, x + eps
    if domain is not None:
        lo, hi = xp.clip(lo, domain[0], domain[1]), xp.clip(hi, domain[0], domain[1])
    return lo, hi


def auto_batch_size(bytes_per_sample: int, n: int, memory_mb: float | None = None) -> int:
    """Largest batch whose workspace fits the memory budget (at least 1, at most n)."""
    budget = float(memory_mb or os.environ.get("ROBEVAL_MEMORY_MB", DEFAULT_MEMORY_MB)) * 2**20
    return int(max(1, min(n, budget // max(bytes_per_sample, 1))))


def prepare_network(net: Network, rule: str | None) -> tuple[Network, list[str]]:
    """Strip a trailing softmax (margins are taken on logits) and check every op supports ``rule``."""
    stripped_net, stripped = net.strip_output_squashers()
    notes = [f"stripped {s} from the output: margins are computed on the logits" for s in stripped]
    if rule is not None:
        missing = stripped_net.unsupported(rule)
        if missing:  # every unsupported op at once, each with its node name
            raise UnsupportedOpError(missing, "robeval network (for this certifier)")
    return stripped_net, notes


class Certifier:
    """Template: validate, strip, batch, bound, decide. Subclasses implement ``margin_lower`` (IBP-like,
    (N, K) lower bounds of logit[y] - logit[j], +inf at y) or ``radii`` (Lipschitz-like, (N,))."""

    name = "certifier"
    rule: str | None = None
    norms: tuple[str, ...] = NORMS

    def __init__(self, norm: str = "linf", domain=(0.0, 1.0), device: str = "cpu", batch_size: int | None = None,
                 dtype: Any = numpy.float64, progress: bool = False, sharding: Any = None):
        self.norm = check_norm(norm, self.norms)
        self.domain = check_domain(domain)
        self.device = device
        self.xp = xp_for_device(device)
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise InvalidParameterError(f"batch_size={batch_size!r}; expected a positive integer or None (automatic)")
        self.batch_size = batch_size
        self.dtype = numpy.dtype(dtype)
        if self.dtype not in (numpy.float32, numpy.float64):
            raise InvalidParameterError(f"dtype={self.dtype}; expected float32 or float64")
        self.progress = progress
        #: a ``robeval.executors.base.Sharding``: certify shard by shard on its executor (None: in one pass)
        self.sharding = sharding

    def __getstate__(self):  # the array module is not picklable: workers look it up from the device
        state = dict(self.__dict__)
        state.pop("xp", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.xp = xp_for_device(self.device)

    @classmethod
    def unsupported_ops(cls, net: Network) -> list[tuple[str, str]]:
        """(op, node) pairs this certifier cannot handle in ``net`` (after stripping a softmax)."""
        stripped, _ = net.strip_output_squashers()
        return stripped.unsupported(cls.rule) if cls.rule else []

    # -- what subclasses provide
    def margin_lower(self, net, x, y, eps):
        raise InvalidParameterError(f"{self.name} does not bound margins directly")

    def radii(self, net, x, y):
        return None

    def bytes_per_sample(self, net: Network) -> int:
        from .ibp import workspace_floats

        return 8 * 4 * workspace_floats(net)

    def global_facts(self, net: Network) -> dict:
        return {}

    # -- the template
    def certify(self, network: Network, x, y, eps) -> CertificationResult:
        """Certify every sample of (x, y) at every radius in ``eps``; returns per-sample verdicts."""
        eps_values = check_eps(eps)
        net, notes = prepare_network(network, self.rule)
        net = net.to(self.device, dtype=self.dtype)
        net.check_input(x)
        k = int(net.shapes()[net.output_name][-1])
        check_data(x, y, self.domain, k)
        if self.norm == "l2" and self.name == "ibp":
            notes.append("IBP bounds the L2 ball by its enclosing L-inf box (sound, loose); prefer lipschitz or crown")
        if self.sharding is not None:  # the same template runs on every shard; merged in sample order
            from ..executors.jobs import certify_sharded

            return certify_sharded(self, network, x, y, eps_values, notes, self.sharding)
        n = int(x.shape[0])
        batch = self.batch_size or auto_batch_size(self.bytes_per_sample(net), n)
        xp = self.xp
        preds = numpy.empty(n, dtype=numpy.int64)
        values = numpy.empty((n, len(eps_values)), dtype=numpy.float64)
        seconds = numpy.zeros(len(eps_values) + 1)
        starts = range(0, n, batch)
        for start in progress_bar(starts, total=len(starts), desc=f"{self.name}", enabled=self.progress):
            xb = to_device(numpy.asarray(asnumpy(x[start:start + batch])), xp).astype(self.dtype)
            yb = to_device(numpy.asarray(asnumpy(y[start:start + batch]), dtype=numpy.int64), xp)
            t0 = time.perf_counter()
            logits = net.forward(xb)
            preds[start:start + batch] = asnumpy(logits.argmax(axis=1))
            radius = self.radii(net, xb, yb)
            seconds[0] += time.perf_counter() - t0
            for i, e in enumerate(eps_values):
                t0 = time.perf_counter()
                if radius is not None:
                    values[start:start + batch, i] = asnumpy(radius) - e
                else:
                    values[start:start + batch, i] = asnumpy(self.margin_lower(net, xb, yb, e).min(axis=1))
                seconds[i + 1] += time.perf_counter() - t0
        labels = numpy.asarray(asnumpy(y), dtype=numpy.int64)
        correct = preds == labels
        verdicts = numpy.where(~correct[:, None], FALSIFIED, numpy.where(values > 0, VERIFIED, UNKNOWN))
        facts = self.global_facts(net)
        per_eps_seconds = tuple(seconds[1:] + seconds[0] / len(eps_values))  # forward time shared out
        return CertificationResult(
            method=self.name, norm=self.norm, eps=eps_values, domain=self.domain, labels=labels,
            predictions=preds, verdicts=verdicts, bound=values, seconds=per_eps_seconds,
            notes=tuple(notes), bound_kind="radius_minus_eps" if self.name == "lipschitz" else "margin_lower",
            lipschitz_bound=facts.get("lipschitz_bound"), device=self.device, dtype=str(self.dtype))
