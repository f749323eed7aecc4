"""Verification specifications: input boxes with linear output constraints in disjunctive normal form.

A ``Spec`` describes the *unsafe* set, as VNN-LIB does: the property is violated (VNN-COMP "sat") iff
some ``Case`` is, a case is violated iff some x in its box has an output y = f(x) satisfying one of
its ``Disjunct``s, and a disjunct is satisfied iff ``A @ y <= b`` row by row (``<`` on strict rows).

Every array is float64 and rounded in the sound direction for each use:

* ``Case.lo, hi`` (the *outer* box) contain the real box, so a proof over them covers it;
* ``Case.inner`` is the box of float64 points inside the real box (strict bounds included): a
  counterexample must lie in it;
* ``Disjunct.b`` is rounded up (the unsafe set only grows, so proving it empty stays sound) and
  ``Disjunct.b_inner`` down (a counterexample checked against it satisfies the real constraint).

>>> spec = robustness_spec(numpy.full(4, 0.5), 0.1, label=2, num_classes=3)
>>> len(spec.cases[0].disjuncts), spec.cases[0].disjuncts[0].A.tolist()
(2, [[-1.0, 0.0, 1.0]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy

from ..errors import InvalidParameterError


def _frozen(a: Any, dtype=numpy.float64) -> numpy.ndarray:
    a = numpy.array(a, dtype=dtype, order="C")
    a.setflags(write=False)
    return a


def _vector(name: str, value: Any, length: int | None = None) -> numpy.ndarray:
    a = numpy.asarray(value, dtype=numpy.float64)
    if a.ndim != 1 or (length is not None and a.shape[0] != length):
        want = f"({length},)" if length is not None else "a flat vector"
        raise InvalidParameterError(f"{name} has shape {a.shape}; expected {want}"
                                    + ("; flatten it with .reshape(-1)" if a.ndim > 1 else ""))
    if numpy.isnan(a).any():
        raise InvalidParameterError(f"{name} contains {int(numpy.isnan(a).sum())} NaN value(s) "
                                    f"(first at index {int(numpy.flatnonzero(numpy.isnan(a))[0])})")
    return a


@dataclass(frozen=True, eq=False)
class Disjunct:
    """A conjunction of output constraints: satisfied by y iff ``A @ y <= b`` (``<`` where ``strict``).

    Args:
        A: (m, K) coefficients over the K network outputs; m = 0 is satisfied by every output.
        b: (m,) right-hand sides, rounded up where the specification's value is not a float64.
        strict: (m,) whether the row is a strict inequality (default: none is).
        b_inner: (m,) right-hand sides rounded down (default: ``b``, i.e. exact).
    """

    A: numpy.ndarray
    b: numpy.ndarray
    strict: numpy.ndarray | None = None
    b_inner: numpy.ndarray | None = None

    def __post_init__(self):
        A = numpy.asarray(self.A, dtype=numpy.float64)
        if A.ndim != 2:
            raise InvalidParameterError(f"A has shape {A.shape}; expected (m, K): one row per output constraint")
        m = A.shape[0]
        b = _vector("b", self.b, m)
        strict = numpy.zeros(m, bool) if self.strict is None else numpy.asarray(self.strict)
        if strict.shape != (m,) or strict.dtype != bool:
            raise InvalidParameterError(f"strict has shape {strict.shape} and dtype {strict.dtype}; "
                                        f"expected ({m},) booleans")
        inner = b if self.b_inner is None else _vector("b_inner", self.b_inner, m)
        if not numpy.isfinite(A).all():
            raise InvalidParameterError("A contains NaN or infinite coefficients")
        if (inner > b).any():
            raise InvalidParameterError("b_inner exceeds b; b_inner is b rounded down, b rounded up")
        for name, v in (("A", A), ("b", b), ("strict", strict), ("b_inner", inner)):
            object.__setattr__(self, name, _frozen(v, bool if name == "strict" else numpy.float64))

    @property
    def n_outputs(self) -> int:
        return int(self.A.shape[1])

    def margin(self, y: Any) -> numpy.ndarray:
        """max over rows of ``A y - b`` for a batch y (N, K): y satisfies the disjunct when <= 0
        (< 0 on strict rows); -inf for a disjunct without rows. A float estimate, not a check."""
        y = numpy.asarray(y, dtype=numpy.float64)
        if self.A.shape[0] == 0:
            return numpy.full(y.shape[0], -math.inf)
        return (y @ self.A.T - self.b).max(axis=1)

    def satisfied_exactly(self, y: Any) -> bool:
        """Whether the float outputs y (K,) satisfy every row, in exact rational arithmetic against
        ``b_inner`` (so that a yes holds for the specification's real right-hand sides)."""
        y = numpy.asarray(y, dtype=numpy.float64).reshape(-1)
        if y.shape != (self.n_outputs,) or not numpy.isfinite(y).all():
            return False
        ys = [Fraction(float(v)) for v in y]
        for a, bo, bi, s in zip(self.A, self.b, self.b_inner, self.strict):
            lhs = sum((Fraction(float(c)) * v for c, v in zip(a, ys) if c != 0), Fraction(0))
            rhs = Fraction(float(bi))
            if not (lhs < rhs if (s and bi == bo) else lhs <= rhs):
                return False
        return True

    def to_dict(self) -> dict:
        return {"A": self.A.tolist(), "b": self.b.tolist(), "strict": self.strict.tolist(),
                "b_inner": self.b_inner.tolist()}


@dataclass(frozen=True, eq=False)
class Case:
    """One input box with the disjuncts that make it unsafe.

    Args:
        lo, hi: (n,) outer box over the flat network input (row-major over its per-sample shape);
            it contains the specification's real box.
        disjuncts: the case is violated iff some x in the box has f(x) satisfying one of them.
        inner: optional (lo, hi) of the float64 points inside the real box (tighter than the outer
            box where a bound was rounded outwards or is strict); default the outer box.
    """

    lo: numpy.ndarray
    hi: numpy.ndarray
    disjuncts: tuple[Disjunct, ...]
    inner: tuple[numpy.ndarray, numpy.ndarray] | None = None

    def __post_init__(self):
        lo = _vector("lo", self.lo)
        hi = _vector("hi", self.hi, lo.shape[0])
        bad = numpy.flatnonzero(lo > hi)
        if bad.size:
            i = int(bad[0])
            raise InvalidParameterError(f"the box is empty: lo[{i}] = {float(lo[i])!r} > hi[{i}] = {float(hi[i])!r} "
                                        f"({bad.size} such input(s)); every input needs lo <= hi")
        disjuncts = tuple(self.disjuncts)
        if not disjuncts or not all(isinstance(d, Disjunct) for d in disjuncts):
            raise InvalidParameterError("a case needs one or more Disjunct objects")
        if len({d.n_outputs for d in disjuncts}) != 1:
            raise InvalidParameterError(f"the disjuncts constrain different output counts "
                                        f"{sorted({d.n_outputs for d in disjuncts})}")
        ilo, ihi = (lo, hi) if self.inner is None else (_vector("inner lo", self.inner[0], lo.shape[0]),
                                                       _vector("inner hi", self.inner[1], lo.shape[0]))
        if (ilo < lo).any() or (ihi > hi).any():
            raise InvalidParameterError("the inner box must lie inside the outer box [lo, hi]")
        object.__setattr__(self, "lo", _frozen(lo))
        object.__setattr__(self, "hi", _frozen(hi))
        object.__setattr__(self, "disjuncts", disjuncts)
        object.__setattr__(self, "inner", (_frozen(ilo), _frozen(ihi)))

    @property
    def n_inputs(self) -> int:
        return int(self.lo.shape[0])

    @property
    def n_outputs(self) -> int:
        return self.disjuncts[0].n_outputs

    def contains(self, x: Any) -> bool:
        """Whether the float point x (flat) lies in the specification's real box (the inner box)."""
        x = numpy.asarray(x, dtype=numpy.float64).reshape(-1)
        lo, hi = self.inner
        return x.shape == lo.shape and bool(numpy.isfinite(x).all() and (x >= lo).all() and (x <= hi).all())

    def to_dict(self) -> dict:
        return {"lo": self.lo.tolist(), "hi": self.hi.tolist(), "inner_lo": self.inner[0].tolist(),
                "inner_hi": self.inner[1].tolist(), "disjuncts": [d.to_dict() for d in self.disjuncts]}


@dataclass(frozen=True, eq=False)
class Spec:
    """A property over a network with ``n_inputs`` flat inputs and ``n_outputs`` outputs: violated
    (VNN-COMP "sat") iff some case is violated, holds ("unsat") iff none is."""

    cases: tuple[Case, ...]
    n_inputs: int
    n_outputs: int
    source: str = "python"

    def __post_init__(self):
        cases = tuple(self.cases)
        if not all(isinstance(c, Case) for c in cases):
            raise InvalidParameterError("Spec.cases must be Case objects")
        for i, c in enumerate(cases):
            if c.n_inputs != self.n_inputs or c.n_outputs != self.n_outputs:
                raise InvalidParameterError(f"case {i} has {c.n_inputs} inputs and {c.n_outputs} outputs; "
                                            f"the spec declares {self.n_inputs} and {self.n_outputs}")
        object.__setattr__(self, "cases", cases)

    @classmethod
    def from_box(cls, lo: Any, hi: Any, A: Any, b: Any, strict: Any = None, source: str = "python") -> Spec:
        """One box and one disjunct: violated iff some x in [lo, hi] has ``A f(x) <= b``.

        >>> Spec.from_box([0, 0], [1, 1], [[1.0, -1.0]], [0.0]).n_outputs
        2
        """
        d = Disjunct(A, b, None if strict is None else numpy.asarray(strict, bool))
        case = Case(lo, hi, (d,))
        return cls((case,), case.n_inputs, d.n_outputs, source)

    def check_sizes(self, n_inputs: int, n_outputs: int, what: str = "the network") -> None:
        """Refuse a spec whose input or output count differs from the network's."""
        if self.n_inputs != n_inputs or self.n_outputs != n_outputs:
            raise InvalidParameterError(
                f"the specification ({self.source}) has {self.n_inputs} inputs and {self.n_outputs} outputs; "
                f"{what} has {n_inputs} inputs (flattened row-major) and {n_outputs} outputs: use the "
                "property written for this network")

    def to_dict(self) -> dict:
        return {"source": self.source, "n_inputs": self.n_inputs, "n_outputs": self.n_outputs,
                "cases": [c.to_dict() for c in self.cases]}


def bracket_sum(a: numpy.ndarray, b: numpy.ndarray | float) -> tuple[numpy.ndarray, numpy.ndarray]:
    """(down, up): float64 arrays with down <= a + b <= up in exact arithmetic, each the rounded sum
    or one ulp beyond it (Knuth's TwoSum gives the rounding error exactly)."""
    a = numpy.asarray(a, dtype=numpy.float64)
    b = numpy.broadcast_to(numpy.asarray(b, dtype=numpy.float64), a.shape)
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)  # a + b - s, exactly
    down = numpy.where(err < 0, numpy.nextafter(s, -numpy.inf), s)
    up = numpy.where(err > 0, numpy.nextafter(s, numpy.inf), s)
    return down, up


