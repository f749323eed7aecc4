"""Branch and bound over ReLU splits (BaB with beta-CROWN bounds, Wang et al. 2021), batched.

Each specification row to prove (c + a . f(x) > 0 over the box) starts as one domain. A domain that
the bound does not prove is split on one unstable ReLU (h >= 0 / h <= 0): its two children cover
it, so proving every leaf proves the row. Children are bounded many at once (the domain axis is the
batch axis of both engines): alpha and beta are optimised by the chain engine from the parent's
values, then the rigorous engine (``bounds.domain_lower``) bounds each child with them; only its
verdict counts. Each child's intermediate bounds are recomputed by the rigorous engine under its
splits (``bounds.refine_bounds``: a split neuron is exactly linear on its side, so neurons after it
stabilise), starting from its parent's and never looser; with ``refine=False`` every domain keeps
the whole box's bounds, clamped by its splits.

The box corner that attains each leaf's relaxed minimum is kept: when the network itself violates
the row there, it is a candidate counterexample (replayed by the caller before anything is said)."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy

from ..certifiers.crown import bound_targets, serial_blas, thread_count
from ..ir.registry import get_op
from .alpha import Chain, optimise
from .bounds import domain_lower, exact_float32, refine_bounds
from .domains import DomainPool, Domains


@dataclass
class BabSettings:
    """batch: domains split per round (2 x batch children bounded at once); iterations: optimiser
    steps per round; max_domains: the most open domains kept (beyond it: 'unknown'); candidates:
    neurons tried per domain when choosing a split (1: the best-scored one, no trial); dtype: the
    optimiser's arithmetic (verdicts are always recomputed in float64 by the rigorous engine);
    refine: recompute each child's intermediate bounds under its splits (``bounds.refine_bounds``;
    rigorous, in float32 when ``dtype`` is and the network's parameters are float32 values), else
    every domain keeps the root's; bounds_memory_mb: the most memory the domains' own bounds
    may take (it lowers max_domains when they are large); tighten: before the search, tighten the
    root's bounds of the hidden layers after the first by branch and bound on the network's prefix
    (``robeval.verify.tighten``), in rounds of ``tighten_first`` seconds, then twice as long each
    time (each round resumes the previous one's searches), until the property is proven, a round
    raises the property's worst bound by less than ``tighten_gain`` of its shortfall, or
    ``tighten_fraction`` of the time left is spent;
    tighten_stall > 0 ends a layer early once its bounds improve by less than that fraction of their
    first shortfall per second (0: off; bounds that creep up still stabilise neurons late); workers:
    threads that split and bound parts of a round's domains at once (0: one per core, as
    ``robeval.certifiers.crown.thread_count``; NumPy releases the GIL in the large products)."""

    batch: int = 256
    iterations: int = 15
    root_iterations: int = 60
    intermediate_iterations: int = 30
    max_domains: int = 50_000
    candidates: int = 16
    lr_alpha: float = 0.1
    lr_beta: float = 0.05
    dtype: str = "float32"
    refine: bool = True
    bounds_memory_mb: float = 2048.0
    tighten: bool = True
    tighten_fraction: float = 0.5
    tighten_first: float = 4.0
    tighten_stall: float = 0.0
    tighten_gain: float = 0.01
    workers: int = 0


@dataclass
class BabOutcome:
    """status: 'unsat' (every row proven), 'sat' (``check`` accepted ``counterexample``), 'unknown'
    (a leaf cannot be split further, or too many domains) or 'timeout'; empty: children whose
    refined bounds showed they hold no point (proven without a bound); open, lowest: the open
    domains after the last round and their lowest bound (progress of an unfinished search)."""

    status: str
    rounds: int = 0
    domains_bounded: int = 0
    max_open: int = 0
    leaf_lps: int = 0
    empty: int = 0
    open: int = 0
    lowest: float = math.nan
    counterexample: Any = None


def branch_scores(chain: Chain, lam: dict, splits: dict) -> dict:
    """Per ReLU (N, *shape): |lam| times the triangle relaxation's height -lo hi / (hi - lo); -1 where
    the neuron is stable or split (nothing to split there)."""
    scores = {}
    for relu in chain.relus:
        lo, hi = chain.pre_bounds(relu, splits)
        unstable = (lo < 0) & (hi > 0)
        height = numpy.where(unstable, -lo * hi / numpy.where(unstable, hi - lo, 1.0), 0.0)
        scores[relu] = numpy.where(unstable, numpy.abs(lam[relu]) * height, -1.0)
    return scores


MIN_PART = 16  # the fewest domains worth a thread of their own


def in_parts(workers: int, n: int, fn) -> list:
    """``fn(part)`` for contiguous slices ``part`` of range(n), up to ``workers`` of them at once in
    threads (one slice, in this thread, when n is small); the results in slice order."""
    workers = thread_count(numpy) if workers <= 0 else workers
    k = max(1, min(workers, n // MIN_PART))
    if k == 1:
        return [fn(slice(0, n))]
    cuts = numpy.linspace(0, n, k + 1).astype(int)
    with serial_blas(numpy), ThreadPoolExecutor(k) as pool:
        return list(pool.map(fn, [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]))


def split_choices(chain: Chain, doms: Domains, settings: BabSettings):
    """``choose_splits`` on each domain over its own bounds, in parts (``in_parts``)."""
    def part(s):
        sub = doms.take(s)
        return choose_splits(chain.with_bounds(sub.bounds), sub, settings.candidates)

    parts = in_parts(settings.workers, len(doms), part)
    return numpy.concatenate([p[0] for p in parts]), numpy.concatenate([p[1] for p in parts])


def choose_splits(chain: Chain, doms: Domains, candidates: int = BabSettings.candidates):
    """(relu index, flat neuron index) per domain; relu -1 where nothing is left to split.

    Filtered smart branching (De Palma et al. 2021, as in alpha-beta-CROWN): the ``candidates``
    neurons with the largest ``branch_scores`` are each tried, both children bounded with the
    parent's parameters (no optimisation), and the one whose worse child is best is chosen."""
    result = chain.evaluate(doms.A, doms.c, doms.alpha, doms.beta, doms.splits, need_grad=False)
    scores = branch_scores(chain, result.lam, doms.splits)
    n = len(doms)
    flat = numpy.concatenate([scores[r].reshape(n, -1) for r in chain.relus], axis=1)
    sizes = [scores[r][0].size for r in chain.relus]
    offsets = numpy.cumsum([0] + sizes)
    k = max(1, min(candidates, flat.shape[1]))
    top = numpy.argsort(-flat, axis=1)[:, :k]  # (n, k) best first
    valid = numpy.take_along_axis(flat, top, axis=1) >= 0
    layer = numpy.searchsorted(offsets, top, side="right") - 1
    neuron = top - offsets[layer]
    if k == 1:
        return numpy.where(valid[:, 0], layer[:, 0], -1), neuron[:, 0]
    worst = numpy.full((n, k), -numpy.inf)
    for j in range(k):
        kids = children(doms, chain, layer[:, j], neuron[:, j])
        bound = chain.with_bounds(kids.bounds).evaluate(kids.A, kids.c, kids.alpha, kids.beta, kids.splits,
                                                        need_grad=False).bound
        worst[:, j] = numpy.where(valid[:, j], numpy.minimum(bound[:n], bound[n:]), -numpy.inf)
    pick = worst.argmax(axis=1)
    rows = numpy.arange(n)
    return numpy.where(valid[rows, pick], layer[rows, pick], -1), neuron[rows, pick]


