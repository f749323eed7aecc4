"""A small, strict reader of VNN-LIB 1.0 properties (``.vnnlib`` or ``.vnnlib.gz``) into a ``Spec``.

Supported: ``;`` comments, ``(declare-const X_i Real)`` / ``(declare-const Y_j Real)``, and
``(assert F)`` where F nests ``and`` / ``or`` over atoms ``(<= s t)``, ``(>= s t)``, ``(< s t)``,
``(> s t)``, ``(= s t)`` of linear terms built with ``+``, ``-``, ``*`` and decimal or scientific
literals. The conjunction of the asserts is brought into disjunctive normal form (at most
``max_terms`` terms); in each term the input atoms must be bounds of single inputs and give every
X_i a lower and an upper bound, and the output atoms must be linear in Y alone.

Arithmetic is exact (``fractions.Fraction``) until the end, where each value is rounded in the sound
direction (see ``spec``): a literal such as 0.03, which no float64 equals, widens the outer box and
the unsafe output set by one ulp and narrows the inner box and ``b_inner`` by one ulp. PyPI's
``vnnlib`` package reads VNN-LIB 2.0 only (it rejects 1.0's ``declare-const``), hence this reader.

>>> spec = read_vnnlib("(declare-const X_0 Real)(declare-const Y_0 Real)"
...                    "(assert (>= X_0 0))(assert (<= X_0 1))(assert (<= Y_0 -0.5))")
>>> spec.cases[0].disjuncts[0].b.tolist()
[-0.5]
"""

from __future__ import annotations

import gzip
import itertools
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy

from ..errors import SpecError
from .spec import Case, Disjunct, Spec

#: Largest number of DNF terms a property may expand to.
MAX_TERMS = 100_000

