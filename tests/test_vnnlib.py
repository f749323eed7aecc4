"""The VNN-LIB 1.0 reader: exact parsing and sound rounding on inline properties, every error path with
its line and column, DNF over input boxes (ACAS-Xu style), and the shared VNN-COMP files."""

from __future__ import annotations

import gzip
import re
from fractions import Fraction
from pathlib import Path

import numpy
import pytest
from conftest import SHARED

from robeval.errors import RobevalError, SpecError
from robeval.verify import read_vnnlib

MNIST_FC = SHARED / "vnncomp" / "mnist_fc"
VERIVITAL = SHARED / "vnncomp" / "verivital"


def declare(nx: int, ny: int) -> str:
    return "".join(f"(declare-const X_{i} Real)\n" for i in range(nx)) + \
        "".join(f"(declare-const Y_{j} Real)\n" for j in range(ny))


def unit_box(nx: int) -> str:
    return "".join(f"(assert (>= X_{i} 0))\n(assert (<= X_{i} 1))\n" for i in range(nx))


def up(v: float) -> float:
    return float(numpy.nextafter(v, numpy.inf))


def down(v: float) -> float:
    return float(numpy.nextafter(v, -numpy.inf))


# ---------------------------------------------------------------------------- good properties
def test_box_and_output_rows():
    spec = read_vnnlib(declare(2, 3) + "; a comment (with parens\n" + """
        (assert (>= X_0 -0.5))  ; lower bound
        (assert (<= X_0 0.25))
        (assert (<= -1 X_1))
        (assert (>= 2.5e0 X_1))
        (assert (<= Y_0 Y_2))
        (assert (>= Y_1 -3))
    """)
    assert (spec.n_inputs, spec.n_outputs, len(spec.cases)) == (2, 3, 1)
    case = spec.cases[0]
    assert case.lo.tolist() == [-0.5, -1.0] and case.hi.tolist() == [0.25, 2.5]
    assert [a.tolist() for a in case.inner] == [[-0.5, -1.0], [0.25, 2.5]]  # exact literals: no widening
    (d,) = case.disjuncts
    # Y_0 - Y_2 <= 0 and -Y_1 <= 3, every row non-strict
    assert d.A.tolist() == [[1.0, 0.0, -1.0], [0.0, -1.0, 0.0]]
    assert d.b.tolist() == [0.0, 3.0] and d.b_inner.tolist() == [0.0, 3.0]
    assert d.strict.tolist() == [False, False]


def test_linear_terms_constants_on_either_side_and_scientific_literals():
    spec = read_vnnlib(declare(1, 2) + unit_box(1) + """
        (assert (<= (+ Y_0 (* 2 Y_1) (- 1.5)) (* -0.5 -4)))
        (assert (>= (- Y_0 Y_1 1e-1) (- 2)))
        (assert (<= (* 4 X_0) 1E0))
    """)
    case = spec.cases[0]
    assert case.hi.tolist() == [0.25]  # 4 X_0 <= 1
    d = case.disjuncts[0]
    # Y_0 + 2 Y_1 - 1.5 <= 2  ->  Y_0 + 2 Y_1 <= 3.5;  Y_0 - Y_1 - 0.1 >= -2  ->  -Y_0 + Y_1 <= 1.9
    assert d.A.tolist() == [[1.0, 2.0], [-1.0, 1.0]]
    assert d.b[0] == 3.5 and d.b_inner[0] == 3.5
    assert Fraction(d.b_inner[1]) < Fraction("1.9") < Fraction(d.b[1]) and d.b[1] == up(d.b_inner[1])


