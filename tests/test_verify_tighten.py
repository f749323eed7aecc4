"""Hidden-layer bounds tightened by branch and bound on the network's prefixes: sound on sampled
points, never looser, close to the exact (MILP) bounds, and the verdicts built on them correct."""

from __future__ import annotations

import time

import numpy
import pytest
from test_verify_bounds import _box, _milp_minimum, _samples, _verdicts_against_milp

from robeval.verify.alpha import Chain, optimised_rows, tighten_intermediate
from robeval.verify.bab import BabSettings
from robeval.verify.bounds import as_verification_network, box_bounds, narrow_node, unstable_rows
from robeval.verify.tighten import IDLE_WEIGHT, PrefixSearch, _layer_weight, _lowest_leaves, _stalled, bab_intermediate

from nets import random_mlp


def _tightened(seed, sizes, width, dtype="float32", seconds=3.0):
    rng = numpy.random.default_rng(seed)
    net = as_verification_network(random_mlp(rng, sizes).astype(dtype))
    lo, hi = _box(rng, net, width)
    root = box_bounds(net, lo, hi)
    tighten_intermediate(net, root, lo, hi, 20)
    before = {k: (a.copy(), b.copy()) for k, (a, b) in root.bounds.items()}
    report = bab_intermediate(net, root, lo, hi, time.perf_counter() + seconds,
                              BabSettings(dtype=dtype, batch=32), skip_last=False)
    return rng, net, lo, hi, root, before, report


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tightened_bounds_hold_on_sampled_points_and_never_loosen(seed, dtype):
    """Every sampled point's pre-activations lie inside the tightened bounds, which lie inside the
    alpha-CROWN ones and are strictly tighter somewhere."""
    rng, net, lo, hi, root, before, report = _tightened(seed, (4, 12, 12, 12, 3), 0.4, dtype)
    assert report  # some layer after the first had unstable neurons
    pts = _samples(rng, lo, hi, 20000)
    acts = net.forward(pts, keep=True)
    chain = Chain(net, root.bounds, lo, hi)
    tighter = 0
    for relu in chain.relus:
        h = chain.relu_input[relu]
        (blo, bhi), (olo, ohi) = root.bounds[h], before[h]
        v = acts[h].reshape(len(pts), -1)
        assert (v >= blo.reshape(-1)).all() and (v <= bhi.reshape(-1)).all(), h
        assert (blo >= olo).all() and (bhi <= ohi).all()
        tighter += int(((bhi - blo) < (ohi - olo) - 1e-9).sum())
        r = root.bounds[relu]  # the ReLU's output bounds follow its input's
        assert (r[0] >= numpy.maximum(blo, 0) - 1e-12).all() and (r[1] <= numpy.maximum(bhi, 0) + 1e-12).all()
    assert tighter > 0


def test_tightened_bounds_against_exact_milp_bounds():
    """On tiny nets the search all but reaches the exact bounds: never past them (sound), and it
    closes most of alpha-CROWN's gap to them."""
    closed_gap, total_gap = 0.0, 0.0
    for seed in range(6):
        _, net, lo, hi, root, before, report = _tightened(100 + seed, (3, 8, 8, 8, 2), 0.5, "float64")
        for h in report:
            prefix = net.prefix(h)
            olo, ohi = (a.reshape(-1) for a in before[h])
            nlo, nhi = (a.reshape(-1) for a in root.bounds[h])
            for j in numpy.nonzero((olo < 0) & (ohi > 0))[0]:
                e = numpy.eye(olo.size)[j]
                exact_lo, exact_hi = _milp_minimum(prefix, lo, hi, e), -_milp_minimum(prefix, lo, hi, -e)
                assert nlo[j] <= exact_lo + 1e-7 and nhi[j] >= exact_hi - 1e-7, (seed, h, j)
                closed_gap += (nlo[j] - olo[j]) + (ohi[j] - nhi[j])
                total_gap += (exact_lo - olo[j]) + (ohi[j] - exact_hi)
    assert total_gap > 0.5
    assert closed_gap >= 0.75 * total_gap, (closed_gap, total_gap)  # about 0.92 measured