_TOKEN = re.compile(r"\s+|;[^\n]*|\(|\)|[^\s();]+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_VAR = re.compile(r"([XY])_(0|[1-9]\d*)")
_COMPARE = {"<=": (1, False), "<": (1, True), ">=": (-1, False), ">": (-1, True)}


@dataclass
class _Sexp:
    value: Any  # str for an atom, list of _Sexp for a list
    pos: int


@dataclass
class _Lin:
    """An exact linear expression: coefficients per variable name, plus a constant."""

    coef: dict
    const: Fraction


def read_vnnlib(source: Any, n_inputs: int | None = None, n_outputs: int | None = None,
                max_terms: int = MAX_TERMS) -> Spec:
    """The property in a VNN-LIB file (path, optionally gzip-compressed) or text as a ``Spec``.

    Args:
        source: a path (``str`` or ``Path``) to ``.vnnlib`` / ``.vnnlib.gz``, or the VNN-LIB text itself.
        n_inputs, n_outputs: the network's flat input and output sizes, checked when given.
        max_terms: cap on the disjunctive normal form's size.
    Raises:
        SpecError: with file, line and column, for anything malformed or outside the supported subset.
    """
    text, name = _read_source(source)
    return _Reader(text, name, max_terms).run(n_inputs, n_outputs)


def _read_source(source: Any) -> tuple[str, str]:
    if isinstance(source, Path) or (isinstance(source, str) and "(" not in source and "\n" not in source):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise SpecError(f"no such VNN-LIB file: '{path}'; check the path")
        with open(path, "rb") as fh:
            data = fh.read()
        if data[:2] == b"\x1f\x8b":
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as exc:
                raise SpecError(f"gzip-compressed but cannot be decompressed ({exc})", path) from exc
        try:
            return data.decode("utf-8"), path
        except UnicodeDecodeError as exc:
            raise SpecError(f"not a text file (byte {exc.start} is not UTF-8)", path) from exc
    if isinstance(source, str):
        return source, "<text>"
    raise SpecError(f"cannot read a VNN-LIB property from a {type(source).__name__}; pass a path or the text")


class _Reader:
    def __init__(self, text: str, name: str, max_terms: int):
        self.text, self.name, self.max_terms = text, name, int(max_terms)
        self.declared: dict[str, int] = {}  # variable -> position of its declaration

    # ------------------------------------------------------------------ errors and positions
    def error(self, message: str, pos: int | None) -> SpecError:
        if pos is None:
            return SpecError(message, self.name)
        line = self.text.count("\n", 0, pos) + 1
        column = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return SpecError(message, self.name, line, column)

    # ------------------------------------------------------------------ s-expressions
    def sexps(self) -> list[_Sexp]:
        stack: list[list] = [[]]
        opened: list[int] = []
        for m in _TOKEN.finditer(self.text):
            tok, pos = m.group(), m.start()
            if tok[0].isspace() or tok[0] == ";":
                continue
            if tok == "(":
                stack.append([])
                opened.append(pos)
            elif tok == ")":
                if not opened:
                    raise self.error("unbalanced ')': no '(' is open here", pos)
                items = stack.pop()
                stack[-1].append(_Sexp(items, opened.pop()))
            else:
                stack[-1].append(_Sexp(tok, pos))
        if opened:
            raise self.error(f"unbalanced '(': {len(opened)} list(s) not closed by the end of the file", opened[-1])
        for item in stack[0]:
            if isinstance(item.value, str):
                raise self.error(f"unexpected '{item.value}' outside a command; commands look like "
                                 "(declare-const X_0 Real) or (assert ...)", item.pos)
        return stack[0]

    # ------------------------------------------------------------------ commands
    def run(self, n_inputs: int | None, n_outputs: int | None) -> Spec:
        commands = self.sexps()
        asserts = []
        for cmd in commands:
            head = self.head(cmd, "a command")
            if head == "declare-const":
                self.declare(cmd)
            elif head == "assert":
                if len(cmd.value) != 2:
                    raise self.error(f"assert takes one formula, got {len(cmd.value) - 1}", cmd.pos)
                asserts.append(cmd.value[1])
            else:
                raise self.error(f"unknown command '{head}'; VNN-LIB 1.0 has declare-const and assert", cmd.pos)
        nx, ny = self.counts(n_inputs, n_outputs)
        atoms: list[tuple] = []
        terms = self.conjoin([self.dnf(f, atoms) for f in asserts], commands[0].pos if commands else 0)
        return self.build(terms, atoms, nx, ny)

    def head(self, sexp: _Sexp, what: str) -> str:
        if isinstance(sexp.value, str):
            raise self.error(f"expected {what} in parentheses, got '{sexp.value}'", sexp.pos)
        if not sexp.value or not isinstance(sexp.value[0].value, str):
            raise self.error(f"expected {what} starting with an operator name", sexp.pos)
        return sexp.value[0].value

    def declare(self, cmd: _Sexp) -> None:
        parts = cmd.value
        if len(parts) != 3 or not all(isinstance(p.value, str) for p in parts[1:]):
            raise self.error("declare-const takes a name and a sort: (declare-const X_0 Real)", cmd.pos)
        name, sort = parts[1].value, parts[2].value
        if sort != "Real":
            raise self.error(f"variable '{name}' has sort '{sort}'; only Real is supported", parts[2].pos)
        if not _VAR.fullmatch(name):
            raise self.error(f"variable name '{name}' is not X_<i> (input) or Y_<j> (output)", parts[1].pos)
        if name in self.declared:
            raise self.error(f"variable '{name}' is declared twice", parts[1].pos)
        self.declared[name] = parts[1].pos

    def counts(self, n_inputs, n_outputs) -> tuple[int, int]:
        sizes = {}
        for kind, given, what in (("X", n_inputs, "inputs"), ("Y", n_outputs, "outputs")):
            idx = sorted(int(v[2:]) for v in self.declared if v[0] == kind)
            if not idx:
                raise self.error(f"no {what} declared; add (declare-const {kind}_0 Real) ...", None)
            n = idx[-1] + 1
            if len(idx) != n:
                gap = next(i for i in range(n) if i not in set(idx))
                raise self.error(f"{kind}_{gap} is not declared although {kind}_{n - 1} is; "
                                 f"{what} must be {kind}_0 ... {kind}_{n - 1}", self.declared[f"{kind}_{n - 1}"])
            if given is not None and int(given) != n:
                raise self.error(f"the property declares {n} {what} ({kind}_0 ... {kind}_{n - 1}); the network "
                                 f"has {given}: use the property written for this network", None)
            sizes[kind] = n
        return sizes["X"], sizes["Y"]

    # ------------------------------------------------------------------ formulas -> DNF
    def dnf(self, f: _Sexp, atoms: list) -> list[tuple[int, ...]]:
        """The formula as a list of terms, each a tuple of indices into ``atoms``."""
        op = self.head(f, "a formula such as (<= X_0 1) or (and ...)")
        args = f.value[1:]
        if op in ("and", "or"):
            if not args:
                raise self.error(f"'{op}' needs at least one argument", f.pos)
            parts = [self.dnf(a, atoms) for a in args]
            if op == "or":
                out = [t for p in parts for t in p]
                if len(out) > self.max_terms:
                    raise self.dnf_cap(len(out), f.pos)
                return out
            return self.conjoin(parts, f.pos)
        if op in _COMPARE or op == "=":
            if len(args) != 2:
                raise self.error(f"'{op}' takes two arguments, got {len(args)}", f.pos)
            lhs, rhs = self.term(args[0]), self.term(args[1])
            diff = _Lin({k: lhs.coef.get(k, 0) - rhs.coef.get(k, 0) for k in lhs.coef.keys() | rhs.coef.keys()},
                        lhs.const - rhs.const)
            ops = ("<=", ">=") if op == "=" else (op,)
            for o in ops:
                atoms.append(self.atom(diff, o, f.pos))
            return [tuple(range(len(atoms) - len(ops), len(atoms)))]
        raise self.error(f"unknown operator '{op}' in a formula; supported: and, or, <=, >=, <, >, =",
                         f.value[0].pos)

    def conjoin(self, parts: list[list[tuple]], pos: int) -> list[tuple[int, ...]]:
        common = tuple(i for p in parts if len(p) == 1 for i in p[0])
        multi = [p for p in parts if len(p) != 1]
        size = 1
        for p in multi:
            size *= len(p)
            if size > self.max_terms:
                raise self.dnf_cap(size, pos)
        return [common + tuple(i for t in combo for i in t) for combo in itertools.product(*multi)]

    def dnf_cap(self, size: int, pos: int) -> SpecError:
        return self.error(f"the property expands to {size:,} or more disjunctive-normal-form terms, more than "
                          f"max_terms={self.max_terms:,}; split it into several properties", pos)

    def term(self, t: _Sexp) -> _Lin:
        if isinstance(t.value, str):
            tok = t.value
            if _NUMBER.fullmatch(tok):
                return _Lin({}, Fraction(tok))
            if tok in self.declared:
                return _Lin({tok: Fraction(1)}, Fraction(0))
            if _VAR.fullmatch(tok):
                raise self.error(f"unknown variable '{tok}': it is not declared", t.pos)
            raise self.error(f"bad token '{tok}': expected a number or a declared variable", t.pos)
        op = self.head(t, "a term")
        args = [self.term(a) for a in t.value[1:]]
        if not args:
            raise self.error(f"'{op}' needs at least one argument", t.pos)
        if op == "+" or (op == "-" and len(args) > 1):
            sign = [1] + [1 if op == "+" else -1] * (len(args) - 1)
            coef: dict = {}
            for s, a in zip(sign, args):
                for k, v in a.coef.items():
                    coef[k] = coef.get(k, 0) + s * v
            return _Lin(coef, sum((s * a.const for s, a in zip(sign, args)), Fraction(0)))
        if op == "-":
            return _Lin({k: -v for k, v in args[0].coef.items()}, -args[0].const)
        if op == "*":
            out = args[0]
            for a in args[1:]:
                if out.coef and a.coef:
                    raise self.error("'*' of two variable terms is not linear; VNN-LIB 1.0 properties are "
                                     "linear", t.pos)
                scale, lin = (a.const, out) if not a.coef else (out.const, a)
                out = _Lin({k: v * scale for k, v in lin.coef.items()}, lin.const * scale)
            return out
        raise self.error(f"unknown operator '{op}' in a term; supported: +, -, *", t.value[0].pos)

    def atom(self, diff: _Lin, op: str, pos: int) -> tuple:
        """('in', var, is_upper, value, strict) | ('out', {j: a}, b, strict) | ('const', truth), for
        ``diff op 0`` written as sign * diff <= 0 (or < 0)."""
        sign, strict = _COMPARE[op]
        coef = {k: sign * v for k, v in diff.coef.items() if v != 0}
        rhs = -sign * diff.const  # sum coef * v (<|<=) rhs
        kinds = {k[0] for k in coef}
        if not coef:
            return ("const", 0 < rhs if strict else 0 <= rhs)
        if kinds == {"X", "Y"}:
            raise self.error("this constraint mixes inputs (X) and outputs (Y); VNN-LIB 1.0 properties bound "
                             "inputs and constrain outputs in separate atoms", pos)
        if kinds == {"X"}:
            if len(coef) != 1:
                raise self.error(f"input constraint over {len(coef)} inputs ({', '.join(sorted(coef))}); only "
                                 "bounds of single inputs (X_i <= c, X_i >= c) are supported", pos)
            (name, a), = coef.items()
            return ("in", int(name[2:]), a > 0, rhs / a, strict)
        for name, a in coef.items():
            if Fraction(float(a)) != a:
                raise self.error(f"output coefficient {float(a)!r} of {name} is not exactly a float64 (it is "
                                 f"{a}); write the constraint with binary-exact coefficients", pos)
        return ("out", {int(k[2:]): float(a) for k, a in coef.items()}, rhs, strict)

    # ------------------------------------------------------------------ DNF terms -> cases
    def build(self, terms: list[tuple[int, ...]], atoms: list[tuple], nx: int, ny: int) -> Spec:
        boxes: dict[frozenset, tuple | None] = {}
        cases: dict[bytes, tuple] = {}
        for term in terms:
            if any(atoms[i][0] == "const" and not atoms[i][1] for i in term):
                continue  # a false constant atom: the term is empty
            ins = frozenset(i for i in term if atoms[i][0] == "in")
            if ins not in boxes:
                boxes[ins] = self.box(sorted(ins), atoms, nx)
            box = boxes[ins]
            if box is None:
                continue  # empty input box: nothing to violate
            key = b"".join(a.tobytes() for a in box)
            disjunct = self.disjunct([atoms[i] for i in term if atoms[i][0] == "out"], ny)
            cases.setdefault(key, (box, []))[1].append(disjunct)
        built = tuple(Case(lo, hi, tuple(ds), inner=(ilo, ihi)) for (lo, hi, ilo, ihi), ds in cases.values())
        return Spec(built, nx, ny, self.name)

    def box(self, ins: list[int], atoms: list[tuple], nx: int):
        """(lo, hi, inner lo, inner hi) of one term's input atoms, or None when the box is empty."""
        lower: list = [None] * nx
        upper: list = [None] * nx
        for i in ins:
            _, var, is_upper, value, strict = atoms[i]
            bounds = upper if is_upper else lower
            old = bounds[var]
            tighter = old is None or (value < old[0] if is_upper else value > old[0])
            bounds[var] = (value, strict) if tighter else (old[0], old[1] or (strict and value == old[0]))
        for var in range(nx):
            for bounds, what in ((lower, "lower"), (upper, "upper")):
                if bounds[var] is None:
                    raise self.error(f"input X_{var} has no {what} bound in this property (every input needs "
                                     f"both, e.g. (assert (>= X_{var} 0)) and (assert (<= X_{var} 1)))",
                                     self.declared.get(f"X_{var}"))
        if any(lo[0] > hi[0] or (lo[0] == hi[0] and (lo[1] or hi[1])) for lo, hi in zip(lower, upper)):
            return None
        arrays = numpy.empty((4, nx))
        for var in range(nx):
            (lv, ls), (hv, hs) = lower[var], upper[var]
            ldown, lup = self.bracket(lv)
            hdown, hup = self.bracket(hv)
            arrays[0, var], arrays[1, var] = ldown, hup
            arrays[2, var] = numpy.nextafter(lup, numpy.inf) if ls and ldown == lup else lup
            arrays[3, var] = numpy.nextafter(hdown, -numpy.inf) if hs and hdown == hup else hdown
        return tuple(arrays)

    def disjunct(self, outs: list[tuple], ny: int) -> Disjunct:
        A = numpy.zeros((len(outs), ny))
        b, b_inner, strict = numpy.empty(len(outs)), numpy.empty(len(outs)), numpy.zeros(len(outs), bool)
        for r, (_, coef, rhs, s) in enumerate(outs):
            for j, a in coef.items():
                A[r, j] = a
            b_inner[r], b[r] = self.bracket(rhs)
            strict[r] = s
        return Disjunct(A, b, strict, b_inner)

    def bracket(self, q: Fraction) -> tuple[float, float]:
        """(down, up): the float64 neighbours of the rational q (equal when q is a float64)."""
        try:
            f = q.numerator / q.denominator  # correctly rounded
        except OverflowError:
            f = float("inf")
        if abs(f) == float("inf"):
            digits = len(str(abs(q.numerator // q.denominator)))
            raise self.error(f"a bound or constant of about 10^{digits - 1} is outside the float64 range", None)
        exact = Fraction(f)
        if exact == q:
            return f, f
        return (f, float(numpy.nextafter(f, numpy.inf))) if exact < q else (float(numpy.nextafter(f, -numpy.inf)), f)
