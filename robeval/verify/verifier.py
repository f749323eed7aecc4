"""``verify(model, spec)``: falsify first, then prove each case, and answer holds / violated / unknown /
timeout (VNN-COMP's unsat / sat / unknown / timeout).

Order: load the model (an ONNX file keeps its own input layout, so VNN-LIB's flat X_i are its input
tensor in row-major order) and check the spec's sizes; run a falsification pass over every case
(``FALSIFY_SHARE`` of the time at most, in two parts: a short search on every case, then CROWN alone
on every case, then the full search on the cases CROWN left open, so that an easy property is not
held up by a long search); prove the open cases one after another with ``prove_case``, each getting
an equal share of the time left; spend any time left on a longer search on the cases the prover
left open. "violated" comes only with a replayed ``Counterexample``, "holds" only when every
case is proven unsat.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy

from ..errors import InvalidParameterError, UnsupportedOpError, UnsupportedRuleError
from ..ir.graph import Network
from .falsify import Counterexample, Replayer, falsify, representable_box
from .spec import Spec

#: Share of the time limit the first falsification pass may use.
FALSIFY_SHARE = 0.2
#: Budget of the short search run on every case before any proof (the full one follows CROWN).
QUICK_SEARCH = {"restarts": 2, "steps": 25}
#: Rounds of the longer search on cases the prover left open, at most.
SEARCH_ROUNDS = 5
#: Verdicts and their VNN-COMP names.
VNNCOMP = {"holds": "unsat", "violated": "sat", "unknown": "unknown", "timeout": "timeout"}
#: How the prover's point was found, by the stage that returned it (``prove_case`` details).
PROVER_FINDS = {"bab": "branch and bound", "alpha-crown": "alpha-CROWN corner",
                "tightened": "corner after a hidden-layer pass"}


@dataclass(frozen=True)
class CaseResult:
    """One case: 'unsat', 'sat', 'unknown' or 'timeout', seconds spent, and how it was decided."""

    index: int
    status: str
    time: float
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"index": self.index, "status": self.status, "time": self.time, "detail": _plain(self.detail)}


@dataclass(frozen=True)
class VerifyResult:
    """The verdict on a property.

    Attributes:
        status: 'holds', 'violated', 'unknown' or 'timeout'.
        counterexample: the replayed violation when status is 'violated', else None.
        time: seconds from the call to the verdict, model loading included.
        cases: per-case results (cases never reached are absent).
        model, spec: descriptions of what was verified.
    """

    status: str
    counterexample: Counterexample | None
    time: float
    cases: tuple[CaseResult, ...]
    model: str = ""
    spec: str = ""

    @property
    def vnncomp(self) -> str:
        """The verdict in VNN-COMP's words: unsat (holds), sat (violated), unknown, timeout."""
        return VNNCOMP[self.status]

    def to_dict(self) -> dict:
        return {"status": self.status, "vnncomp": self.vnncomp, "time": self.time, "model": self.model,
                "spec": self.spec, "cases": [c.to_dict() for c in self.cases],
                "counterexample": None if self.counterexample is None else self.counterexample.to_dict()}


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, numpy.ndarray):
        return value.tolist()
    if isinstance(value, numpy.generic):
        return value.item()
    return value


@dataclass(frozen=True, eq=False)
class PreparedModel:
    """A model loaded once for several ``verify`` calls: the network, the replayer holding the
    original file's onnxruntime session, and a description."""

    net: Network
    replayer: Replayer
    label: str


def prepare_model(model: Any) -> PreparedModel:
    """Load a path, ModelProto, adapter or Network for verification (``verify`` accepts the result).

    An ONNX file or proto is imported with ``channels_last=False``, so the network's input is the
    file's input tensor and flat inputs map onto it row-major; candidates replay on the file itself.
    Other adapters replay on their ``predict``; a bare Network on itself (its own dtype)."""
    if isinstance(model, PreparedModel):
        return model
    net, original, label = _load(model)
    return PreparedModel(net, Replayer(original, net), label)