def robustness_spec(x: Any, eps: float, label: int, num_classes: int,
                    domain: tuple[float, float] | None = (0.0, 1.0)) -> Spec:
    """The L-inf ball of radius eps around x, clipped to the domain, violated iff some class j != label
    has y_j >= y_label: one single-row disjunct per j, so each can be proven on its own.

    Args:
        x: the input (any shape; flattened row-major, as the network input is).
        eps: radius >= 0 in input units; x - eps and x + eps are rounded outwards for the outer box.
        label: the class that must stay on top; num_classes: K.
        domain: (low, high) the inputs live in, or None for no clipping.
    """
    x = numpy.asarray(x, dtype=numpy.float64).reshape(-1)
    if not numpy.isfinite(x).all():
        raise InvalidParameterError("x contains NaN or infinite values")
    if isinstance(eps, bool) or not isinstance(eps, (int, float, numpy.floating)) or not 0 <= eps < math.inf:
        raise InvalidParameterError(f"eps={eps!r}; expected a finite number >= 0")
    k = int(num_classes)
    if k < 2 or isinstance(label, bool) or not isinstance(label, (int, numpy.integer)) or not 0 <= label < k:
        raise InvalidParameterError(f"label={label!r} with num_classes={num_classes!r}; expected 0 <= label < "
                                    "num_classes and num_classes >= 2")
    lo_dn, lo_up = bracket_sum(x, -float(eps))
    hi_dn, hi_up = bracket_sum(x, float(eps))
    if domain is not None:
        d0, d1 = float(domain[0]), float(domain[1])
        if not d0 < d1:
            raise InvalidParameterError(f"domain={domain!r}; expected (low, high) with low < high")
        if x.size and (x.min() < d0 or x.max() > d1):
            raise InvalidParameterError(f"x ranges over [{x.min():.6g}, {x.max():.6g}], outside the domain "
                                        f"{(d0, d1)}; scale the input or pass domain=None")
        lo_dn, lo_up, hi_dn, hi_up = (numpy.clip(v, d0, d1) for v in (lo_dn, lo_up, hi_dn, hi_up))
    disjuncts = []
    for j in range(k):
        if j != label:
            row = numpy.zeros((1, k))
            row[0, label], row[0, j] = 1.0, -1.0  # y_label - y_j <= 0
            disjuncts.append(Disjunct(row, numpy.zeros(1)))
    case = Case(lo_dn, hi_up, tuple(disjuncts), inner=(lo_up, hi_dn))
    return Spec((case,), x.size, k, f"robustness eps={eps!r} label={label}")
