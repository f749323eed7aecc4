"""Noise sweeps: reproducible from a seed, honest confidence intervals (simulated coverage with a
known accuracy), each corruption doing what it says, and bad input refused."""

from __future__ import annotations

import json

import numpy
import pytest

from robeval.adapters.base import NetworkModel
from robeval.certifiers.noise import (
    NoiseSweep,
    apply_noise,
    base_noise,
    clustered_interval,
    sweep,
    wilson_interval,
)
from robeval.errors import DataRangeError, InvalidParameterError

from nets import random_cnn


class CoinModel:
    """Right with probability p under uniform noise of level 0.5 around the constant image 0.5:
    the first noisy pixel is U[0, 1], and the model says class 0 (the label) iff it is below p."""

    input_shape = (1, 2, 2)
    num_classes = 2
    outputs_probabilities = False

    def __init__(self, p: float):
        self.p = p

    def predict(self, x):
        right = (x[:, 0, 0, 0] < self.p).astype(numpy.float64)
        return numpy.stack([right, 1 - right], axis=1)


def coin_data(n: int):
    return numpy.full((n, 1, 2, 2), 0.5, dtype=numpy.float32), numpy.zeros(n, dtype=numpy.int64)


@pytest.fixture(scope="module")
def cnn():
    rng = numpy.random.default_rng(0)
    model = NetworkModel(random_cnn(rng, channels=(3, 4, 4)))
    x = rng.uniform(size=(40, 3, 8, 8)).astype(numpy.float32)
    return model, x, model.predict(x).argmax(1)


# ---------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("kind", ["uniform", "gaussian", "replace"])
def test_sweeps_are_reproducible_from_the_seed(cnn, kind):
    model, x, y = cnn
    a, b = (NoiseSweep(kind, draws=4, seed=3)(model, x, y) for _ in range(2))
    numpy.testing.assert_array_equal(a.per_image, b.per_image)
    assert a.accuracy == b.accuracy and a.ci_low == b.ci_low
    other = NoiseSweep(kind, draws=4, seed=4)(model, x, y)
    assert not numpy.array_equal(a.per_image, other.per_image)
    batched = NoiseSweep(kind, draws=4, seed=3, batch_size=7)(model, x, y)
    numpy.testing.assert_array_equal(a.per_image, batched.per_image)  # batches do not change draws
    assert a.accuracy[0] == a.clean_accuracy == 1.0
    json.dumps(a.to_dict(samples=True))


# ---------------------------------------------------------------------------- intervals
def test_interval_covers_a_known_accuracy():
    p, runs, covered = 0.8, 200, 0
    x, y = coin_data(40)
    model = CoinModel(p)
    for seed in range(runs):
        r = NoiseSweep("uniform", levels=[0.5], draws=5, seed=seed)(model, x, y)
        covered += r.ci_low[0] <= p <= r.ci_high[0]
    assert covered >= 0.9 * runs, covered


def test_clustered_interval_covers_when_draws_are_correlated():
    """Images with their own accuracy p_i ~ Beta(2, 1) (mean 2/3): the draws of one image are
    correlated, and the plain Wilson interval over draws x images under-covers."""
    rng = numpy.random.default_rng(0)
    n, m, truth = 50, 20, 2 / 3
    ours = naive = 0
    for _ in range(200):
        frac = rng.binomial(m, rng.beta(2, 1, size=n)) / m
        p, lo, hi, deff = clustered_interval(frac, m)
        ours += lo <= truth <= hi
        nlo, nhi = wilson_interval(p, n * m)
        naive += nlo <= truth <= nhi
        assert 1 <= deff <= m
    assert ours >= 180, ours
    assert naive < ours  # the correction is needed


def test_wilson_interval_edges():
    lo, hi = wilson_interval(1.0, 100)
    assert hi == 1.0 and 0.95 < lo < 1.0
    assert wilson_interval(0.5, 0) == (0.0, 1.0)
    p, lo, hi, deff = clustered_interval(numpy.ones(30), 5)
    assert (p, hi, deff) == (1.0, 1.0, 5.0)  # no spread to estimate: images are the units
    assert lo == pytest.approx(wilson_interval(1.0, 30)[0])


# ---------------------------------------------------------------------------- the corruptions
def test_corruptions_do_what_they_say():
    rng = numpy.random.default_rng(1)
    x = rng.uniform(size=(6, 3, 10, 10)).astype(numpy.float32)
    noise = base_noise(numpy.random.default_rng(2), x.shape, "uniform")
    out = apply_noise(numpy, x, noise, "uniform", 0.1, (0.0, 1.0))
    assert out.dtype == x.dtype and out.min() >= 0 and out.max() <= 1
    assert numpy.abs(out - x).max() <= 0.1 + 1e-6
    noise = base_noise(numpy.random.default_rng(2), x.shape, "gaussian")
    out = apply_noise(numpy, x, noise, "gaussian", 0.05, None or (-numpy.inf, numpy.inf))
    assert abs(float((out - x).std()) - 0.05) < 0.005
    noise = base_noise(numpy.random.default_rng(2), x.shape, "replace")
    for p in (0.0, 0.25, 0.5):
        out = apply_noise(numpy, x, noise, "replace", p, (0.0, 1.0))
        changed = (out != x).any(axis=1)  # per pixel
        assert (changed.reshape(6, -1).sum(axis=1) == round(p * 100)).all()
        grey = out.transpose(0, 2, 3, 1)[changed]
        assert (grey == grey[:, :1]).all()  # all channels of a replaced pixel share one grey value
    small = apply_noise(numpy, x, noise, "replace", 0.1, (0.0, 1.0)) != x
    assert (small <= (apply_noise(numpy, x, noise, "replace", 0.3, (0.0, 1.0)) != x)).all()  # nested


def test_sweep_api(cnn):
    model, x, y = cnn
    r = sweep(model.network, (x, y), kind="gaussian", levels=[0, 0.1, 1.0], draws=3, seed=0)
    assert r.accuracy[0] == 1.0 and r.accuracy[2] < r.accuracy[0]
    assert all(lo <= a <= hi for a, lo, hi in zip(r.accuracy, r.ci_low, r.ci_high))
    assert r.to_dict()["results"][1]["level"] == 0.1


# ---------------------------------------------------------------------------- bad input
def test_bad_parameters_raise_project_errors(cnn):
    model, x, y = cnn
    with pytest.raises(InvalidParameterError, match="kind"):
        NoiseSweep("salt")
    with pytest.raises(InvalidParameterError, match="level"):
        NoiseSweep("uniform", levels=[-0.1])
    with pytest.raises(InvalidParameterError, match="proportion"):
        NoiseSweep("replace", levels=[0.2, 1.5])
    with pytest.raises(InvalidParameterError, match="draws"):
        NoiseSweep(draws=0)
    with pytest.raises(InvalidParameterError, match="confidence"):
        NoiseSweep(confidence=1.5)
    bad = x.copy()
    bad[0, 0, 0, 0] = numpy.nan
    with pytest.raises(DataRangeError, match="NaN"):
        NoiseSweep(draws=1)(model, bad, y)
