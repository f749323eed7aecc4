"""Intermediate bounds tightened by branch and bound, certified by the rigorous engine.

On deep ReLU nets the bounds of the hidden layers decide everything after them: exact (MILP) bounds
of mnist_fc's second hidden layer turn a 300 s timeout into a proof in 20 s. A MILP solver's answer
has no rigorous certificate, so robeval gets bounds of that quality the way it proves properties:
for every unstable neuron h_j of a layer, both h_j and -h_j are lower-bounded by branch and bound on
the network's prefix up to that layer, splitting the unstable ReLUs before it. The lowest leaf of
each objective is split first (best first); the bound is the least rigorous bound over its leaves
(the leaves cover the box; empty ones hold no point), so it is sound whenever the search stops."""

from __future__ import annotations

import time

import numpy

from .alpha import Chain, optimised_rows
from .bab import BabSettings, _root_bounds, bound_children, split_choices
from .bounds import exact_float32, narrow_node, unstable_index, unstable_rows
from .domains import DomainPool, Domains


def _bab_lower(prefix, root, lo, hi, A, deadline: float, settings: BabSettings, partner=None, trace=None):
    """Rigorous lower bounds (R,) of A_r . f(x) over the box for the prefix network ``prefix``, by
    best-first branch and bound until every objective's leaves are all >= 0, cannot be split, or the
    deadline passes. ``partner[r]``: an objective whose search stops once objective r is >= 0 on
    the whole box (a neuron's upper bound does not matter once it is proven active)."""
    r = A.shape[0]
    partner = numpy.full(r, -1) if partner is None else numpy.asarray(partner)
    c = numpy.zeros(r)
    chain, alpha, bound = optimised_rows(prefix, root, lo, hi, A, c, settings.iterations, settings.lr_alpha, deadline,
                                         settings.dtype)
    zeros = {relu: numpy.zeros((r,) + root.bounds[chain.relu_input[relu]][0].shape[1:]) for relu in chain.relus}
    doms = Domains(A, c, numpy.arange(r), zeros, alpha, {k: v.copy() for k, v in zeros.items()}, bound,
                   _root_bounds(chain, r))
    doms.splits = {k: v.copy() for k, v in zeros.items()}
    closed = numpy.full(r, numpy.inf)  # least bound of each objective's leaves that are no longer split
    fast = exact_float32(prefix) if settings.dtype == "float32" else None
    done = doms.bound >= 0
    numpy.minimum.at(closed, doms.row[done], doms.bound[done])
    pool = DomainPool(doms.take(numpy.nonzero(~done)[0]))
    bounded = 0
    history = [(time.perf_counter(), numpy.minimum(_current(closed, pool), 0.0).sum())]
    while len(pool) and time.perf_counter() < deadline:
        idx = pool.index()
        bound, row = pool.store.bound[idx], pool.store.row[idx]
        order = numpy.lexsort((bound, row))
        _, first = numpy.unique(row[order], return_index=True)
        lowest = order[first]  # each open objective's lowest leaf
        lowest = lowest[numpy.argsort(bound[lowest])][: 2 * settings.batch]
        parents = pool.pop(idx[lowest])
        which, index = split_choices(chain, parents, settings)
        leaf = which < 0  # every ReLU fixed: its bound is final
        numpy.minimum.at(closed, parents.row[leaf], parents.bound[leaf])
        parents, which, index = parents.take(~leaf), which[~leaf], index[~leaf]
        if len(parents):
            kids, _ = bound_children(prefix, chain, root, lo, hi, parents, which, index, settings, deadline, fast)
            bounded += len(kids)
            done = kids.bound >= 0
            numpy.minimum.at(closed, kids.row[done], kids.bound[done])
            pool.push(kids.take(numpy.nonzero(~done)[0]))
        if len(pool):
            idx = pool.index()
            still = numpy.zeros(r, dtype=bool)
            still[pool.store.row[idx]] = True
            settled = ~still & (closed >= 0) & (partner >= 0)
            if settled.any():  # drop the partners of objectives proven >= 0 (their bound stays sound)
                drop = idx[numpy.isin(pool.store.row[idx], partner[settled])]
                gone = pool.pop(drop)
                numpy.minimum.at(closed, gone.row, gone.bound)
        now = _current(closed, pool)
        history.append((time.perf_counter(), numpy.minimum(now, 0.0).sum()))
        if trace is not None:
            trace.append((history[-1][0], len(numpy.unique(pool.store.row[pool.index()])), now))
        if _stalled(history, settings.tighten_stall):
            break
    return _current(closed, pool), bounded


def _current(closed, pool):
    """Each objective's bound now: the least over its closed and open leaves."""
    now = closed.copy()
    idx = pool.index()
    numpy.minimum.at(now, pool.store.row[idx], pool.store.bound[idx])
    return now


def _stalled(history, rate: float) -> bool:
    """The summed shortfall below 0 of the objectives' bounds improved by less than ``rate`` of its
    first value per second over the recent window (the last fifth of the time spent, >= 0.5 s)."""
    (t0, g0), (t, g) = history[0], history[-1]
    window = max(0.5, 0.2 * (t - t0))
    if t - t0 < 2 * window or g0 >= 0:
        return False
    times = numpy.array([h[0] for h in history])
    past = history[int(numpy.searchsorted(times, t - window, side="right")) - 1][1]
    return (g - past) < rate * window * -g0


def bab_intermediate(net, root, lo, hi, deadline: float, settings: BabSettings | None = None,
                     skip_last: bool = False, trace=None) -> dict:
    """Tighten ``root``'s bounds (in place) of each ReLU input after the first, layer by layer, each
    unstable neuron's lower and upper bound by ``_bab_lower`` on the prefix up to that layer. The
    time left before ``deadline`` is shared among the layers still to do in proportion to their
    unstable neurons (a layer with 5 of them and one with 86 got even shares before: the small one
    spent its share on neurons that stay unstable). ``skip_last``: leave the last ReLU layer to the
    main search. Returns, per layer tightened (its ReLU input's name): unstable neurons before, how
    many became stable, domains bounded, seconds. ``trace``: a list that gets (time, open
    objectives, bounds) after each round."""
    settings = settings or BabSettings()
    chain = Chain(net, root.bounds, lo, hi, settings.dtype)
    relus = chain.relus[1:-1] if skip_last else chain.relus[1:]
    report = {}
    for i, relu in enumerate(relus):
        start = time.perf_counter()
        if start >= deadline:
            break
        h = chain.relu_input[relu]
        idx, A = unstable_rows(root, h)
        if not len(idx):
            continue
        k = len(idx)
        later = sum(len(unstable_index(root, chain.relu_input[r])) for r in relus[i + 1:])
        share = start + (deadline - start) * k / (k + later)
        partner = numpy.concatenate([numpy.arange(k, 2 * k), numpy.arange(k)])
        low, bounded = _bab_lower(net.prefix(h), root, lo, hi, A, share, settings, partner, trace)
        stable = narrow_node(root, h, relu, idx, low)
        report[h] = {"unstable": k, "stabilised": stable, "domains": bounded,
                     "seconds": time.perf_counter() - start}
    return report


__all__ = ["bab_intermediate"]
