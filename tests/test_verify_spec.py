"""Specification types: validation messages, the robustness spec's outward rounding, exact checks."""

from __future__ import annotations

from fractions import Fraction

import numpy
import pytest

from robeval.errors import InvalidParameterError
from robeval.verify import Case, Disjunct, Spec, robustness_spec
from robeval.verify.spec import bracket_sum


def test_from_box():
    spec = Spec.from_box([0, -1], [1, 1], [[1.0, -1.0, 0.0]], [0.5], strict=[True])
    (case,) = spec.cases
    assert (spec.n_inputs, spec.n_outputs) == (2, 3)
    assert case.lo.tolist() == [0.0, -1.0] and case.disjuncts[0].strict.tolist() == [True]
    assert not case.lo.flags.writeable  # frozen: a spec cannot change under a running proof


@pytest.mark.parametrize("make, message", [
    (lambda: Case([0, 2], [1, 1], (Disjunct([[1.0]], [0.0]),)), r"lo\[1\] = 2.0 > hi\[1\] = 1.0"),
    (lambda: Case([0, numpy.nan], [1, 1], (Disjunct([[1.0]], [0.0]),)), "lo contains 1 NaN value"),
    (lambda: Case([0, 0], [1], (Disjunct([[1.0]], [0.0]),)), r"hi has shape \(1,\); expected \(2,\)"),
    (lambda: Case([[0, 0]], [[1, 1]], (Disjunct([[1.0]], [0.0]),)), "flatten it"),
    (lambda: Case([0], [1], ()), "one or more Disjunct"),
    (lambda: Disjunct([1.0, 2.0], [0.0]), r"A has shape \(2,\); expected \(m, K\)"),
    (lambda: Disjunct([[1.0, 2.0]], [0.0, 1.0]), r"b has shape \(2,\); expected \(1,\)"),
    (lambda: Disjunct([[1.0]], [0.0], numpy.array([1])), "booleans"),
    (lambda: Disjunct([[numpy.inf]], [0.0]), "infinite"),
    (lambda: Disjunct([[1.0]], [0.0], b_inner=[1.0]), "b_inner exceeds b"),
    (lambda: Spec((Case([0], [1], (Disjunct([[1.0]], [0.0]),)),), 2, 1), "case 0 has 1 inputs"),
    (lambda: robustness_spec([0.5], -0.1, 0, 2), "eps=-0.1"),
    (lambda: robustness_spec([0.5], 0.1, 2, 2), "label=2"),
    (lambda: robustness_spec([1.5], 0.1, 0, 2), "outside the domain"),
])
def test_validation_messages(make, message):
    with pytest.raises(InvalidParameterError, match=message):
        make()


def test_check_sizes_names_both_sides():
    spec = Spec.from_box([0, 0, 0], [1, 1, 1], [[1.0, 0.0]], [0.0])
    spec.check_sizes(3, 2)
    with pytest.raises(InvalidParameterError, match=r"3 inputs and 2 outputs; the net has 784 inputs .* and 10"):
        spec.check_sizes(784, 10, "the net")


def test_robustness_spec_rounds_the_ball_outwards_and_clips_to_the_domain():
    x = numpy.array([0.1, 0.7, 0.0, 1.0, 0.3])
    eps = 0.1
    spec = robustness_spec(x.reshape(1, 5), eps, label=1, num_classes=3)
    (case,) = spec.cases
    for i, v in enumerate(x):
        lo, hi = max(Fraction(v) - Fraction(eps), 0), min(Fraction(v) + Fraction(eps), 1)
        assert Fraction(case.lo[i]) <= lo <= Fraction(case.inner[0][i])
        assert Fraction(case.inner[1][i]) <= hi <= Fraction(case.hi[i])
    assert case.lo[2] == 0.0 and case.hi[3] == 1.0
    assert [d.A.tolist() for d in case.disjuncts] == [[[-1.0, 1.0, 0.0]], [[0.0, 1.0, -1.0]]]  # y_1 - y_j <= 0
    assert spec.to_dict()["cases"][0]["disjuncts"][1]["b"] == [0.0]


def test_bracket_sum_is_exact():
    rng = numpy.random.default_rng(0)
    a, b = rng.normal(size=500), rng.normal(size=500) * 1e-9
    down, up = bracket_sum(a, b)
    for ai, bi, d, u in zip(a, b, down, up):
        s = Fraction(ai) + Fraction(bi)
        assert Fraction(d) <= s <= Fraction(u) and (d == u) == (Fraction(d) == s)
        assert u == d or u == numpy.nextafter(d, numpy.inf)


def test_satisfied_exactly_uses_rational_arithmetic_and_b_inner():
    # 0.1 + 0.2 > 0.3 in float64 arithmetic; the exact sum of the two floats is also > float(0.3)
    d = Disjunct([[1.0, 1.0]], [0.3])
    assert not d.satisfied_exactly([0.1, 0.2])
    assert (Fraction(0.1) + Fraction(0.2)) > Fraction(0.3)
    # 1e16 + 1 - 1e16 is 0 in floats but 1 exactly: a row bound of 0.5 is not met
    e = Disjunct([[1.0, 1.0, -1.0]], [0.5])
    assert numpy.array([1e16, 1.0, -1e16]).sum() == 0.0 and not e.satisfied_exactly([1e16, 1.0, 1e16])
    inner = Disjunct([[1.0]], [0.1], b_inner=[numpy.nextafter(0.1, 0)])  # the real bound lies between
    assert not inner.satisfied_exactly([0.1]) and inner.satisfied_exactly([numpy.nextafter(0.1, 0)])
    assert not Disjunct([[1.0]], [0.0]).satisfied_exactly([numpy.nan])
