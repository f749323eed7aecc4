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

from ..certifiers.crown import bound_targets
from .alpha import Chain, optimised_rows
from .bab import BabSettings, _root_bounds, bound_children, split_choices
from .bounds import exact_float32, narrow_node, unstable_index, unstable_rows
from .domains import DomainPool, Domains


class PrefixSearch:
    """Rigorous lower bounds (R,) of A_r . f(x) over the box for the prefix network ``prefix``, by
    best-first branch and bound, resumable: each ``run`` continues the same tree, so rounds of the
    hidden-layer stage add to one search instead of starting it again (a restart repeated every
    earlier round's work: half of the time with rounds of doubling length). ``partner[r]``: an
    objective whose search stops once objective r is >= 0 on the whole box (a neuron's upper bound
    does not matter once it is proven active)."""

    def __init__(self, prefix, root, lo, hi, A, deadline: float, settings: BabSettings, partner=None,
                 neurons=None):
        r = A.shape[0]
        self.prefix, self.root, self.lo, self.hi, self.settings, self.A = prefix, root, lo, hi, settings, A
        self.partner = numpy.full(r, -1) if partner is None else numpy.asarray(partner)
        self.idx = neurons  # the prefix output's neurons the rows bound, when the caller says
        self.closed = numpy.full(r, numpy.inf)  # least bound of each objective's leaves no longer split
        self.fast = exact_float32(prefix) if settings.dtype == "float32" else None
        self.pool = DomainPool(self._still_open(self._roots(numpy.arange(r), deadline)))
        self.bounded = 0
        self.stabilised = None  # neurons the caller found stabilised by the last run

    def lower(self):
        """Each objective's bound now: the least over its closed and open leaves."""
        return _current(self.closed, self.pool)

    def _still_open(self, doms: Domains) -> Domains:
        """``doms`` less those proven >= 0, whose bounds go into their objectives' closed bounds."""
        done = doms.bound >= 0
        numpy.minimum.at(self.closed, doms.row[done], doms.bound[done])
        return doms.take(numpy.nonzero(~done)[0])

    def _prefix_bounds(self) -> dict:
        """The root's bounds of the nodes the prefix's nonlinear ops read, as they are now."""
        return {name: self.root.bounds[name] for name in bound_targets(self.prefix)}

    def _roots(self, rows, deadline: float) -> Domains:
        """One domain per objective in ``rows``: the whole box, alpha-CROWN over the root's bounds now."""
        settings, n = self.settings, len(rows)
        self._seen = self._prefix_bounds()
        c = numpy.zeros(n)
        self.chain, alpha, bound = optimised_rows(self.prefix, self.root, self.lo, self.hi, self.A[rows], c,
                                                  settings.iterations, settings.lr_alpha, deadline, settings.dtype)
        chain = self.chain
        zeros = {relu: numpy.zeros((n,) + self.root.bounds[chain.relu_input[relu]][0].shape[1:])
                 for relu in chain.relus}
        doms = Domains(self.A[rows], c, numpy.asarray(rows), zeros, alpha, {k: v.copy() for k, v in zeros.items()},
                       bound, _root_bounds(chain, n))
        doms.splits = {k: v.copy() for k, v in zeros.items()}
        return doms

    def refresh(self, finished=None, deadline: float = numpy.inf) -> None:
        """Before a resumed run: intersect the open leaves' node bounds with the root's (tightened
        since, and valid on every leaf); close the objectives ``finished`` (R,) marks (a neuron that
        became stable otherwise), their leaves' bounds kept (still sound); and start an objective's
        tree again where alpha-CROWN over the root's bounds now beats its leaves (their bounds were
        computed over the earlier, looser ones: on 256x4's last hidden layer a kept tree ended a
        round 0.1 to 0.2 below a fresh start)."""
        store, idx = self.pool.store, self.pool.index()
        for name, (blo, bhi) in store.bounds.items():
            rlo, rhi = self.root.bounds[name]
            blo[idx], bhi[idx] = numpy.maximum(blo[idx], rlo), numpy.minimum(bhi[idx], rhi)
        if finished is not None and finished.any():
            gone = self.pool.pop(idx[finished[store.row[idx]]])
            numpy.minimum.at(self.closed, gone.row, gone.bound)
            idx = self.pool.index()
        rows = numpy.unique(self.pool.store.row[idx])  # the objectives still open
        unchanged = all(now is self._seen[name] for name, now in self._prefix_bounds().items())
        if not len(rows) or unchanged:  # the same root bounds give the same fresh start: no better
            return
        fresh = self._roots(rows, deadline)
        again = fresh.bound > self.lower()[rows]
        if again.any():
            self.pool.pop(idx[numpy.isin(self.pool.store.row[idx], rows[again])])  # superseded by the new roots
            self.closed[rows[again]] = numpy.inf
            self.pool.push(self._still_open(fresh.take(numpy.nonzero(again)[0])))

    def run(self, deadline: float, trace=None) -> int:
        """Split the open objectives' lowest leaves until every objective's leaves are all >= 0,
        cannot be split, or ``deadline`` passes; returns the domains bounded in this run."""
        settings, chain, pool, closed, partner = self.settings, self.chain, self.pool, self.closed, self.partner
        r = len(closed)
        bounded = 0
        history = [(time.perf_counter(), numpy.minimum(_current(closed, pool), 0.0).sum())]
        while len(pool) and time.perf_counter() < deadline:
            idx = pool.index()
            bound, row = pool.store.bound[idx], pool.store.row[idx]
            lowest = _lowest_leaves(row, bound, 2 * settings.batch)
            parents = pool.pop(idx[lowest])
            which, index = split_choices(chain, parents, settings)
            leaf = which < 0  # every ReLU fixed: its bound is final
            numpy.minimum.at(closed, parents.row[leaf], parents.bound[leaf])
            parents, which, index = parents.take(~leaf), which[~leaf], index[~leaf]
            if len(parents):
                kids, _ = bound_children(self.prefix, chain, self.root, self.lo, self.hi, parents, which, index,
                                         settings, deadline, self.fast)
                bounded += len(kids)
                pool.push(self._still_open(kids))
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
            if _stalled(history, settings.tighten_stall) or len(pool) > settings.max_domains:
                break
        self.bounded += bounded
        return bounded