def test_inexact_input_literals_widen_the_outer_box_and_narrow_the_inner_one_by_an_ulp():
    spec = read_vnnlib(declare(2, 1) + """
        (assert (>= X_0 0.1)) (assert (<= X_0 0.30000000000000004441))
        (assert (>= X_1 -0.7)) (assert (<= X_1 0.029999999329447746))
        (assert (<= Y_0 0))
    """)
    case = spec.cases[0]
    reals = [(Fraction("0.1"), Fraction("0.30000000000000004441")),
             (Fraction("-0.7"), Fraction("0.029999999329447746"))]
    for i, (lo, hi) in enumerate(reals):
        assert Fraction(case.lo[i]) < lo < Fraction(case.inner[0][i])  # the outer box contains the real one
        assert Fraction(case.inner[1][i]) < hi < Fraction(case.hi[i])  # the inner box lies inside it
        assert case.inner[0][i] == up(case.lo[i]) and case.hi[i] == up(case.inner[1][i])
    # the competition's bound, float32(0.03) printed to 17 digits, lies just below float32(0.03): the
    # outer box reaches that float, the inner one (where counterexamples must lie) stops an ulp short
    assert case.hi[1] == float(numpy.float32(0.03)) > case.inner[1][1]


def test_output_constants_round_so_that_the_unsafe_set_grows():
    spec = read_vnnlib(declare(1, 1) + unit_box(1) + "(assert (<= Y_0 0.1))(assert (>= Y_0 -0.2))")
    d = spec.cases[0].disjuncts[0]
    # Y_0 <= 0.1: b above 0.1 (proofs cover the real set), b_inner below (replays satisfy the real one)
    assert Fraction(d.b_inner[0]) < Fraction("0.1") < Fraction(d.b[0])
    # Y_0 >= -0.2 is -Y_0 <= 0.2
    assert d.A[1].tolist() == [-1.0] and Fraction(d.b_inner[1]) < Fraction("0.2") < Fraction(d.b[1])


def test_strict_atoms():
    spec = read_vnnlib(declare(1, 2) + "(assert (> X_0 0))(assert (< X_0 1))(assert (< Y_0 Y_1))(assert (> Y_0 -1))")
    case = spec.cases[0]
    assert case.lo.tolist() == [0.0] and case.hi.tolist() == [1.0]  # proofs use the closure
    assert case.inner[0][0] == up(0.0) and case.inner[1][0] == down(1.0)  # points must satisfy x > 0, x < 1
    d = case.disjuncts[0]
    assert d.strict.tolist() == [True, True] and d.A.tolist() == [[1.0, -1.0], [-1.0, 0.0]]
    assert d.satisfied_exactly([0.0, 1.0]) and not d.satisfied_exactly([1.0, 1.0])  # strict: a tie violates
    assert not d.satisfied_exactly([-1.0, 0.0])  # -Y_0 < 1 fails at Y_0 = -1


def test_equalities_and_repeated_bounds_intersect():
    spec = read_vnnlib(declare(2, 1) + """
        (assert (>= X_0 0)) (assert (>= X_0 0.5)) (assert (<= X_0 3)) (assert (<= X_0 2))
        (assert (= X_1 0.75)) (assert (<= Y_0 1))
    """)
    case = spec.cases[0]
    assert case.lo.tolist() == [0.5, 0.75] and case.hi.tolist() == [2.0, 0.75]


def test_acas_style_disjunction_over_input_boxes_groups_terms_by_box():
    box_a = "(>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1)"
    box_b = "(>= X_0 -1) (<= X_0 0) (>= X_1 0) (<= X_1 1)"
    spec = read_vnnlib(declare(2, 2) + f"""
        (assert (or
            (and {box_a} (<= Y_0 Y_1))
            (and {box_b} (<= Y_1 Y_0) (<= Y_0 3))
            (and {box_a} (>= Y_0 5))
        ))""")
    assert len(spec.cases) == 2
    a, b = spec.cases
    assert a.lo.tolist() == [0.0, 0.0] and a.hi.tolist() == [1.0, 1.0]
    assert b.lo.tolist() == [-1.0, 0.0] and b.hi.tolist() == [0.0, 1.0]
    assert [d.A.tolist() for d in a.disjuncts] == [[[1.0, -1.0]], [[-1.0, 0.0]]]
    assert [d.b.tolist() for d in a.disjuncts] == [[0.0], [-5.0]]
    (db,) = b.disjuncts
    assert db.A.tolist() == [[-1.0, 1.0], [1.0, 0.0]] and db.b.tolist() == [0.0, 3.0]