def test_verdicts_with_tightened_bounds_against_exact_milp_minima():
    """Deeper tiny nets (three ReLU layers, so the middle one is tightened): 'unsat' never where the
    exact minimum is <= 0, and every clearly positive one proven."""
    seen_safe, seen_unsafe, details = _verdicts_against_milp((3, 8, 8, 8, 3), [900 + seed for seed in range(10)],
                                                             "float32", BabSettings(batch=16, max_domains=4000))
    tightened = sum("tightened" in d for d in details)
    assert seen_safe >= 5 and seen_unsafe >= 5 and tightened >= 3


def test_a_resumed_search_continues_its_tree_soundly():
    """Run in several parts, a prefix search keeps its leaves: its bounds only rise from part to part,
    stay at or below the exact (MILP) values, and the leaves get deeper (the tree goes on, it does not
    start again); objectives marked finished by ``refresh`` lose their leaves."""
    rng = numpy.random.default_rng(7)
    net = as_verification_network(random_mlp(rng, (3, 10, 10, 10, 2)))
    lo, hi = _box(rng, net, 0.6)
    root = box_bounds(net, lo, hi)
    h = [n.inputs[0] for n in net.nodes if n.op == "relu"][2]
    idx, A = unstable_rows(root, h)
    k = len(idx)
    assert k >= 3
    settings = BabSettings(dtype="float64", batch=4)
    partner = numpy.concatenate([numpy.arange(k, 2 * k), numpy.arange(k)])
    search = PrefixSearch(net.prefix(h), root, lo, hi, A, numpy.inf, settings, partner)
    previous, counts, depth = search.lower(), [], []
    for _ in range(3):
        search.refresh()
        counts.append(search.run(time.perf_counter() + 0.3))
        now = search.lower()
        assert (now >= previous - 1e-12).all()
        previous = now
        store, live = search.pool.store, search.pool.index()
        splits = numpy.concatenate([numpy.abs(v[live]).reshape(len(live), -1) for v in store.splits.values()], axis=1)
        # mean depth of the open leaves: the deepest one can reach every neuron in the first part
        depth.append(float(splits.sum(axis=1).mean()) if len(live) else 0.0)
    assert min(counts) > 0 and search.bounded == sum(counts)
    assert depth[-1] > depth[0] or not len(search.pool), depth
    exact = numpy.array([_milp_minimum(net.prefix(h), lo, hi, a) for a in A])
    assert (previous <= exact + 1e-7).all()
    # an earlier layer tightened to its exact bounds: the objectives that a fresh start now bounds
    # better start again, so the bounds reach at least the fresh alpha-CROWN ones, and stay sound
    h1 = [n.inputs[0] for n in net.nodes if n.op == "relu"][1]
    relu1 = [n.name for n in net.nodes if n.op == "relu"][1]
    idx1, A1 = unstable_rows(root, h1)
    narrow_node(root, h1, relu1, idx1, numpy.array([_milp_minimum(net.prefix(h1), lo, hi, a) for a in A1]) - 1e-6)
    _, _, fresh = optimised_rows(net.prefix(h), root, lo, hi, A, numpy.zeros(2 * k), settings.iterations,
                                 settings.lr_alpha, dtype="float64")
    search.refresh()
    assert (search.lower() >= numpy.maximum(previous, fresh) - 1e-9).all()
    assert (search.lower() <= exact + 1e-7).all()
    assert (fresh > previous + 1e-6).any()  # the earlier layer's exact bounds did matter here
    previous = search.lower()
    finished = numpy.zeros(2 * k, dtype=bool)
    finished[[0, k]] = True
    search.refresh(finished)
    assert not numpy.isin(search.pool.store.row[search.pool.index()], [0, k]).any()
    assert (search.lower() == previous).all()  # closing keeps the leaves' bounds (sound, never raised)


