"""Lipschitz-margin certificates: global bounds against sampled pairs and explicit matrices, radii
against a closed form and against sampled perturbations inside the certified ball."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robeval.certifiers import LipschitzMargin, certified_radii, pairwise_lipschitz
from robeval.ir import Network, Node
from robeval.ir.ops.conv import conv_norm_bound

from nets import random_cnn, random_mlp


def explicit_conv_matrix(weight, in_shape, stride, padding, dilation=(1, 1), groups=1):
    node = Node("c", "conv", ("input",), {"weight": weight}, {"stride": stride, "padding": padding,
                                                            "dilation": dilation, "groups": groups})
    net = Network([node], in_shape)
    d = int(numpy.prod(in_shape))
    basis = numpy.eye(d).reshape((d,) + in_shape)
    return net.forward(basis).reshape(d, -1).T


@pytest.mark.parametrize("stride,padding,dilation,groups", [
    ((1, 1), (0, 0, 0, 0), (1, 1), 1), ((1, 1), (1, 1, 1, 1), (1, 1), 1), ((2, 2), (1, 0, 2, 1), (1, 1), 1),
    ((1, 2), (2, 2, 2, 2), (2, 1), 1), ((1, 1), (1, 1, 1, 1), (1, 1), 2)])
def test_conv_bound_is_above_the_exact_norm(stride, padding, dilation, groups):
    rng = numpy.random.default_rng(0)
    weight = rng.normal(size=(4, 4 // groups, 3, 3))
    in_shape = (4, 6, 5)
    exact = numpy.linalg.norm(explicit_conv_matrix(weight, in_shape, stride, padding, dilation, groups), 2)
    bound = conv_norm_bound(weight, in_shape[1:], padding, dilation, groups)
    assert bound >= exact
    if stride == (1, 1):
        assert bound <= 1.6 * exact  # the circular embedding is tight up to border effects


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["mlp", "tanh", "cnn_max", "cnn_avg"]))
def test_global_bound_holds_on_random_pairs(seed, kind):
    rng = numpy.random.default_rng(seed)
    if kind.startswith("cnn"):
        net = random_cnn(rng, pool="maxpool" if kind == "cnn_max" else "avgpool")
    else:
        net = random_mlp(rng, act="relu" if kind == "mlp" else "tanh")
    lip = net.lipschitz_bound()
    x = rng.random((400,) + net.input_shape)
    x2 = x + rng.normal(size=x.shape) * rng.choice([1e-3, 0.1, 1.0])
    ratio = numpy.linalg.norm((net(x) - net(x2)).reshape(400, -1), axis=1) / numpy.linalg.norm(
        (x - x2).reshape(400, -1), axis=1)
    assert ratio.max() <= lip, f"seed={seed}: empirical {ratio.max()} > bound {lip}"


def test_single_dense_layer_radius_is_exact():
    """For z = Wx + b the distance to the decision boundary of class j is (z_y - z_j) / ||W_y - W_j||."""
    rng = numpy.random.default_rng(1)
    w, b = rng.normal(size=(4, 6)), rng.normal(size=4)
    net = Network([Node("fc", "dense", ("input",), {"weight": w, "bias": b})], (6,))
    x = rng.normal(size=(10, 6))
    z = x @ w.T + b
    y = z.argmax(axis=1)
    radius = certified_radii(net, x, y)
    for i in range(10):
        expected = min((z[i, y[i]] - z[i, j]) / numpy.linalg.norm(w[y[i]] - w[j]) for j in range(4) if j != y[i])
        assert radius[i] == pytest.approx(expected, rel=1e-7)
        assert radius[i] <= expected


def test_pairwise_bound_uses_row_differences():
    rng = numpy.random.default_rng(2)
    net = random_mlp(rng, sizes=(8, 10, 3))
    pair = pairwise_lipschitz(net)
    w = net.nodes[-1].params["weight"]
    below = numpy.linalg.norm(net.nodes[1].params["weight"], 2)
    assert pair[0, 1] == pytest.approx(numpy.linalg.norm(w[0] - w[1]) * below, rel=1e-8)
    assert pair[0, 0] == 0


def test_no_perturbation_inside_the_certified_ball_flips_the_class():
    rng = numpy.random.default_rng(3)
    net = random_cnn(rng)
    x = rng.random((20,) + net.input_shape)
    y = net.forward(x).argmax(axis=1)
    res = LipschitzMargin(norm="l2").certify(net, x, y, [0.0])
    radius = res.certified_radius
    for i in numpy.nonzero(radius > 0)[0]:
        d = rng.normal(size=(500,) + net.input_shape)
        d /= numpy.linalg.norm(d.reshape(500, -1), axis=1).reshape(500, 1, 1, 1)
        pts = x[i] + d * radius[i] * rng.random((500, 1, 1, 1))
        assert (net.forward(pts).argmax(axis=1) == y[i]).all()
    assert res.lipschitz_bound == pytest.approx(net.lipschitz_bound())


def test_linf_radius_is_scaled_by_sqrt_dimension():
    rng = numpy.random.default_rng(4)
    net = random_mlp(rng)
    x = rng.random((10, 1, 12))
    y = net.forward(x).argmax(axis=1)
    l2 = LipschitzMargin(norm="l2").certify(net, x, y, [0.0]).certified_radius
    linf = LipschitzMargin(norm="linf").certify(net, x, y, [0.0]).certified_radius
    assert numpy.allclose(linf, l2 / numpy.sqrt(12))
