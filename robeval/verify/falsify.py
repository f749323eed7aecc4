"""Falsification: search a case's input box for a point whose output satisfies one of its disjuncts,
and accept a point only after replaying it on the original model.

The search is APGD (Croce & Hein 2020) on the specification's own objective: for the disjunct d of a
sample, minimise ``max_rows (A_d y - b_d)`` (the point violates d when that is <= 0, < 0 on strict
rows) with sign-gradient steps scaled by the box width, momentum, and the step-size halving of
``certifiers.apgd.checkpoints``. Every restart and every disjunct run together in one batch.

A candidate becomes a ``Counterexample`` only through ``Replayer.check``: the point must lie in the
specification's real box exactly, be representable in the dtype the model file computes in, and
satisfy the disjunct, checked in exact rational arithmetic, both on onnxruntime's outputs for the
original ONNX file and on the representation's float64 outputs. A "violated" verdict therefore
never rests on a float32-only or float64-only tie.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy

from ..certifiers.apgd import checkpoints
from ..errors import InvalidParameterError, ModelLoadError
from ..ir.graph import Network
from .spec import Case


@dataclass(frozen=True, eq=False)
class Counterexample:
    """A replayed violation: flat input x, the model file's outputs y (onnxruntime), the
    representation's float64 outputs ``y64``, and which case and disjunct it satisfies."""

    x: numpy.ndarray
    y: numpy.ndarray
    disjunct: int
    case: int = 0
    y64: numpy.ndarray | None = field(default=None)

    def to_vnncomp(self) -> str:
        """The VNN-COMP counterexample file: ``sat`` then ``((X_0 v) ... (Y_0 v) ...)``, values in
        repr precision (they parse back to the same float64)."""
        lines = ["sat", "("]
        lines += [f"(X_{i} {float(v)!r})" for i, v in enumerate(self.x)]
        lines += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(self.y)]
        lines.append(")")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {"x": self.x.tolist(), "y": self.y.tolist(), "case": self.case, "disjunct": self.disjunct,
                "y64": None if self.y64 is None else self.y64.tolist()}


class Replayer:
    """Re-evaluates points on the original model and on the representation in float64.

    Args:
        model: the ONNX file (path to ``.onnx`` / ``.onnx.gz``) or ``onnx.ModelProto`` the network was
            imported from, with its input in the network's layout (``load_onnx(..., channels_last=False)``);
            an adapter (its ``predict`` plays the file's part, in the network's dtype); or None when
            the network itself is the model (its own dtype then plays the file's part).
        net: the robeval Network; flat points are reshaped row-major to ``net.input_shape``.
    """

    def __init__(self, model: Any, net: Network):
        self.net = net
        self.net64 = net if net.dtype == numpy.float64 else net.astype(numpy.float64)
        native = model is not None and hasattr(model, "predict") and hasattr(model, "to_network")
        self.session = _session(model) if model is not None and not native else None
        self.predict = model.predict if native else net.forward  # the file's part when there is no session
        if self.session is None:
            self.dtype = numpy.dtype(net.dtype)
        else:
            meta = self.session.get_inputs()[0]
            self.dtype = numpy.dtype(numpy.float64 if meta.type == "tensor(double)" else numpy.float32)
            self._fixed = meta.shape[0] if isinstance(meta.shape[0], int) and meta.shape[0] > 0 else None
            self._name = meta.name

    def outputs(self, x: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray]:
        """(file outputs, float64 representation outputs), each (N, K), for flat points x (N, n)."""
        x = numpy.asarray(x, dtype=numpy.float64).reshape((-1,) + self.net.input_shape)
        y64 = numpy.asarray(self.net64.forward(x)).reshape(len(x), -1)
        xf = x.astype(self.dtype)
        if self.session is None:
            y = numpy.asarray(self.predict(xf))
        else:
            step = self._fixed or len(x)
            parts = []
            for i in range(0, len(x), max(step, 1)):
                parts.append(self.session.run(None, {self._name: xf[i:i + step]})[0])
            y = numpy.concatenate(parts) if parts else numpy.zeros((0, y64.shape[1]))
        return numpy.asarray(y, dtype=numpy.float64).reshape(len(x), -1), y64

    def check(self, case: Case, x: Any, disjunct: int | None = None) -> Counterexample | None:
        """The counterexample x gives for ``case`` (trying only ``disjunct`` when given), or None when
        x is outside the real box, not a value of the file's dtype, or violates in one evaluation only."""
        x = numpy.asarray(x, dtype=numpy.float64).reshape(-1)
        if not case.contains(x) or not numpy.array_equal(x.astype(self.dtype).astype(numpy.float64), x):
            return None
        y, y64 = self.outputs(x[None])
        which = range(len(case.disjuncts)) if disjunct is None else (disjunct,)
        for k in which:
            d = case.disjuncts[k]
            if d.satisfied_exactly(y[0]) and d.satisfied_exactly(y64[0]):
                return Counterexample(x.copy(), y[0].copy(), int(k), y64=y64[0].copy())
        return None