def _load(model: Any) -> tuple[Network, Any, str]:
    if isinstance(model, Network):
        return model, None, "a robeval Network"
    from ..adapters.base import load_model, sniff_format
    from ..adapters.onnx import load_onnx

    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.is_file() and sniff_format(path) == "onnx":
            return load_onnx(path, channels_last=False), os.fspath(path), os.fspath(path)
        adapter = load_model(path)
        return adapter.to_network(), adapter, os.fspath(path)
    if type(model).__module__.partition(".")[0] == "onnx":
        return load_onnx(model, channels_last=False), model, "an ONNX ModelProto"
    adapter = load_model(model)
    proto = getattr(adapter, "_proto", None)
    if proto is not None:  # an OnnxModel: verify the file's own graph and layout
        return load_onnx(proto, channels_last=False), proto, getattr(adapter, "source", "an ONNX model")
    return adapter.to_network(), adapter, type(model).__name__


def verify(model: Any, spec: Spec, timeout: float = 60.0, *, seed: int = 0, progress: bool = False) -> VerifyResult:
    """Decide whether ``spec`` holds for ``model`` within ``timeout`` seconds.

    Args:
        model: a path (``.onnx``, ``.onnx.gz`` or anything ``robeval.load_model`` reads), an
            ``onnx.ModelProto``, an adapter, a robeval Network, or a ``prepare_model`` result.
        spec: the property (``read_vnnlib``, ``Spec.from_box``, ``robustness_spec``); its flat inputs
            are the network input in row-major order.
        timeout: seconds for the whole call.
        seed: seed of the falsifier's random starts.
        progress: print a line per stage to stderr, and the prover's own (each hidden-layer pass,
            every few seconds of branch and bound, with the worst bound so far).
    Returns:
        A ``VerifyResult``; ``status`` is 'holds' only when every case was proven, 'violated' only
        with a replayed counterexample.

    >>> spec = robustness_spec(x, 0.01, label=3, num_classes=10)   # doctest: +SKIP
    >>> verify("net.onnx", spec, timeout=30).status                 # doctest: +SKIP
    'holds'
    """
    start = time.perf_counter()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 or math.isnan(timeout):
        raise InvalidParameterError(f"timeout={timeout!r}; expected a number of seconds > 0")
    if not isinstance(spec, Spec):
        raise InvalidParameterError(f"spec is a {type(spec).__name__}; expected a robeval.verify.Spec "
                                    "(read_vnnlib(path), Spec.from_box(...) or robustness_spec(...))")
    deadline = start + float(timeout)
    prepared = prepare_model(model)
    net = prepared.net
    out_shape = net.shapes()[net.output_name]
    spec.check_sizes(int(numpy.prod(net.input_shape)), int(numpy.prod(out_shape)), f"the network ({prepared.label})")
    run = _Run(net, prepared.replayer, spec, start, deadline, seed, progress)
    status, cex = run.decide()
    return VerifyResult(status, cex, time.perf_counter() - start, tuple(run.results[i] for i in sorted(run.results)),
                        prepared.label, spec.source)


