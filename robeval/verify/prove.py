"""Prove one case of a specification: no point of its input box satisfies any of its disjuncts.

A disjunct (rows a_r . y <= b_r, all at once) is impossible on the box when one of its rows is: when
a sound lower bound of a_r . f(x) - b_r is > 0 (>= 0 for a strict row). Stages, each on the rows the
previous one left open: CROWN; alpha-CROWN (slopes optimised per row); branch and bound with
beta-CROWN (``robeval.verify.bab``). alpha and BaB need a chain network (``robeval.verify.alpha``);
other networks stop after CROWN with 'unknown'. Every verdict comes from the rigorous engine."""

from __future__ import annotations

import math
import time

import numpy

from .alpha import Chain, NotAChain, optimised_rows, tighten_intermediate
from .bab import BabSettings, Domains, replayed_corner, run_bab
from .bounds import as_verification_network, box_bounds, spec_lower
from .tighten import bab_intermediate


def _rows(case):
    """Every row of every disjunct: A (R, K), c = -b (R,), strict (R,), disjunct index (R,)."""
    A, c, strict, owner = [], [], [], []
    for d, dis in enumerate(case.disjuncts):
        A.append(numpy.asarray(dis.A, dtype=numpy.float64))
        c.append(-numpy.asarray(dis.b, dtype=numpy.float64))
        strict.append(numpy.asarray(dis.strict, dtype=bool))
        owner.append(numpy.full(len(dis.b), d))
    return numpy.concatenate(A), numpy.concatenate(c), numpy.concatenate(strict), numpy.concatenate(owner)


def _worst_margin(lower, owner, todo) -> float:
    """The least, over the disjuncts ``todo``, of the best row bound: > 0 once every one is proven."""
    return float(min(lower[owner == d].max() for d in todo))


def _proven(lower, strict):
    return (lower > 0) | (strict & (lower >= 0))


class _CrownStage:
    """CROWN on one case's box and rows: the float64 network, the box, the rows, the root bounds and
    which rows CROWN proves."""

    def __init__(self, net, case):
        self.net = net = as_verification_network(net)
        shape = (1,) + tuple(net.input_shape)
        self.lo = numpy.asarray(case.lo, dtype=numpy.float64).reshape(shape)
        self.hi = numpy.asarray(case.hi, dtype=numpy.float64).reshape(shape)
        self.A, self.c, self.strict, self.owner = _rows(case)
        self.root = box_bounds(net, self.lo, self.hi)
        self.proven_rows = _proven(spec_lower(self.root, self.A, self.c)[0], self.strict)

    def holds(self) -> bool:
        """Every disjunct has a row CROWN proves impossible on the box."""
        done = numpy.zeros(int(self.owner.max()) + 1 if len(self.owner) else 0, dtype=bool)
        numpy.logical_or.at(done, self.owner, self.proven_rows)
        return bool(done.all())


def crown_case(net, case) -> tuple[str, dict]:
    """CROWN alone on one case (the cheap first proof attempt): ('unsat', details) when it proves
    every disjunct impossible on the box, else ('unknown', details)."""
    start = time.perf_counter()
    if not case.disjuncts or any(len(d.b) == 0 for d in case.disjuncts):
        return "unknown", {"stage": "crown", "time": 0.0}
    stage = _CrownStage(net, case)
    status = "unsat" if stage.holds() else "unknown"
    return status, {"stage": "crown", "rows": int(len(stage.c)), "disjuncts": len(case.disjuncts),
                    "crown_proven_rows": int(stage.proven_rows.sum()), "time": time.perf_counter() - start}


#: Seconds between two progress lines of the branch and bound search (its first round always reports).
PROGRESS_EVERY = 10.0


def _bab_reporter(say):
    """run_bab's per-round callback, as at most one ``say`` line per ``PROGRESS_EVERY`` seconds."""
    last = [-math.inf]

    def report(outcome, open_domains):
        now = time.perf_counter()
        if now - last[0] >= PROGRESS_EVERY:
            last[0] = now
            say(f"branch and bound: round {outcome.rounds}, {outcome.domains_bounded} domains "
                f"bounded, {open_domains} open, lowest bound {outcome.lowest:.4g}")
    return report