def _session(model: Any):
    """An onnxruntime session for a path (gzip or not) or a ModelProto."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelLoadError("replaying counterexamples on the ONNX file needs onnxruntime: "
                             "pip install onnxruntime") from exc
    if isinstance(model, (str, os.PathLike)):
        from ..adapters.onnx import gunzip_file, is_gzip

        path = os.fspath(model)
        if not os.path.isfile(path):
            raise ModelLoadError(f"no such file: '{path}'; check the path")
        blob = gunzip_file(path) if is_gzip(path) else path
    else:
        blob = model.SerializeToString()
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(f"onnxruntime cannot load the model for the replay ({type(exc).__name__}: {exc})"
                             ) from exc


def replay(model: Any, net: Network, case: Case, x: Any, disjunct: int | None = None) -> Counterexample | None:
    """``Replayer(model, net).check(case, x, disjunct)``: a Counterexample only if x replays."""
    return Replayer(model, net).check(case, x, disjunct)


def representable_box(lo: numpy.ndarray, hi: numpy.ndarray, dtype) -> tuple[numpy.ndarray, numpy.ndarray] | None:
    """The box [lo, hi] shrunk to values of ``dtype`` (rounded inwards), or None if it holds none."""
    dtype = numpy.dtype(dtype)
    l, h = lo.astype(dtype), hi.astype(dtype)
    l = numpy.where(l.astype(numpy.float64) < lo, numpy.nextafter(l, dtype.type(numpy.inf)), l)
    h = numpy.where(h.astype(numpy.float64) > hi, numpy.nextafter(h, dtype.type(-numpy.inf)), h)
    return None if (l > h).any() else (l, h)


def falsify(net: Network, case: Case, *, model: Any = None, restarts: int = 10, steps: int = 100, seed: int = 0,
            deadline: float | None = None, replayer: Replayer | None = None,
            max_replays: int = 4) -> Counterexample | None:
    """A replayed counterexample of ``case`` found by APGD, or None.

    Args:
        net: the network (inputs flattened row-major from ``net.input_shape``).
        case: the input box and its disjuncts.
        model: the original ONNX file or proto for the replay (see ``Replayer``); None: the network.
        restarts: random starts per disjunct (the first starts at the box centre).
        steps: APGD iterations.
        seed: seed of the random starts.
        deadline: ``time.perf_counter()`` value at which to give up (as ``prove_case``).
        replayer: a ``Replayer`` to reuse (its onnxruntime session), instead of ``model``.
        max_replays: candidates replayed per iteration at most (the most violating first).
    """
    for name, v, low in (("restarts", restarts, 1), ("steps", steps, 0), ("max_replays", max_replays, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, numpy.integer)) or v < low:
            raise InvalidParameterError(f"{name}={v!r}; expected an integer >= {low}")
    if case.n_inputs != int(numpy.prod(net.input_shape)):
        raise InvalidParameterError(f"the case has {case.n_inputs} inputs; the network takes "
                                    f"{int(numpy.prod(net.input_shape))} ({net.input_shape} flattened)")
    replayer = replayer or Replayer(model, net)
    box = representable_box(*case.inner, replayer.dtype)
    if box is None:
        return None  # no point of the file's dtype lies in the real box
    return _Search(net, case, replayer, box, numpy.random.default_rng(seed), deadline, max_replays).run(restarts,
                                                                                                         steps)


class _Search:
    """One batched APGD run over restarts x disjuncts (minimising the disjunct margin)."""

    rho, momentum = 0.75, 0.75

    def __init__(self, net, case, replayer, box, rng, deadline, max_replays):
        self.net, self.case, self.replayer, self.rng = net, case, replayer, rng
        self.deadline, self.max_replays = deadline, max_replays
        self.lo, self.hi = box
        self.dtype = numpy.dtype(net.dtype)
        ds = case.disjuncts
        m = max(d.A.shape[0] for d in ds)
        k = case.n_outputs
        # rows padded to m; a padded row never attains the max (b = +inf, A = 0)
        self.A = numpy.zeros((len(ds), max(m, 1), k))
        self.b = numpy.full((len(ds), max(m, 1)), numpy.inf)
        self.strict = numpy.zeros((len(ds), max(m, 1)), bool)
        self.empty = numpy.array([d.A.shape[0] == 0 for d in ds])
        for i, d in enumerate(ds):
            r = d.A.shape[0]
            self.A[i, :r], self.b[i, :r], self.strict[i, :r] = d.A, d.b, d.strict
        self.tried: set[tuple[bytes, int]] = set()

    def expired(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    def margins(self, x, which):
        """(N,) objective and (N,) index of the maximal row, from the network in its own dtype."""
        y = numpy.asarray(self.net.forward(x.reshape((-1,) + self.net.input_shape)), dtype=numpy.float64)
        rows = numpy.einsum("nmk,nk->nm", self.A[which], y.reshape(len(x), -1)) - self.b[which]
        rows[self.empty[which]] = -numpy.inf
        arg = rows.argmax(axis=1)
        return rows[numpy.arange(len(x)), arg], arg

    def gradient(self, x, which, arg):
        g = self.A[which, arg].astype(self.dtype)
        shaped = x.reshape((-1,) + self.net.input_shape)
        grad = numpy.asarray(self.net.vjp(shaped, g.reshape((len(x),) + tuple(self._out_shape()))))
        grad = grad.reshape(len(x), -1)
        return numpy.where(numpy.isfinite(grad), grad, 0)

    def _out_shape(self):
        return self.net.shapes()[self.net.output_name]

    def try_replay(self, x, f, which, arg) -> Any:
        strict = self.strict[which, arg]
        hit = numpy.flatnonzero((f < 0) | ((f == 0) & ~strict))
        for i in hit[numpy.argsort(f[hit])][: self.max_replays]:
            key = (x[i].tobytes(), int(which[i]))
            if key in self.tried:
                continue
            self.tried.add(key)
            cex = self.replayer.check(self.case, x[i].astype(numpy.float64), int(which[i]))
            if cex is not None:
                return cex
        return None

    def run(self, restarts: int, steps: int):
        n_d = len(self.case.disjuncts)
        which = numpy.tile(numpy.arange(n_d), restarts)
        lo, hi = self.lo, self.hi
        width = (hi.astype(numpy.float64) - lo.astype(numpy.float64))
        x = self.rng.uniform(lo, hi, size=(len(which), lo.size))
        x[:n_d] = lo + width / 2
        x = numpy.clip(x.astype(self.dtype), lo, hi)
        f, arg = self.margins(x, which)
        cex = self.try_replay(x, f, which, arg)
        if cex is not None or steps == 0:
            return cex
        grad = self.gradient(x, which, arg)
        n = len(which)
        eta = numpy.ones(n)  # step per coordinate = eta * width (APGD's 2 eps for a box of width 2 eps)
        prev, best_f, best_x, best_g = x, f.copy(), x.copy(), grad.copy()
        ups, reduced, f_last = numpy.zeros(n), numpy.zeros(n, bool), f.copy()
        marks, last = set(checkpoints(steps)), 0
        for i in range(steps):
            if self.expired():
                return None
            a = 1.0 if i == 0 else self.momentum
            z = numpy.clip(x - (eta[:, None] * width) * numpy.sign(grad), lo, hi)
            new = numpy.clip((x + a * (z - x) + (1 - a) * (x - prev)).astype(self.dtype), lo, hi)
            f_new, arg = self.margins(new, which)
            cex = self.try_replay(new, f_new, which, arg)
            if cex is not None:
                return cex
            grad_new = self.gradient(new, which, arg)
            better = f_new < best_f
            ups += f_new < f
            best_f = numpy.where(better, f_new, best_f)
            best_x[better], best_g[better] = new[better], grad_new[better]
            prev, x, f, grad = x, new, f_new, grad_new
            if i + 1 in marks:  # APGD: halve the step where progress stalled, restart from the best point
                k = i + 1 - last
                reduce = (ups <= self.rho * k) | (~reduced & (f_last <= best_f))
                eta = numpy.where(reduce, eta / 2, eta)
                x, prev, grad = (numpy.where(reduce[:, None], best, cur) for best, cur in
                                 ((best_x, x), (best_x, prev), (best_g, grad)))
                f = numpy.where(reduce, best_f, f)
                reduced, f_last, ups, last = reduce, best_f.copy(), numpy.zeros(n), i + 1
        return None