def children(doms: Domains, chain: Chain, which, index) -> Domains:
    """Two children per domain: the chosen neuron fixed active (+1) and inactive (-1); beta of the new
    split starts at 0, everything else is inherited."""
    n = len(doms)
    kids = doms.take(numpy.concatenate([numpy.arange(n), numpy.arange(n)]))
    kids.splits = {k: v.copy() for k, v in kids.splits.items()}
    kids.beta = {k: v.copy() for k, v in kids.beta.items()}
    sign = numpy.concatenate([numpy.ones(n), -numpy.ones(n)])
    rows = numpy.arange(2 * n)
    w2, i2 = numpy.concatenate([which, which]), numpy.concatenate([index, index])
    for k, relu in enumerate(chain.relus):
        sel = w2 == k
        if sel.any():
            flat = kids.splits[relu].reshape(2 * n, -1)
            flat[rows[sel], i2[sel]] = sign[sel]
            kids.beta[relu].reshape(2 * n, -1)[rows[sel], i2[sel]] = 0.0
    return kids


def _root_bounds(chain: Chain, n: int) -> dict:
    """The root's bounds of every node a nonlinear op reads, repeated for n domains."""
    return {name: tuple(numpy.repeat(a, n, axis=0) for a in chain.bounds[name]) for name in bound_targets(chain.net)}


