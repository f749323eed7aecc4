"""--mean/--std as the network's first ops: certificates in pixel space equal certificates of the
normalised model on the per-channel scaled box."""

from __future__ import annotations

import numpy
import pytest

from robeval.adapters.base import NetworkModel
from robeval.certifiers import get_certifier
from robeval.errors import InvalidParameterError
from robeval.ir.normalize import NormalisedAdapter, prepend_normalisation

from nets import random_cnn

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]


def setup():
    rng = numpy.random.default_rng(0)
    net = random_cnn(rng, (3, 3, 4))
    x = rng.uniform(0, 1, (6, 3, 8, 8))
    m, s = numpy.array(MEAN)[:, None, None], numpy.array(STD)[:, None, None]
    return net, x, m, s


def test_forward_is_the_normalised_model():
    net, x, m, s = setup()
    comp = prepend_normalisation(net, MEAN, STD)
    numpy.testing.assert_allclose(comp.forward(x), net.forward((x - m) / s), rtol=0, atol=1e-12)
    assert comp.meta["normalisation"]["std"] == pytest.approx(STD)


def test_ibp_of_composite_equals_ibp_on_scaled_box():
    """Pixel box [x - e, x + e] through (x - m) / s is exactly the box [(x - e - m) / s, (x + e - m) / s]
    per channel; the composite's IBP bounds contain the inner IBP bounds and differ only by rounding."""
    net, x, m, s = setup()
    comp = prepend_normalisation(net, MEAN, STD)
    e = 2 / 255
    lo, hi = comp.interval(x - e, x + e)
    lo_in, hi_in = net.interval((x - e - m) / s, (x + e - m) / s)
    assert (lo <= lo_in).all() and (hi >= hi_in).all()
    numpy.testing.assert_allclose(lo, lo_in, atol=1e-9)
    numpy.testing.assert_allclose(hi, hi_in, atol=1e-9)


def test_certified_counts_match_eps_over_sigma_with_one_std():
    """With one std for all channels, IBP at eps in pixel space equals IBP at eps / std on the
    normalised inputs (domain off, so no clipping differs)."""
    net, x, _, _ = setup()
    comp = prepend_normalisation(net, 0.5, 0.25)
    y = comp.forward(x).argmax(1)
    eps = [0.002, 0.01, 0.03]
    outer = get_certifier("ibp", domain=None).certify(comp, x, y, eps)
    inner = get_certifier("ibp", domain=None).certify(net, (x - 0.5) / 0.25, y, [e / 0.25 for e in eps])
    assert [outer.counts(i) for i in range(3)] == [inner.counts(i) for i in range(3)]
    numpy.testing.assert_allclose(outer.bound, inner.bound, atol=1e-9)
    assert outer.counts(0)["verified"] > 0  # not a vacuous comparison


def test_adapter_predict_and_gradient_in_pixel_space():
    net, x, m, s = setup()
    inner = NetworkModel(net)
    wrapped = NormalisedAdapter(inner, MEAN, STD)
    numpy.testing.assert_allclose(wrapped.predict(x), inner.predict(((x - m) / s).astype(numpy.float32)), atol=1e-5)
    y = wrapped.predict(x).argmax(1)
    g = wrapped.input_gradient(x, y)
    h = 1e-4
    d = numpy.zeros_like(x)
    d[0, 1, 2, 3] = h
    from robeval.adapters.gradients import loss_gradient_network  # noqa: F401  (the same loss as the adapter)
    net_n = wrapped.to_network()
    logits = lambda z: net_n.forward(z)  # noqa: E731
    def ce(z):
        out = logits(z)
        out = out - out.max(1, keepdims=True)
        return -(out[numpy.arange(len(z)), y] - numpy.log(numpy.exp(out).sum(1))).sum()
    numeric = (ce(x + d) - ce(x - d)) / (2 * h)
    assert g[0, 1, 2, 3] == pytest.approx(numeric, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("mean, std", [([0.5, 0.5], [0.2, 0.2]), ([0.5], [0.0]), ([0.5], [float("nan")]),
                                       ([0.1, 0.2, 0.3], [0.1, 0.2])])
def test_bad_mean_std_refused(mean, std):
    net, _, _, _ = setup()
    with pytest.raises(InvalidParameterError):
        prepend_normalisation(net, mean, std)
