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