def _domain_cap(chain: Chain, settings: BabSettings) -> int:
    """max_domains, lowered so that the domains' own node bounds fit in ``bounds_memory_mb``."""
    if not settings.refine:
        return settings.max_domains
    per_domain = sum(2 * 8 * chain.bounds[name][0][0].size for name in bound_targets(chain.net))
    return max(1, min(settings.max_domains, int(settings.bounds_memory_mb * 2**20 // max(per_domain, 1))))


def refine_children(net, chain: Chain, root, lo, hi, kids: Domains, which, fast=None):
    """Recompute the children's node bounds in place, in groups by the layer of their new split:
    only the layers after it change (a split in the last ReLU layer changes none). Returns which
    children are empty."""
    empty = numpy.zeros(len(kids), dtype=bool)
    for layer in numpy.unique(which):
        at = numpy.nonzero(which == layer)[0]
        after = chain.relu_input[chain.relus[int(layer)]]
        if after == bound_targets(chain.net)[-1]:
            continue
        group = kids.take(at)
        bounds, empty[at] = refine_bounds(net, root, lo, hi, group.splits, chain.relu_input, group.bounds, after,
                                          fast)
        for name, (blo, bhi) in bounds.items():
            kids.bounds[name][0][at], kids.bounds[name][1][at] = blo, bhi
    return empty


def bound_children(net, chain: Chain, root, lo, hi, parents: Domains, which, index, settings: BabSettings,
                   deadline: float, fast=None):
    """``bound_one_part`` over parts of the parents at once (``in_parts``): (children, empty)."""
    def part(s):
        return bound_one_part(net, chain, root, lo, hi, parents.take(s), which[s], index[s], settings, deadline, fast)

    parts = in_parts(settings.workers, len(parents), part)
    return Domains.concat([k for k, _ in parts]), sum(e for _, e in parts)


def bound_one_part(net, chain: Chain, root, lo, hi, parents: Domains, which, index, settings: BabSettings,
                   deadline: float, fast=None):
    """The two children of each parent split at (which, index), bounded: (children not proven
    empty, how many were). Their node bounds are refined under the splits (``settings.refine``),
    alpha and beta optimised from the parent's, and each bound is the larger of the rigorous one and
    the parent's (a child lies inside its parent; with other intermediate bounds and lines its own can
    come out lower). Past ``deadline`` the children keep their parent's bound (still sound)."""
    kids = children(parents, chain, which, index)
    empty = 0
    if settings.refine:
        gone = refine_children(net, chain, root, lo, hi, kids, numpy.concatenate([which, which]), fast)
        empty = int(gone.sum())
        kids = kids.take(numpy.nonzero(~gone)[0])
    if len(kids):
        view = chain.with_bounds(kids.bounds)
        kids.alpha, kids.beta, _ = optimise(view, kids.A, kids.c, kids.alpha, kids.beta, kids.splits,
                                            settings.iterations, settings.lr_alpha, settings.lr_beta, deadline=deadline)
        if time.perf_counter() <= deadline:
            kids.bound = numpy.maximum(kids.bound, domain_lower(net, root, lo, hi, kids.A, kids.c, kids.alpha,
                                                                kids.beta, kids.splits, chain.relu_input,
                                                                kids.bounds))
    return kids, empty


def run_bab(net, chain: Chain, root, lo, hi, doms: Domains, deadline: float, settings: BabSettings,
            strict_rows=None, check=None, progress=None) -> BabOutcome:
    """Split and bound until every domain is proven (bound > 0; >= 0 where strict_rows[row]).

    ``check(x)``: called on box points (flat) where the network violates a leaf's row; True (a
    replayed counterexample) ends the search with status 'sat'."""
    out = BabOutcome("unsat", max_open=len(doms))
    strict_rows = numpy.zeros(int(doms.row.max()) + 1, dtype=bool) if strict_rows is None else strict_rows
    if settings.refine and not doms.bounds:
        doms.bounds = _root_bounds(chain, len(doms))
    cap = _domain_cap(chain, settings)
    fast = exact_float32(net) if settings.refine and settings.dtype == "float32" else None
    pool = DomainPool(doms)
    per_parent = 0.0  # seconds the last round took per parent domain: rounds are sized to end in time
    while len(pool):
        now = time.perf_counter()
        batch = settings.batch
        if per_parent > 0:
            batch = min(batch, int((deadline - now) / per_parent))
        if now > deadline or batch < 1:
            out.status = "timeout"
            return out
        if len(pool) > cap:
            out.status = "unknown"
            return out
        parents = pool.pop_lowest(batch)
        which, index = split_choices(chain, parents, settings)
        if time.perf_counter() > deadline:  # each step of a round can take seconds on a conv net
            out.status = "timeout"
            return out
        if (which < 0).any():  # every neuron fixed: the network is affine there, an LP decides it
            leaves = numpy.nonzero(which < 0)[0]
            for i in leaves:
                leaf = parents.take([i])
                verdict, x = leaf_lp(net, chain.with_bounds(leaf.bounds), root, lo, hi, leaf)
                out.leaf_lps += 1
                if verdict == "sat" and check is not None and check(x):
                    out.status, out.counterexample = "sat", x
                    return out
                if verdict != "unsat":
                    out.status = "unknown"
                    return out
            keep = numpy.nonzero(which >= 0)[0]
            parents, which, index = parents.take(keep), which[keep], index[keep]
            if not len(parents):
                continue
        kids, empty = bound_children(net, chain, root, lo, hi, parents, which, index, settings, deadline, fast)
        out.empty += empty
        if time.perf_counter() > deadline:
            out.status = "timeout"
            return out
        out.rounds += 1
        out.domains_bounded += 2 * len(parents)
        per_parent = (time.perf_counter() - now) / len(parents)
        strict = strict_rows[kids.row]
        proven = (kids.bound > 0) | (strict & (kids.bound >= 0))
        open_kids = kids.take(numpy.nonzero(~proven)[0])
        if len(open_kids) and check is not None:
            x = replayed_corner(net, chain.with_bounds(open_kids.bounds), open_kids, check)
            if x is not None:
                out.status, out.counterexample = "sat", x
                return out
        pool.push(open_kids)
        if not len(pool):
            return out
        out.max_open = max(out.max_open, len(pool))
        out.open, out.lowest = len(pool), pool.lowest()
        if progress is not None:
            progress(out, len(pool))
    return out


def affine_pieces(net, chain: Chain, pattern: dict):
    """Exact affine maps (G, g) with node = G^T x + g over the subdomain, for every chain node, when
    each ReLU's pattern (1 active, 0 inactive per neuron) is fixed; None if another nonlinear op occurs."""
    d = int(chain.lo.shape[1])
    G = numpy.eye(d).reshape((d,) + tuple(net.input_shape))
    g = numpy.zeros((1,) + tuple(net.input_shape))
    maps = {}
    for node in chain.nodes:
        op = get_op(node.op)
        if op.affine:
            G, g = op.linear(numpy, node, G), op.linear(numpy, node, g)
            bias = chain._bias[node.name]
            if bias is not None:
                g = g + bias
        elif node.op == "relu":
            G, g = G * pattern[node.name], g * pattern[node.name]
        else:
            return None
        maps[node.name] = (G.reshape(d, -1), g.reshape(-1))
    return maps


def leaf_lp(net, chain: Chain, root, lo, hi, dom: Domains):
    """Decide one domain whose ReLUs are all fixed (stable or split): the network is affine there, so
    min c + a . f(x) over the box and the split constraints s_j h_j(x) >= 0 is a linear program
    (SciPy's HiGHS). 'sat' with the minimiser when the minimum is <= 0 (the caller replays it);
    'unsat' only when the rigorous engine, given the LP's dual multipliers of the split constraints as
    beta (strong duality makes that bound the LP's optimum), proves the row; else 'unknown'."""
    from scipy.optimize import linprog

    pattern, rows, rhs, owners = {}, [], [], []
    for relu in chain.relus:
        plo, phi = chain.pre_bounds(relu, {k: v for k, v in dom.splits.items()})
        pattern[relu] = (plo >= 0).astype(numpy.float64).reshape(plo.shape[1:])[None]
    maps = affine_pieces(net, chain, pattern)
    if maps is None:
        return "unknown", None
    for relu in chain.relus:
        G, g = maps[chain.relu_input[relu]]
        split = dom.splits[relu].reshape(-1)
        for j in numpy.nonzero(split)[0]:  # s_j (G_j . x + g_j) >= 0  <=>  -s_j G_j . x <= s_j g_j
            rows.append(-split[j] * G[:, j])
            rhs.append(split[j] * g[j])
            owners.append((relu, j))
    G, g = maps[chain.nodes[-1].name]
    objective = G @ dom.A[0]
    const = float(dom.c[0] + g @ dom.A[0])
    box = list(zip(chain.lo[0], chain.hi[0]))
    res = linprog(objective, A_ub=numpy.array(rows) if rows else None, b_ub=numpy.array(rhs) if rows else None,
                  bounds=box, method="highs")
    if res.status != 0:
        return "unknown", None
    if res.fun + const <= 0:
        return "sat", res.x
    beta = {k: numpy.zeros_like(v) for k, v in dom.beta.items()}
    duals = -res.ineqlin.marginals if rows else []
    for (relu, j), b in zip(owners, duals):
        beta[relu].reshape(-1)[j] = max(float(b), 0.0)
    bound = domain_lower(net, root, lo, hi, dom.A, dom.c, dom.alpha, beta, dom.splits, chain.relu_input,
                         dom.bounds)
    return ("unsat" if bound[0] > 0 else "unknown"), None


def corner_candidates(net, chain: Chain, doms: Domains, limit: int = 4) -> list:
    """Box corners (flat) where the network itself, in float64, violates the domain's row."""
    result = chain.evaluate(doms.A, doms.c, doms.alpha, doms.beta, doms.splits, need_grad=False)
    x = result.corner.reshape((len(doms),) + tuple(net.input_shape))
    value = doms.c + (net.forward(x).reshape(len(doms), -1) * doms.A).sum(axis=1)
    bad = numpy.nonzero(value <= 0)[0][:limit]
    return [result.corner[i].copy() for i in bad]


def replayed_corner(net, chain: Chain, doms: Domains, check):
    """The first of ``corner_candidates`` that ``check`` (the replay) accepts, or None."""
    return next((x for x in corner_candidates(net, chain, doms) if check(x)), None)


__all__ = ["BabOutcome", "BabSettings", "Domains", "replayed_corner", "run_bab"]
