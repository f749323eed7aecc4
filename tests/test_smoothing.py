"""Randomized smoothing: statistics against independent references, exact radii of a linear
classifier, abstentions, the adapter path, gate metric and CLI."""

from __future__ import annotations

import json

import numpy
import pytest
from scipy.stats import binom, norm

from robeval.certifiers import CERTIFIERS, get_certifier
from robeval.certifiers.smoothing import Smoothing
from robeval.certifiers.smoothing_stats import binomial_p_values, clopper_pearson_lower
from robeval.errors import InvalidParameterError
from robeval.ir import Network, Node
from robeval.report.smoothing import ABSTAIN, CERTIFIED_WHP, INCORRECT, NOT_CERTIFIED

from nets import random_mlp


def linear_binary(w, b):
    """Logits [0, w.x + b] on inputs (1, d): class 1 iff w.x + b > 0."""
    d = len(w)
    weight = numpy.stack([numpy.zeros(d), numpy.asarray(w, float)])
    return Network([Node("f", "flatten", ("input",)),
                    Node("fc", "dense", ("f",), {"weight": weight, "bias": numpy.array([0.0, b])})], (1, d))


def cp_lower_bisection(k, n, alpha):
    """Independent Clopper-Pearson lower bound: the p with P(X >= k | p) = alpha, by bisection."""
    if k == 0:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if binom.sf(k - 1, n, mid) < alpha:  # P(X >= k) grows with p
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def test_clopper_pearson_matches_bisection():
    for k, n, alpha in [(1, 10, 0.05), (50, 100, 0.001), (999, 1000, 0.001), (10000, 10000, 0.001), (3, 7, 0.2)]:
        assert clopper_pearson_lower([k], n, alpha)[0] == pytest.approx(cp_lower_bisection(k, n, alpha), abs=1e-9)
    assert clopper_pearson_lower([0], 10, 0.05)[0] == 0.0
    # all n successes: the bound is alpha ** (1 / n) exactly
    assert clopper_pearson_lower([100], 100, 0.001)[0] == pytest.approx(0.001 ** (1 / 100), rel=1e-12)


def test_binomial_p_values_match_direct_sum():
    for top, second in [(60, 40), (10, 0), (5, 5), (700, 300)]:
        n = top + second
        direct = min(1.0, 2 * sum(binom.pmf(j, n, 0.5) for j in range(top, n + 1)))
        assert binomial_p_values(numpy.array([top]), numpy.array([second]))[0] == pytest.approx(direct, rel=1e-9)


def loop_reference(net, x, y, sigma, n0, n, alpha, seed, radii):
    """Cohen et al.'s CERTIFY written as plain loops over samples and draws, with the noise drawn in
    the order the certifier documents (one group: selection draws, then estimation draws)."""
    rng = numpy.random.default_rng(seed)
    shape = x.shape[1:]
    noise0 = rng.standard_normal((len(x), n0) + shape, dtype=numpy.float64) * sigma
    noise1 = rng.standard_normal((len(x), n) + shape, dtype=numpy.float64) * sigma
    out = []
    for i in range(len(x)):
        c0 = numpy.zeros(5, int)
        for j in range(n0):
            c0[int(net.forward((x[i] + noise0[i, j])[None]).argmax())] += 1
        ca = int(c0.argmax())
        na = sum(int(net.forward((x[i] + noise1[i, j])[None]).argmax()) == ca for j in range(n))
        p = cp_lower_bisection(na, n, alpha)
        if p <= 0.5:
            out.append((-1, 0.0, [ABSTAIN] * len(radii)))
            continue
        r = sigma * norm.ppf(p)
        out.append((ca, r, [INCORRECT if ca != y[i] else (CERTIFIED_WHP if r >= e else NOT_CERTIFIED) for e in radii]))
    return out


def test_certify_matches_loop_reference():
    rng = numpy.random.default_rng(3)
    net = random_mlp(rng, (6, 8, 5))
    x = rng.uniform(0, 1, (4, 1, 6))
    y = numpy.array([*net.forward(x).argmax(1)[:3], (net.forward(x[3:]).argmax(1)[0] + 1) % 5])
    radii = (0.0, 0.1, 0.3)
    cert = Smoothing(sigma=0.3, n0=20, n=200, alpha=0.01, seed=7, dtype=numpy.float64, batch_size=4 * 200)
    res = cert.certify(net, x, y, radii)
    assert res.extra["samples_per_group"] == 4  # one group, one chunk: the reference's order
    ref = loop_reference(net, x, y, 0.3, 20, 200, 0.01, 7, radii)
    assert res.predictions.tolist() == [p for p, _, _ in ref]
    numpy.testing.assert_allclose(res.radius, [r for _, r, _ in ref], atol=1e-7)
    assert res.verdicts.tolist() == [v for _, _, v in ref]
    assert sum(v[0] == INCORRECT for _, _, v in ref) + sum(v[0] == ABSTAIN for _, _, v in ref) >= 1