def test_nested_and_or_expands_to_the_product():
    spec = read_vnnlib(declare(1, 2) + unit_box(1) + """
        (assert (and (or (<= Y_0 0) (<= Y_1 0)) (or (>= Y_0 1) (and (>= Y_1 2)))))""")
    (case,) = spec.cases
    rows = sorted(tuple(map(tuple, d.A.tolist())) + tuple(d.b.tolist()) for d in case.disjuncts)
    assert rows == sorted([((1.0, 0.0), (-1.0, 0.0), 0.0, -1.0), ((1.0, 0.0), (0.0, -1.0), 0.0, -2.0),
                           ((0.0, 1.0), (-1.0, 0.0), 0.0, -1.0), ((0.0, 1.0), (0.0, -1.0), 0.0, -2.0)])


def test_terms_with_empty_boxes_or_false_constants_are_dropped():
    spec = read_vnnlib(declare(1, 1) + """
        (assert (or (and (>= X_0 2) (<= X_0 1) (<= Y_0 0))
                    (and (>= X_0 0) (<= X_0 1) (<= 1 0) (<= Y_0 0))
                    (and (>= X_0 0) (<= X_0 1) (<= 0 1) (<= Y_0 7))))""")
    (case,) = spec.cases
    assert [d.b.tolist() for d in case.disjuncts] == [[7.0]]
    empty = read_vnnlib(declare(1, 1) + "(assert (> X_0 1))(assert (<= X_0 1))(assert (<= Y_0 0))")
    assert empty.cases == ()  # no input at all: the property holds vacuously


def test_gzip_and_plain_files(tmp_path):
    text = declare(1, 1) + unit_box(1) + "(assert (<= Y_0 0.5))"
    (tmp_path / "p.vnnlib").write_text(text)
    (tmp_path / "p.vnnlib.gz").write_bytes(gzip.compress(text.encode()))
    for name in ("p.vnnlib", "p.vnnlib.gz"):
        spec = read_vnnlib(tmp_path / name)
        assert spec.source.endswith(name) and spec.cases[0].disjuncts[0].b.tolist() == [0.5]
    assert read_vnnlib(str(tmp_path / "p.vnnlib.gz"), n_inputs=1, n_outputs=1).n_inputs == 1


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("text, line, column, message", [
    (declare(2, 1) + "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 0))\n(assert (<= Y_0 0))",
     2, 16, "X_1 has no upper bound"),
    (declare(1, 1) + unit_box(1) + "(assert (<= Y_3 0))", 5, 13, "unknown variable 'Y_3'"),
    (declare(1, 1) + unit_box(1) + "(assert (<= Y_0 0.5.1))", 5, 17, "bad token '0.5.1'"),
    (declare(1, 1) + unit_box(1) + "(assert (<= Y_0 1)", 5, 1, "unbalanced '('"),
    (declare(1, 1) + unit_box(1) + "(assert (<= Y_0 1)))", 5, 20, "unbalanced ')'"),
    (declare(1, 1) + unit_box(1) + "(assert (<= Y_0 X_0))", 5, 9, "mixes inputs (X) and outputs (Y)"),
    (declare(2, 1) + unit_box(2) + "(assert (<= (+ X_0 X_1) 1))", 8, 9, "over 2 inputs"),
    (declare(1, 1) + unit_box(1) + "(assert (not (<= Y_0 1)))", 5, 10, "unknown operator 'not'"),
    (declare(1, 1) + unit_box(1) + "(assert (<= (/ Y_0 2) 1))", 5, 14, "unknown operator '/'"),
    (declare(1, 1) + unit_box(1) + "(assert (<= (* Y_0 Y_0) 1))", 5, 13, "not linear"),
    (declare(1, 1) + unit_box(1) + "(assert (<= (* 0.1 Y_0) 1))", 5, 9, "not exactly a float64"),
    (declare(1, 1) + unit_box(1) + "(check-sat)", 5, 1, "unknown command 'check-sat'"),
    (declare(1, 1) + "(declare-const X_0 Real)", 3, 16, "declared twice"),
    ("(declare-const X_0 Int)", 1, 20, "only Real"),
    ("(declare-const Z_0 Real)", 1, 16, "not X_<i>"),
    ("(declare-const X_0 Real)(declare-const X_2 Real)(declare-const Y_0 Real)", 1, 40, "X_1 is not declared"),
    (declare(1, 1) + unit_box(1) + "(assert (<= Y_0 1 2))", 5, 9, "takes two arguments"),
    (declare(1, 1) + unit_box(1) + "stray", 5, 1, "unexpected 'stray'"),
])
def test_errors_name_line_and_column(text, line, column, message):
    with pytest.raises(SpecError) as info:
        read_vnnlib(text)
    exc = info.value
    assert isinstance(exc, RobevalError) and message in str(exc)
    assert (exc.line, exc.column) == (line, column), str(exc)
    assert str(exc).startswith(f"<text>:{line}:{column}: ")