def _root_domains(chain, root, A, c, rows, alpha, lower) -> Domains:
    """The rows as unsplit domains over the root's bounds (zero splits and multipliers)."""
    def zeros():
        return {relu: numpy.zeros((len(rows),) + root.bounds[chain.relu_input[relu]][0].shape[1:])
                for relu in chain.relus}
    return Domains(A, c, rows, zeros(), alpha, zeros(), lower)


def _corner_counterexample(net, chain, root, A, c, rows, alpha, lower, check):
    """A box corner where a row's relaxation attains its minimum, when the network violates the row
    there and ``check`` (the replay) accepts it; else None. Tighter hidden-layer bounds move the
    relaxation's minimiser to where the network is low: on mnist_fc 256x6 ``prop_1_0.05`` (a sat
    the falsifier misses from 4,500 starts), in one run the corner after the fifth pass violated
    the property and branch and bound never found a point (timeout)."""
    if check is None:
        return None
    return replayed_corner(net, chain, _root_domains(chain, root, A, c, rows, alpha, lower), check)


def prove_case(net, case, deadline: float = math.inf, check=None, settings: BabSettings | None = None,
               progress=None) -> tuple[str, dict]:
    """('unsat' | 'sat' | 'unknown' | 'timeout', details) for one case (``deadline``: a
    ``time.perf_counter()`` value). 'sat' only when ``check(x)`` (a replay of the candidate point
    ``x``, flat) accepted a box corner where a relaxation attains its minimum (after alpha-CROWN,
    after each hidden-layer pass, at branch-and-bound leaves); details then hold it under 'x'.
    ``progress(text)``: gets a line after each stage, each hidden-layer pass, and every
    ``PROGRESS_EVERY`` seconds of branch and bound (the worst bound over the open disjuncts: the
    property is proven once it is > 0).

    details: 'stage' that decided, 'rows' and 'proven' per stage, BaB 'rounds' and 'domains'."""
    settings = settings or BabSettings()
    start = time.perf_counter()
    say = progress or (lambda text: None)
    if any(len(d.b) == 0 for d in case.disjuncts):  # no output condition: every box point is unsafe
        return "unknown", {"stage": "none", "note": "a disjunct has no output constraint; nothing to prove",
                           "time": 0.0}
    stage = _CrownStage(net, case)
    net, lo, hi, root, proven_rows = stage.net, stage.lo, stage.hi, stage.root, stage.proven_rows
    A, c, strict, owner = stage.A, stage.c, stage.strict, stage.owner
    details = {"rows": int(len(c)), "disjuncts": len(case.disjuncts), "crown_proven_rows": int(proven_rows.sum())}

    def open_disjuncts():
        done = numpy.zeros(len(case.disjuncts), dtype=bool)
        numpy.logical_or.at(done, owner, proven_rows)
        return numpy.nonzero(~done)[0]

    todo = open_disjuncts()
    if not len(todo):
        return "unsat", {**details, "stage": "crown", "time": time.perf_counter() - start}
    try:
        chain = Chain(net, root.bounds, lo, hi, settings.dtype)
    except NotAChain as exc:
        details["note"] = f"alpha-CROWN and branch and bound need a chain network: {exc}"
        return "unknown", {**details, "stage": "crown", "time": time.perf_counter() - start}
    if time.perf_counter() > deadline:
        return "timeout", {**details, "stage": "crown", "time": time.perf_counter() - start}
    def alpha_stage(key):
        """alpha-CROWN over root's bounds: intermediate layers first (they limit everything after),
        then the open rows; ``details[key]``: rows proven so far."""
        details["stabilised"] = details.get("stabilised", 0) + tighten_intermediate(
            net, root, lo, hi, settings.intermediate_iterations, deadline, settings.lr_alpha)
        rows = numpy.nonzero(numpy.isin(owner, todo) & ~proven_rows)[0]
        chain, alpha, lower = optimised_rows(net, root, lo, hi, A[rows], c[rows], settings.root_iterations,
                                             settings.lr_alpha, deadline, settings.dtype)
        proven_rows[rows] = _proven(lower, strict[rows])
        details[key] = int(proven_rows.sum())
        return rows, chain, alpha, lower

    def corner_found(stage_name):
        x = _corner_counterexample(net, chain, root, A[rows], c[rows], rows, alpha, lower_a, check)
        if x is None:
            return None
        return "sat", {**details, "stage": stage_name, "x": x, "time": time.perf_counter() - start}

    rows, chain, alpha, lower_a = alpha_stage("alpha_proven_rows")
    say(f"alpha-CROWN: {details['stabilised']} neurons stabilised, worst bound "
        f"{_worst_margin(lower_a, owner[rows], todo):.4g}")
    todo = open_disjuncts()
    if not len(todo):
        return "unsat", {**details, "stage": "alpha-crown", "time": time.perf_counter() - start}
    found = corner_found("alpha-crown")
    if found:
        return found
    if settings.tighten and len(chain.relus) > 2:
        # hidden-layer bounds by branch and bound on the prefixes, then alpha-CROWN again on them (the
        # layers after those tightened were bounded over the old bounds), in rounds of doubling length
        # (each resumes the searches of the one before) until the property is proven, a round gains
        # too little, or tighten_fraction of the time is spent: easy cases end early
        end = time.perf_counter() + settings.tighten_fraction * (deadline - time.perf_counter())
        span, details["tightened"], searches = settings.tighten_first, [], {}
        while time.perf_counter() < end - 0.1 * span:
            report = bab_intermediate(net, root, lo, hi, min(end, time.perf_counter() + span), settings,
                                      searches=searches)
            details["tightened"].append(report)
            rows, chain, alpha, lower_a = alpha_stage("tightened_proven_rows")
            details.setdefault("tightened_margin", []).append(_worst_margin(lower_a, owner[rows], todo))
            say(f"hidden layers pass {len(details['tightened'])}: "
                f"{sum(r['stabilised'] for r in report.values())} neurons stabilised, worst bound "
                f"{details['tightened_margin'][-1]:.4g}")
            todo = open_disjuncts()
            if not len(todo):
                return "unsat", {**details, "stage": "tightened", "time": time.perf_counter() - start}
            found = corner_found("tightened")
            if found:
                return found
            margins = details["tightened_margin"]
            if len(margins) > 1 and margins[-1] - margins[-2] <= settings.tighten_gain * -margins[-2]:
                break  # the property's bound gained too little in this round: the search gets the rest
            span *= 2
    # BaB on one row per open disjunct: the row whose alpha bound is the largest
    picks, keep = [], numpy.nonzero(numpy.isin(rows, numpy.nonzero(numpy.isin(owner, todo))[0]))[0]
    for d in todo:
        mine = keep[owner[rows[keep]] == d]
        picks.append(mine[numpy.argmax(lower_a[mine])])
    picks = numpy.asarray(picks)
    sel = rows[picks]
    doms = _root_domains(chain, root, A[sel], c[sel], sel, {k: v[picks] for k, v in alpha.items()}, lower_a[picks])
    outcome = run_bab(net, chain, root, lo, hi, doms, deadline, settings, strict, check,
                      _bab_reporter(say) if progress else None)
    details.update(stage="bab", rounds=outcome.rounds, domains=outcome.domains_bounded, max_open=outcome.max_open,
                   leaf_lps=outcome.leaf_lps, empty=outcome.empty, open=outcome.open, open_lowest=outcome.lowest,
                   time=time.perf_counter() - start)
    if outcome.status == "sat":
        details["x"] = outcome.counterexample
    return outcome.status, details


__all__ = ["PROGRESS_EVERY", "crown_case", "prove_case"]
