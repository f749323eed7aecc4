"""CROWN's patches mode (robeval/certifiers/crown_patches.py): the bounds of every conv neuron from
local windows equal the dense backward pass, a textbook dense-matrix CROWN, and never exclude a
sampled point; the mode is chosen only where it moves fewer floats."""

from __future__ import annotations

import numpy
import pytest
from test_crown import conv_matrix, plain_crown

from robeval.certifiers import crown
from robeval.certifiers.crown import _Batch, crown_margin_bounds
from robeval.certifiers.crown_patches import Window, patch_bounds, patch_chain, pays
from robeval.ir import Network, Node

from reference_helpers import relative_error

BIG = 2.0**40  # a memory budget (bytes) that never splits the work


def conv(name, inp, rng, cin, cout, k, stride=1, pad=0, dilation=1, groups=1, bias=True):
    params = {"weight": rng.normal(size=(cout, cin // groups, k, k)) / k}
    if bias:
        params["bias"] = rng.normal(size=cout) * 0.1
    return Node(name, "conv", (inp,), params, {"stride": (stride, stride), "padding": (pad, pad + 1, pad, pad),
                                              "dilation": (dilation, dilation), "groups": groups})


def chain_net(rng, act="relu", hw=12, stride=2, pad=1, dilation=1, groups=1, direct=False, cin=1):
    """conv -> act -> conv [-> conv] -> act -> flatten -> dense: every conv bound by patches."""
    nodes = [conv("c1", "input", rng, cin, 4, 3, stride, pad, 1, 1)]
    nodes.append(Node("a1", act, ("c1",), attrs={"alpha": 0.1} if act == "leaky_relu" else {}))
    nodes.append(conv("c2", "a1", rng, 4, 6, 3, 1, pad, dilation, groups))
    last = "c2"
    if direct:  # two convolutions with nothing between them
        nodes.append(conv("c3", "c2", rng, 6, 4, 2, 1, 0, bias=False))
        last = "c3"
    nodes += [Node("a2", act, (last,), attrs={"alpha": 0.1} if act == "leaky_relu" else {}),
              Node("f", "flatten", ("a2",))]
    return with_head(rng, nodes, (cin, hw, hw + 1))


def with_head(rng, nodes, input_shape, classes=5):
    """The network ``nodes`` (ending in flatten 'f') followed by a dense layer to ``classes`` logits."""
    d = int(numpy.prod(Network(nodes, input_shape).shapes()["f"]))
    fc = Node("fc", "dense", ("f",), {"weight": rng.normal(size=(classes, d)) / numpy.sqrt(d),
                                      "bias": rng.normal(size=classes)})
    return Network(nodes + [fc], input_shape)


def dense_and_patch_bounds(net, name, x, eps, norm="linf", slopes=None):
    run = _Batch(net, x, eps, norm, (0.0, 1.0))
    if slopes:
        run.lower_slopes.update(slopes)
    size = int(numpy.prod(run.shapes[name]))
    dense = run.neuron_bounds(name, numpy.arange(size), 4 * size)
    chain = patch_chain(net, name)
    assert chain is not None
    return dense, patch_bounds(run, chain, BIG)


CASES = {
    "stride 2, pad": dict(stride=2, pad=1),
    "dilation": dict(stride=1, pad=2, dilation=2),
    "groups": dict(stride=2, pad=1, groups=2),
    "conv after conv": dict(stride=1, pad=1, direct=True),
    "leaky relu": dict(act="leaky_relu"),
    "sigmoid": dict(act="sigmoid"),
    "three channels in": dict(cin=3),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_patch_bounds_equal_the_dense_pass_for_every_neuron(case, norm):
    rng = numpy.random.default_rng(abs(hash(case)) % 1000)
    net = chain_net(rng, **CASES[case])
    x = rng.random((6,) + net.input_shape)
    last = "c3" if CASES[case].get("direct") else "c2"
    for eps in (0.02, 0.2):
        (dlo, dhi), (plo, phi) = dense_and_patch_bounds(net, last, x, eps, norm)
        assert relative_error(plo, dlo) <= 1e-10, (case, eps)
        assert relative_error(phi, dhi) <= 1e-10, (case, eps)
        assert (plo <= phi).all()


def test_alpha_slopes_are_honoured_as_in_the_dense_pass():
    rng = numpy.random.default_rng(3)
    net = chain_net(rng)
    x = rng.random((4,) + net.input_shape)
    alpha = rng.uniform(-0.5, 1.5, size=(4,) + net.shapes()["c1"])  # clipped to [0, 1] by both passes
    (dlo, dhi), (plo, phi) = dense_and_patch_bounds(net, "c2", x, 0.1, slopes={"a1": alpha})
    assert relative_error(plo, dlo) <= 1e-10 and relative_error(phi, dhi) <= 1e-10


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_sampled_points_never_leave_the_patch_bounds(dtype):
    rng = numpy.random.default_rng(7)
    net = chain_net(rng, direct=True).astype(dtype)
    x = rng.random((3,) + net.input_shape).astype(dtype)
    eps = 0.15
    run = _Batch(net, x, eps, "linf", (0.0, 1.0))
    for name in ("c2", "c3"):
        lo, hi = patch_bounds(run, patch_chain(net, name), BIG)
        lo, hi = lo.reshape(3, -1), hi.reshape(3, -1)
        for _ in range(30):
            pts = numpy.clip(x + rng.uniform(-eps, eps, x.shape), 0, 1)
            pts = numpy.where(rng.random(x.shape) < 0.5, numpy.clip(x - eps, 0, 1), pts)  # corners too
            z = net.astype(numpy.float64).forward(pts.astype(numpy.float64), keep=True)[name].reshape(3, -1)
            assert (z >= lo).all() and (z <= hi).all(), name


def two_conv_layers(net):
    """chain_net(direct=False, relu) as explicit (W, b) layers with a ReLU between them."""
    nodes = {n.name: n for n in net.nodes}
    c1, c2, fc = nodes["c1"], nodes["c2"], nodes["fc"]
    m1, s1 = conv_matrix(c1.params["weight"], net.input_shape, c1.attrs["stride"], c1.attrs["padding"])
    m2, s2 = conv_matrix(c2.params["weight"], s1, c2.attrs["stride"], c2.attrs["padding"])
    return [(m1, numpy.repeat(c1.params["bias"], s1[1] * s1[2])),
            (m2, numpy.repeat(c2.params["bias"], s2[1] * s2[2])), (fc.params["weight"], fc.params["bias"])]


@pytest.mark.parametrize("mode", ["crown", "crown-pure"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_margins_match_a_textbook_dense_crown_with_patches_in_use(mode, norm, monkeypatch):
    rng = numpy.random.default_rng(11)
    net = chain_net(rng, hw=10, stride=2, pad=1)
    x = rng.random((8,) + net.input_shape)
    y = rng.integers(0, 5, 8)
    calls = []
    original = crown.patch_bounds
    monkeypatch.setattr(crown, "patch_bounds", lambda *a: calls.append(1) or original(*a))
    layers = two_conv_layers(net)
    for eps in (0.01, 0.05, 0.2):
        ours = crown_margin_bounds(net, x, y, eps, norm=norm, method=mode)
        ref = plain_crown(layers, x, y, eps, norm=norm, mode=mode)
        finite = numpy.isfinite(ref)
        assert relative_error(ours[finite], ref[finite]) <= 1e-9, eps
        assert (ours[finite] <= ref[finite]).all()
    assert calls, "the patches mode was not used"


def test_patches_off_gives_the_same_margins(monkeypatch):
    rng = numpy.random.default_rng(5)
    net = chain_net(rng, hw=14)
    x = rng.random((7,) + net.input_shape)
    y = rng.integers(0, 5, 7)
    on = crown_margin_bounds(net, x, y, 0.08, method="crown")
    monkeypatch.setattr(_Batch, "patches", False)
    off = crown_margin_bounds(net, x, y, 0.08, method="crown")
    finite = numpy.isfinite(off)
    assert relative_error(on[finite], off[finite]) <= 1e-10


def test_patches_are_chosen_only_where_they_move_fewer_floats():
    rng = numpy.random.default_rng(0)
    small = chain_net(rng, hw=28, stride=2, pad=1)
    run = _Batch(small, rng.random((1,) + small.input_shape), 0.1, "linf", (0.0, 1.0))
    chain = patch_chain(small, "c2")
    assert [n.name for n in chain] == ["c2", "a1", "c1"]
    size = int(numpy.prod(run.shapes["c2"]))
    assert pays(run, chain, size)  # 5x5 windows on a 14x15 map
    assert not pays(run, chain, 2)  # two neurons are cheaper as dense rows
    # a window as large as the input: dense rows are cheaper
    tiny = with_head(rng, [conv("c1", "input", rng, 1, 2, 3, 1, 1), Node("r", "relu", ("c1",)),
                           conv("c2", "r", rng, 2, 2, 3, 1, 1), Node("r2", "relu", ("c2",)),
                           Node("f", "flatten", ("r2",))], (1, 3, 3))
    run = _Batch(tiny, rng.random((1, 1, 3, 3)), 0.1, "linf", (0.0, 1.0))
    assert not pays(run, patch_chain(tiny, "c2"), int(numpy.prod(run.shapes["c2"])))


def test_chains_through_other_ops_fall_back_to_dense_rows():
    rng = numpy.random.default_rng(0)
    pool = Node("p", "avgpool", ("c1",), attrs={"kernel": (2, 2), "stride": (2, 2)})
    nodes = [conv("c1", "input", rng, 1, 2, 3, 1, 1), pool,
             conv("c2", "p", rng, 2, 2, 3, 1, 1), Node("r", "relu", ("c2",)), Node("f", "flatten", ("r",))]
    net = with_head(rng, nodes, (1, 8, 9))
    assert patch_chain(net, "c2") is None
    assert patch_chain(net, "c1") is not None
    assert patch_chain(net, "fc") is None


def test_window_geometry_through_a_strided_conv():
    rng = numpy.random.default_rng(0)
    node = conv("c", "x", rng, 2, 3, 4, stride=2, pad=1)
    win = Window((1, 1), (1, 1), (3, 3), (5, 5)).through_conv(node)
    assert win.stride == (2, 2) and win.offset == (3, 4) and win.kernel == (8, 8)