def test_a_round_splits_the_lowest_leaves_of_every_objective():
    """With fewer objectives than the batch, each gives its m lowest leaves (m = cap // objectives);
    with more, each its lowest one, the lowest first."""
    row = numpy.array([0, 0, 0, 1, 1, 2, 0, 1])
    bound = numpy.array([-1.0, -3.0, -2.0, -5.0, -0.5, -0.1, -4.0, -0.2])
    assert list(_lowest_leaves(row, bound, 6)) == [3, 6, 1, 4, 5]  # m = 2: two of 0 and 1, the one of 2
    assert list(_lowest_leaves(row, bound, 2)) == [3, 6]  # m = 1: each lowest, then the cap
    assert list(_lowest_leaves(row, bound, 100)) == list(numpy.argsort(bound))  # m = 33: all of them


def test_a_layer_that_stabilised_nothing_gets_a_smaller_share():
    """A layer's weight is its unstable neurons, cut to IDLE_WEIGHT of that once its last run
    stabilised none; a layer not searched yet, or one that stabilised some, keeps the full weight."""
    class Ran:
        def __init__(self, stabilised):
            self.stabilised = stabilised

    assert _layer_weight(None, 80) == 80
    assert _layer_weight(Ran(3), 80) == 80
    assert _layer_weight(Ran(0), 80) == IDLE_WEIGHT * 80 < 80


def test_stall_rule():
    """A layer's search ends once its shortfall stops shrinking, not while it still falls fast."""
    steady = [(0.1 * i, -100.0 + 10.0 * i) for i in range(30)]  # 100 per second: going well
    assert not _stalled(steady, 0.005)
    flat = [(0.1 * i, -100.0 + min(i, 10) * 5.0) for i in range(40)]  # no change for the last 3 s
    assert _stalled(flat, 0.005)
    assert not _stalled(flat[:5], 0.005)  # too early to tell
    assert not _stalled(flat, 0.0)  # rate 0 (the default): a layer runs to its share of the time


def test_narrow_node_keeps_unchanged_bounds_and_narrows_the_rest():
    """Bounds no looser than the given ones leave the arrays as they are (PrefixSearch.refresh tells
    unchanged prefix bounds by identity); tighter ones replace them, with the ReLU's output bounds."""
    rng = numpy.random.default_rng(3)
    net = as_verification_network(random_mlp(rng, [6, 12, 12, 3]))
    lo, hi = _box(rng, net, 0.5)
    root = box_bounds(net, lo, hi)
    relu = [n.name for n in net.nodes if n.op == "relu"][1]
    h = [n.inputs[0] for n in net.nodes if n.op == "relu"][1]
    idx, _ = unstable_rows(root, h)
    k = len(idx)
    assert k > 1
    blo, bhi = root.bounds[h]
    loose = numpy.concatenate([blo.reshape(-1)[idx] - 1.0, -bhi.reshape(-1)[idx] - 1.0])
    assert narrow_node(root, h, relu, idx, loose) == 0
    assert root.bounds[h][0] is blo and root.bounds[h][1] is bhi
    tight = loose.copy()
    tight[0] = 0.0  # the first unstable neuron proven active, the second's upper bound halved
    tight[k + 1] = -0.5 * bhi.reshape(-1)[idx[1]]
    assert narrow_node(root, h, relu, idx, tight) == 1
    new_lo, new_hi = (a.reshape(-1) for a in root.bounds[h])
    assert new_lo[idx[0]] == 0.0 and new_hi[idx[1]] == 0.5 * bhi.reshape(-1)[idx[1]]
    assert numpy.array_equal(numpy.delete(new_lo, idx[0]), numpy.delete(blo.reshape(-1), idx[0]))
    assert root.bounds[relu][1].reshape(-1)[idx[1]] == 0.5 * bhi.reshape(-1)[idx[1]]