class _Run:
    """The state of one ``verify`` call: per-case results and the time left."""

    def __init__(self, net, replayer, spec, start, deadline, seed, progress):
        self.net, self.replayer, self.spec = net, replayer, spec
        self.start, self.deadline, self.seed, self.progress = start, deadline, seed, progress
        self.results: dict[int, CaseResult] = {}

    def say(self, text: str) -> None:
        if self.progress:
            print(f"[{time.perf_counter() - self.start:7.2f}s] {text}", file=sys.stderr, flush=True)

    def found(self, i: int, t0: float, cex: Counterexample, how: str):
        cex = replace(cex, case=i)
        self.results[i] = CaseResult(i, "sat", time.perf_counter() - t0, {"stage": how, "disjunct": cex.disjunct})
        self.say(f"case {i}: violated ({how}, disjunct {cex.disjunct})")
        return "violated", cex

    def decide(self):
        cases = self.spec.cases
        if not cases:
            return "holds", None  # no input box at all: nothing can violate the property
        falsify_until = time.perf_counter() + (self.deadline - time.perf_counter()) * FALSIFY_SHARE
        for i, case in enumerate(cases):  # a short search on every case before any proof
            t0 = time.perf_counter()
            cex = falsify(self.net, case, seed=self.seed, replayer=self.replayer, **QUICK_SEARCH,
                          deadline=self._share(falsify_until, len(cases) - i))
            if cex is not None:
                return self.found(i, t0, cex, "falsify")
        open_cases = [i for i, case in enumerate(cases) if not self.crown_proves(i, case)]
        for k, i in enumerate(open_cases):  # the full first search, on what CROWN left open
            t0 = time.perf_counter()
            cex = falsify(self.net, cases[i], seed=self.seed + 1, replayer=self.replayer,
                          deadline=self._share(falsify_until, len(open_cases) - k))
            if cex is not None:
                return self.found(i, t0, cex, "falsify")
        for k, i in enumerate(open_cases):
            now = time.perf_counter()
            if now >= self.deadline:
                return "timeout", None
            status, cex = self.prove(i, cases[i], now + (self.deadline - now) / (len(open_cases) - k))
            if status == "violated":
                return status, cex
        return self.search_open()

    def _share(self, until, left):
        """The deadline of the next case's equal part of a pass over ``left`` cases that must end by
        ``until`` (never past the whole call's deadline)."""
        now = time.perf_counter()
        return min(self.deadline, now + max(0.0, until - now) / left)

    def crown_proves(self, i, case) -> bool:
        """CROWN alone on case i (cheap); records and returns True when it proves the case."""
        from .prove import crown_case

        if time.perf_counter() >= self.deadline:
            return False
        try:
            status, detail = crown_case(self.net, case)
        except (UnsupportedOpError, UnsupportedRuleError):
            return False  # the full prover records why
        if status != "unsat":
            return False
        self.results[i] = CaseResult(i, "unsat", detail["time"], detail)
        self.say(f"case {i}: unsat (crown)")
        return True

    def prove(self, i, case, case_deadline):
        from .prove import prove_case

        t0 = time.perf_counter()
        if any(d.A.shape[0] == 0 for d in case.disjuncts):  # every point of the box violates it
            self.results[i] = CaseResult(i, "unknown", 0.0, {"note": "a disjunct without output constraints, and "
                                                             "no point of the file's dtype in the box replayed"})
            return "unknown", None
        replayed: list[Counterexample] = []

        box = representable_box(*case.inner, self.replayer.dtype)

        def check(x) -> bool:
            # the prover's points sit on the outward-rounded box: move them to the nearest values of the
            # file's dtype inside the real box (at most an ulp away), then replay as any candidate
            if box is None:
                return False
            x = numpy.clip(numpy.asarray(x, dtype=numpy.float64).reshape(-1), *box)
            cex = self.replayer.check(case, x)
            if cex is not None:
                replayed.append(cex)
            return cex is not None

        try:
            say = (lambda text: self.say(f"case {i}: {text}")) if self.progress else None
            status, detail = prove_case(self.net, case, case_deadline, check=check, progress=say)
        except (UnsupportedOpError, UnsupportedRuleError) as exc:  # no bound for this network: not provable here
            status, detail = "unknown", {"stage": "prove", "note": str(exc)}
        if status == "sat":
            if not replayed:  # prove_case says sat only after check() accepted; never trust it otherwise
                cex = self.replayer.check(case, detail.get("x")) if detail.get("x") is not None else None
                if cex is None:
                    status = "unknown"
                else:
                    replayed.append(cex)
            if replayed:
                return self.found(i, t0, replayed[0], PROVER_FINDS.get(detail.get("stage"), "branch and bound"))
        if status not in ("unsat", "unknown", "timeout"):
            status = "unknown"
        self.results[i] = CaseResult(i, status, time.perf_counter() - t0, dict(detail))
        self.say(f"case {i}: {status} ({detail.get('stage', '?')})")
        return status, None

    def search_open(self):
        """Spend the time left searching the cases the prover left open; then the verdict."""
        open_cases = [i for i, r in self.results.items() if r.status != "unsat"]
        rounds = 1
        while open_cases and rounds <= SEARCH_ROUNDS and time.perf_counter() < self.deadline - 0.05:
            for i in open_cases:
                t0 = time.perf_counter()
                cex = falsify(self.net, self.spec.cases[i], seed=self.seed + 1000 * rounds, restarts=20,
                              steps=200, deadline=self.deadline, replayer=self.replayer)
                if cex is not None:
                    return self.found(i, t0, cex, f"falsify round {rounds + 1}")
                if time.perf_counter() >= self.deadline:
                    break
            rounds += 1
        states = {r.status for r in self.results.values()}
        if len(self.results) == len(self.spec.cases) and states == {"unsat"}:
            return "holds", None
        return ("timeout" if "timeout" in states or len(self.results) < len(self.spec.cases) else "unknown"), None