IDLE_WEIGHT = 0.25  # time share, per unstable neuron, of a layer whose last run stabilised none


def _layer_weight(search, unstable: int) -> float:
    """A layer's claim on a round's time: its unstable neurons, a quarter as much when its search's
    last run stabilised none (on 256x6 the two deepest layers, all 256 neurons unstable, took half
    of every round and stabilised nothing while the earlier layers were still tightening)."""
    idle = search is not None and search.stabilised == 0
    return unstable * (IDLE_WEIGHT if idle else 1.0)


def _lowest_leaves(row, bound, cap: int):
    """Positions of the leaves to split in a round: the m lowest of each open objective (m = cap //
    objectives, at least 1, so that a layer with few unstable neurons still fills the batch), the
    lowest ``cap`` of those, lowest first."""
    order = numpy.lexsort((bound, row))
    groups, first, sizes = numpy.unique(row[order], return_index=True, return_counts=True)
    m = max(1, cap // len(groups))
    rank = numpy.arange(len(order)) - numpy.repeat(first, sizes)
    chosen = order[rank < m]
    return chosen[numpy.argsort(bound[chosen], kind="stable")][:cap]


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
                     skip_last: bool = False, trace=None, searches: dict | None = None) -> dict:
    """Tighten ``root``'s bounds (in place) of each ReLU input after the first, layer by layer, each
    unstable neuron's lower and upper bound by a ``PrefixSearch`` on the prefix up to that layer. The
    time left before ``deadline`` is shared among the layers still to do in proportion to their
    unstable neurons (a layer with 5 of them and one with 86 got even shares before: the small one
    spent its share on neurons that stay unstable). ``skip_last``: leave the last ReLU layer to the
    main search. ``searches``: a dict (layer -> PrefixSearch) kept between calls, so that a later
    call resumes each layer's search. Returns, per layer tightened (its ReLU input's name): unstable
    neurons before, how many became stable, domains bounded, seconds. ``trace``: a list that gets
    (time, open objectives, bounds) after each round."""
    settings = settings or BabSettings()
    searches = {} if searches is None else searches
    chain = Chain(net, root.bounds, lo, hi, settings.dtype)
    relus = chain.relus[1:-1] if skip_last else chain.relus[1:]
    report = {}
    for i, relu in enumerate(relus):
        start = time.perf_counter()
        if start >= deadline:
            break
        h = chain.relu_input[relu]
        k = len(unstable_index(root, h))
        if not k:
            continue
        weight = _layer_weight(searches.get(h), k)
        later = sum(_layer_weight(searches.get(chain.relu_input[r]), len(unstable_index(root, chain.relu_input[r])))
                    for r in relus[i + 1:])
        share = start + (deadline - start) * weight / (weight + later)
        search = searches.get(h)
        if search is None:
            idx, A = unstable_rows(root, h)
            partner = numpy.concatenate([numpy.arange(k, 2 * k), numpy.arange(k)])
            search = searches[h] = PrefixSearch(net.prefix(h), root, lo, hi, A, share, settings, partner, idx)
        else:
            blo, bhi = (b.reshape(-1)[search.idx] for b in root.bounds[h])
            stable = (blo >= 0) | (bhi <= 0)
            search.refresh(numpy.concatenate([stable, stable]), share)
        bounded = search.run(share, trace)
        narrow_node(root, h, relu, search.idx, search.lower())
        search.stabilised = k - len(unstable_index(root, h))
        report[h] = {"unstable": k, "stabilised": search.stabilised, "domains": bounded,
                     "seconds": time.perf_counter() - start}
    return report


__all__ = ["PrefixSearch", "bab_intermediate"]