def test_dnf_cap():
    clause = "(or (<= Y_0 0) (<= Y_0 1) (<= Y_0 2) (<= Y_0 3))"
    text = declare(1, 1) + unit_box(1) + "(assert (and " + " ".join([clause] * 5) + "))"
    assert len(read_vnnlib(text, max_terms=4 ** 5).cases[0].disjuncts) == 4 ** 5
    with pytest.raises(SpecError, match=r"1,024 or more disjunctive-normal-form terms, more than max_terms=1,000"):
        read_vnnlib(text, max_terms=1000)
    # the cap is checked before expanding: 4^12 = 16.7M terms are refused at once
    huge = declare(1, 1) + unit_box(1) + "(assert (and " + " ".join([clause] * 12) + "))"
    with pytest.raises(SpecError, match="max_terms=100,000"):
        read_vnnlib(huge)


def test_sizes_are_checked_against_the_network():
    text = declare(3, 2) + unit_box(3) + "(assert (<= Y_0 Y_1))"
    with pytest.raises(SpecError, match=r"declares 3 inputs \(X_0 ... X_2\); the network has 4"):
        read_vnnlib(text, n_inputs=4)
    with pytest.raises(SpecError, match=r"declares 2 outputs .* the network has 10"):
        read_vnnlib(text, n_outputs=10)


def test_missing_files(tmp_path):
    with pytest.raises(SpecError, match="no such VNN-LIB file"):
        read_vnnlib(tmp_path / "nope.vnnlib")
    (tmp_path / "bad.vnnlib.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(SpecError, match="cannot be decompressed"):
        read_vnnlib(tmp_path / "bad.vnnlib.gz")


# ---------------------------------------------------------------------------- the shared benchmark files
def _files(folder: Path, pattern: str) -> list[Path]:
    if not folder.is_dir():
        pytest.skip(f"VNN-COMP benchmarks not found at {folder} (set ROBEVAL_SHARED to the shared folder)")
    return sorted(folder.glob(pattern))


def _reference_reading(path: Path):
    """An independent reading of the competition's robustness files: label, and X bounds as exact rationals."""
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode()
    label = int(re.search(r"label: (\d+)", text).group(1))
    lo, hi = {}, {}
    for op, i, c in re.findall(r"\(assert \((<=|>=) X_(\d+) ([-0-9.e]+)\)\)", text):
        (hi if op == "<=" else lo)[int(i)] = Fraction(c)
    return label, lo, hi


@pytest.mark.parametrize("folder, pattern", [(MNIST_FC / "vnnlib", "*.vnnlib.gz"), (VERIVITAL / "specs", "*/*.vnnlib")])
def test_competition_files(folder, pattern):
    files = _files(folder, pattern)
    assert files, f"no {pattern} in {folder}"
    for path in files[:: max(len(files) // 8, 1)]:
        spec = read_vnnlib(path, n_inputs=784, n_outputs=10)
        label, lo, hi = _reference_reading(path)
        (case,) = spec.cases
        assert len(case.disjuncts) == 9
        for d, j in zip(case.disjuncts, [j for j in range(10) if j != label]):
            # (>= Y_j Y_label): violated iff y_label - y_j <= 0
            assert d.A.tolist() == [list(numpy.eye(10)[label] - numpy.eye(10)[j])] and d.b.tolist() == [0.0]
        for i in range(784):
            assert Fraction(case.lo[i]) <= lo[i] <= Fraction(case.inner[0][i])
            assert Fraction(case.inner[1][i]) <= hi[i] <= Fraction(case.hi[i])
            assert case.hi[i] - case.inner[1][i] <= numpy.spacing(case.inner[1][i])  # at most one ulp apart
