"""The open-domain pool of branch and bound: pops return the lowest domains intact, pushes reuse
freed rows and grow the storage, against a plain list kept beside it."""

import numpy

from robeval.verify.domains import DomainPool, Domains


def _domains(bounds, tag):
    n = len(bounds)
    tags = numpy.arange(n, dtype=float) + tag
    return Domains(tags[:, None] * numpy.ones((n, 3)), tags.copy(), numpy.arange(n) + int(tag),
                   {"r": numpy.sign(tags)[:, None] * numpy.ones((n, 4))},
                   {"r": tags[:, None, None] * numpy.ones((n, 2, 4))},
                   {"r": -tags[:, None] * numpy.ones((n, 4))}, numpy.asarray(bounds, dtype=float),
                   {"h": (tags[:, None] - numpy.ones((n, 4)), tags[:, None] + numpy.ones((n, 4)))})


def _consistent(d: Domains):
    """Every field of a popped domain still belongs to the same domain (tag = c)."""
    t = d.c
    assert numpy.array_equal(d.A, t[:, None] * numpy.ones((len(d), 3)))
    assert numpy.array_equal(d.row, t.astype(int))
    assert numpy.array_equal(d.alpha["r"], t[:, None, None] * numpy.ones((len(d), 2, 4)))
    assert numpy.array_equal(d.beta["r"], -t[:, None] * numpy.ones((len(d), 4)))
    assert numpy.array_equal(d.bounds["h"][1] - d.bounds["h"][0], 2 * numpy.ones((len(d), 4)))
    assert numpy.array_equal(d.bounds["h"][0], (t[:, None] - 1) * numpy.ones((len(d), 4)))


def test_pool_pops_lowest_and_reuses_rows():
    rng = numpy.random.default_rng(0)
    pool = DomainPool(_domains(rng.normal(size=5), 0))
    reference = {float(t): float(b) for t, b in zip(pool.store.c, pool.store.bound)}
    tag = 100
    for _ in range(30):
        k = int(rng.integers(1, 6))
        got = pool.pop_lowest(k)
        _consistent(got)
        want = sorted(reference.items(), key=lambda kv: kv[1])[:k]
        assert list(got.c) == [t for t, _ in want]
        assert numpy.all(numpy.diff(got.bound) >= 0)
        for t in got.c:
            del reference[float(t)]
        kids = _domains(rng.normal(size=int(rng.integers(0, 12))), tag)
        tag += 100
        pool.push(kids)
        reference.update({float(t): float(b) for t, b in zip(kids.c, kids.bound)})
        assert len(pool) == len(reference)
        assert pool.lowest() == (min(reference.values()) if reference else numpy.inf)
    assert len(pool.alive) < 4 * max(len(reference), 5)  # grown by doubling, freed rows reused
    rest = pool.pop(pool.index())
    _consistent(rest)
    assert sorted(rest.c) == sorted(reference)
    assert len(pool) == 0 and pool.lowest() == numpy.inf


def test_a_round_bounded_in_threads_matches_one_thread():
    """Splitting and bounding a round's domains in parts on several threads gives every child the
    split and the bound one thread gives it (each domain is its own computation)."""
    import math

    from test_verify_bounds import _box

    from robeval.verify.alpha import optimised_rows
    from robeval.verify.bab import BabSettings, _root_bounds, bound_children, split_choices
    from robeval.verify.bounds import as_verification_network, box_bounds

    from nets import random_mlp

    rng = numpy.random.default_rng(7)
    net = as_verification_network(random_mlp(rng, (4, 16, 16, 3)))
    lo, hi = _box(rng, net, 0.5)
    root = box_bounds(net, lo, hi)
    n = 64
    A, c = rng.normal(size=(n, 3)), numpy.zeros(n)
    chain, alpha, bound = optimised_rows(net, root, lo, hi, A, c, 5, 0.1, dtype="float64")
    zeros = {r: numpy.zeros((n,) + root.bounds[chain.relu_input[r]][0].shape[1:]) for r in chain.relus}
    doms = Domains(A, c, numpy.arange(n), {k: v.copy() for k, v in zeros.items()}, alpha,
                   {k: v.copy() for k, v in zeros.items()}, bound, _root_bounds(chain, n))
    results = []
    for workers in (1, 3):
        settings = BabSettings(dtype="float64", workers=workers)
        which, index = split_choices(chain, doms, settings)
        kids, empty = bound_children(net, chain, root, lo, hi, doms, which, index, settings, math.inf)
        sign = sum(v.reshape(len(kids), -1).sum(axis=1) for v in kids.splits.values())
        order = numpy.argsort(2 * kids.row + (sign < 0))
        results.append((which, index, empty, kids.take(order)))
    (w1, i1, e1, k1), (w3, i3, e3, k3) = results
    assert (w1 == w3).all() and (i1 == i3).all() and (w1 >= 0).any() and e1 == e3
    assert len(k1) == len(k3) == 2 * n - e1
    assert (k1.row == k3.row).all()
    for r in chain.relus:
        assert (k1.splits[r] == k3.splits[r]).all()
    numpy.testing.assert_allclose(k1.bound, k3.bound, rtol=1e-9, atol=1e-9)
    assert (k1.bound >= doms.bound[k1.row] - 1e-12).all()  # a child's bound is never below its parent's
