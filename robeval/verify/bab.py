"""Branch and bound over ReLU splits (BaB with beta-CROWN bounds, Wang et al. 2021), batched.

Each specification row to prove (c + a . f(x) > 0 over the box) starts as one domain. A domain that
the bound does not prove is split on one unstable ReLU (h >= 0 / h <= 0): its two children cover
it, so proving every leaf proves the row. Children are bounded many at once (the domain axis is the
batch axis of both engines): alpha and beta are optimised by the chain engine from the parent's
values, then the rigorous engine (``bounds.domain_lower``) bounds each child with them; only its
verdict counts. Intermediate bounds stay those of the whole box (valid on every subdomain), clamped
by each domain's splits.

The box corner that attains each leaf's relaxed minimum is kept: when the network itself violates
the row there, it is a candidate counterexample (replayed by the caller before anything is said)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy

from .alpha import Chain, optimise
from .bounds import domain_lower


@dataclass
class BabSettings:
    """batch: domains split per round (2 x batch children bounded at once); iterations: optimiser
    steps per round; max_domains: the most open domains kept (beyond it: 'unknown')."""

    batch: int = 128
    iterations: int = 15
    root_iterations: int = 60
    intermediate_iterations: int = 30
    max_domains: int = 50_000
    lr_alpha: float = 0.1
    lr_beta: float = 0.05


@dataclass
class Domains:
    """Open domains, one row per domain: row coefficients A (N, K), constants c (N,), splits (+1,
    -1 or 0 per ReLU neuron), alpha and beta per ReLU, and the last rigorous bound."""

    A: numpy.ndarray
    c: numpy.ndarray
    row: numpy.ndarray
    splits: dict
    alpha: dict
    beta: dict
    bound: numpy.ndarray

    def __len__(self) -> int:
        return int(self.A.shape[0])

    def take(self, idx) -> Domains:
        return Domains(self.A[idx], self.c[idx], self.row[idx], {k: v[idx] for k, v in self.splits.items()},
                       {k: v[idx] for k, v in self.alpha.items()}, {k: v[idx] for k, v in self.beta.items()},
                       self.bound[idx])

    @staticmethod
    def concat(parts: list) -> Domains:
        parts = [p for p in parts if len(p)]
        first = parts[0]
        cat = numpy.concatenate
        return Domains(cat([p.A for p in parts]), cat([p.c for p in parts]), cat([p.row for p in parts]),
                       {k: cat([p.splits[k] for p in parts]) for k in first.splits},
                       {k: cat([p.alpha[k] for p in parts]) for k in first.alpha},
                       {k: cat([p.beta[k] for p in parts]) for k in first.beta},
                       cat([p.bound for p in parts]))


@dataclass
class BabOutcome:
    """status: 'unsat' (every row proven), 'sat' (``check`` accepted ``counterexample``), 'unknown'
    (a leaf cannot be split further, or too many domains) or 'timeout'."""

    status: str
    rounds: int = 0
    domains_bounded: int = 0
    max_open: int = 0
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


def choose_splits(chain: Chain, doms: Domains):
    """(relu name, flat neuron index) per domain with the largest score; relu None where nothing is
    left to split."""
    result = chain.evaluate(doms.A, doms.c, doms.alpha, doms.beta, doms.splits, need_grad=False)
    scores = branch_scores(chain, result.lam, doms.splits)
    n = len(doms)
    best, which, index = numpy.full(n, -0.5), numpy.full(n, -1), numpy.zeros(n, dtype=numpy.int64)
    for i, relu in enumerate(chain.relus):
        flat = scores[relu].reshape(n, -1)
        j = flat.argmax(axis=1)
        s = flat[numpy.arange(n), j]
        better = s > best
        best, which, index = numpy.where(better, s, best), numpy.where(better, i, which), numpy.where(better, j, index)
    return which, index


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


def run_bab(net, chain: Chain, root, lo, hi, doms: Domains, deadline: float, settings: BabSettings,
            strict_rows=None, check=None, progress=None) -> BabOutcome:
    """Split and bound until every domain is proven (bound > 0; >= 0 where strict_rows[row]).

    ``check(x)``: called on box points (flat) where the network violates a leaf's row; True (a
    replayed counterexample) ends the search with status 'sat'."""
    out = BabOutcome("unsat", max_open=len(doms))
    strict_rows = numpy.zeros(int(doms.row.max()) + 1, dtype=bool) if strict_rows is None else strict_rows
    while len(doms):
        if time.perf_counter() > deadline:
            out.status = "timeout"
            return out
        if len(doms) > settings.max_domains:
            out.status = "unknown"
            return out
        order = numpy.argsort(doms.bound, kind="stable")
        pick, rest = order[:settings.batch], order[settings.batch:]
        parents = doms.take(pick)
        which, index = choose_splits(chain, parents)
        if (which < 0).any():  # a domain with every neuron fixed that the bound still does not prove
            out.status = "unknown"
            return out
        kids = children(parents, chain, which, index)
        kids.alpha, kids.beta, relaxed = optimise(chain, kids.A, kids.c, kids.alpha, kids.beta, kids.splits,
                                                  settings.iterations, settings.lr_alpha, settings.lr_beta)
        kids.bound = domain_lower(net, root, lo, hi, kids.A, kids.c, kids.alpha, kids.beta, kids.splits,
                                  chain.relu_input)
        out.rounds += 1
        out.domains_bounded += len(kids)
        strict = strict_rows[kids.row]
        proven = (kids.bound > 0) | (strict & (kids.bound >= 0))
        open_kids = kids.take(numpy.nonzero(~proven)[0])
        if len(open_kids) and check is not None:
            for x in corner_candidates(net, chain, open_kids):
                if check(x):
                    out.status, out.counterexample = "sat", x
                    return out
        remaining = doms.take(rest)
        if not len(open_kids) and not len(remaining):
            return out
        doms = Domains.concat([remaining, open_kids])
        out.max_open = max(out.max_open, len(doms))
        if progress is not None:
            progress(out, len(doms))
    return out


def corner_candidates(net, chain: Chain, doms: Domains, limit: int = 4) -> list:
    """Box corners (flat) where the network itself, in float64, violates the domain's row."""
    result = chain.evaluate(doms.A, doms.c, doms.alpha, doms.beta, doms.splits, need_grad=False)
    x = result.corner.reshape((len(doms),) + tuple(net.input_shape))
    value = doms.c + (net.forward(x).reshape(len(doms), -1) * doms.A).sum(axis=1)
    bad = numpy.nonzero(value <= 0)[0][:limit]
    return [result.corner[i].copy() for i in bad]


__all__ = ["BabOutcome", "BabSettings", "Domains", "run_bab"]