def test_batching_does_not_change_the_statistics_much():
    """Other chunkings draw other noise, but the certified radii of a fixed model agree closely."""
    rng = numpy.random.default_rng(0)
    net = random_mlp(rng, (6, 8, 5))
    x = rng.uniform(0, 1, (3, 1, 6))
    y = net.forward(x).argmax(1)
    a = Smoothing(sigma=0.2, n=20000, batch_size=50000).certify(net, x, y, [0.1])
    b = Smoothing(sigma=0.2, n=20000, batch_size=777).certify(net, x, y, [0.1])
    assert a.extra["samples_per_group"] == 2 and b.extra["samples_per_group"] == 1
    numpy.testing.assert_allclose(a.radius, b.radius, atol=0.02)


def test_linear_classifier_radius_below_and_near_exact():
    """For a linear binary classifier p_A = Phi(|w.x + b| / (sigma |w|)), so the exact smoothed radius
    is sigma * Phi^-1(p_A) = |w.x + b| / |w|, the distance to the boundary."""
    rng = numpy.random.default_rng(1)
    d, sigma = 10, 0.5
    w = rng.normal(size=d)
    x = rng.uniform(0, 1, (6, 1, d))
    margins = numpy.array([0.3, -0.5, 0.7, -0.2, 0.45, 0.6]) * sigma * numpy.linalg.norm(w)
    b = 0.0
    x = x + ((margins - x[:, 0] @ w) / (w @ w))[:, None, None] * w  # w.x = the wanted margin
    x = numpy.clip(x, -5, 5)
    net = linear_binary(w, b)
    exact = numpy.abs(x[:, 0] @ w + b) / numpy.linalg.norm(w)
    y = (x[:, 0] @ w + b > 0).astype(int)
    res = Smoothing(sigma=sigma, n=100_000, alpha=0.001, dtype=numpy.float64, domain=None).certify(net, x, y, [0.0])
    assert res.predictions.tolist() == y.tolist()
    assert (res.radius <= exact).all()
    assert (exact - res.radius < 0.03).all(), exact - res.radius
    # p_lower below the closed-form p_A, and not far
    p_exact = norm.cdf(exact / sigma)
    assert (res.p_lower <= p_exact).all() and (p_exact - res.p_lower < 0.01).all()


def test_abstains_on_the_boundary_and_with_too_few_draws():
    w = numpy.array([1.0, -1.0])
    net = linear_binary(w, 0.0)
    x = numpy.array([[[0.5, 0.5]], [[0.9, 0.1]]])  # on the boundary; far on the class-1 side
    y = numpy.array([1, 1])
    res = Smoothing(sigma=0.25, n=5000, alpha=0.001).certify(net, x, y, [0.0, 0.5])
    assert res.predictions.tolist() == [-1, 1] and res.radius[0] == 0.0
    assert res.counts(0) == {CERTIFIED_WHP: 1, ABSTAIN: 1, INCORRECT: 0, NOT_CERTIFIED: 0}
    assert res.abstain_rate == 0.5
    # 5 draws at alpha 0.001: p_lower <= 0.001 ** (1 / 5) = 0.25 < 1/2, so everything abstains
    few = Smoothing(sigma=0.25, n=5, alpha=0.001).certify(net, x, y, [0.0])
    assert few.verdicts[:, 0].tolist() == [ABSTAIN, ABSTAIN] and few.certified_accuracy == (0.0,)
    # PREDICT: the binomial test abstains on the boundary, answers far from it
    assert Smoothing(sigma=0.25, alpha=0.001).predict(net, x, n=2000).tolist() == [-1, 1]


def test_result_is_kept_apart_from_deterministic_certificates():
    net = linear_binary(numpy.array([1.0, -1.0]), 0.0)
    x, y = numpy.array([[[0.9, 0.1]]]), numpy.array([1])
    res = Smoothing(sigma=0.25, n=1000).certify(net, x, y, [0.25])
    d = res.to_dict()
    assert d["kind"] == "probabilistic" and d["confidence"] == pytest.approx(0.999)
    assert "certified_accuracy" not in d["results"][0] and "smoothed_certified_accuracy" in d["results"][0]
    assert "probability >= 0.999" in d["notes"][0]
    json.dumps(d)
    assert CERTIFIERS["smoothing"] is Smoothing and get_certifier("smoothing", sigma=0.5).sigma == 0.5


@pytest.mark.parametrize("kwargs", [{"sigma": 0}, {"sigma": -1}, {"n": 0}, {"n0": 1.5}, {"alpha": 1.0},
                                    {"norm": "linf"}])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(InvalidParameterError):
        Smoothing(**{"sigma": 0.25, **kwargs})


def test_adapter_predict_path_matches_network_path():
    torch = pytest.importorskip("torch")
    from robeval.adapters.base import load_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    adapter = load_model(model, input_shape=(1, 6))
    x = numpy.random.default_rng(2).uniform(0, 1, (3, 1, 6)).astype(numpy.float32)
    y = adapter.predict(x).argmax(1)
    cert = Smoothing(sigma=0.25, n=2000, batch_size=6000)
    via_net = cert.certify(adapter.to_network(), x, y, [0.1])
    via_fn = cert.certify_fn(adapter.predict, x, y, [0.1], num_classes=3)
    assert via_net.predictions.tolist() == via_fn.predictions.tolist()
    numpy.testing.assert_allclose(via_net.radius, via_fn.radius, atol=2e-3)
