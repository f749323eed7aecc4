"""IBP against an independent plain implementation, the auto_LiRPA reference bounds, closed forms,
and sampled points (soundness)."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robeval.certifiers import IBP, ibp_margin_bounds
from robeval.errors import DataRangeError, InputShapeError, InvalidParameterError
from robeval.ir import Network, Node

from nets import random_cnn, random_mlp


def plain_ibp_margins(weights, biases, x, y, eps, domain=(0.0, 1.0)):
    """Textbook IBP with W+ / W- splits (a different formula from robeval's centre/radius form)."""
    lo = numpy.clip(x - eps, *domain).reshape(len(x), -1)
    hi = numpy.clip(x + eps, *domain).reshape(len(x), -1)
    for w, b in zip(weights[:-1], biases[:-1]):
        wp, wn = numpy.maximum(w, 0), numpy.minimum(w, 0)
        lo, hi = lo @ wp.T + hi @ wn.T + b, hi @ wp.T + lo @ wn.T + b
        lo, hi = numpy.maximum(lo, 0), numpy.maximum(hi, 0)
    w, b = weights[-1], biases[-1]
    c = w[y][:, None, :] - w[None]  # (N, K, d)
    cb = b[y][:, None] - b[None]
    out = numpy.einsum("nkd,nd->nk", numpy.maximum(c, 0), lo) + numpy.einsum("nkd,nd->nk", numpy.minimum(c, 0), hi) + cb
    out[numpy.arange(len(x)), y] = numpy.inf
    return out


def mlp_weights(net):
    dense = [n for n in net.nodes if n.op == "dense"]
    return [n.params["weight"] for n in dense], [n.params["bias"] for n in dense]


def test_matches_plain_implementation():
    rng = numpy.random.default_rng(0)
    net = random_mlp(rng, sizes=(20, 30, 30, 6))
    x = rng.random((50, 1, 20))
    y = rng.integers(0, 6, 50)
    for eps in (0.0, 0.01, 0.1, 0.5):
        ours = ibp_margin_bounds(net, x, y, eps)
        ref = plain_ibp_margins(*mlp_weights(net), x, y, eps)
        finite = numpy.isfinite(ref)
        rel = numpy.abs(ours[finite] - ref[finite]) / numpy.maximum(1.0, numpy.abs(ref[finite]))
        assert rel.max() <= 1e-9, f"eps={eps}: max relative difference {rel.max()}"
        assert (ours[finite] <= ref[finite] + 1e-15).all(), "robeval must never be tighter than exact IBP"


def reference_network(path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    nodes, prev = [Node("flat", "flatten", ("input",))], "flat"
    for i, g in enumerate(gemms):
        nodes.append(Node(f"fc{i}", "dense", (prev,), {"weight": inits[g.input[1]], "bias": inits[g.input[2]]}))
        prev = f"fc{i}"
        if i < len(gemms) - 1:
            nodes.append(Node(f"relu{i}", "relu", (prev,)))
            prev = f"relu{i}"
    return Network(nodes, (1, 28, 28))


def test_float32_mode_is_sound_and_close_to_reference(reference_bounds, reference_onnx):
    """In float32 robeval adds Higham's rounding term (gamma_n ~ n * 6e-8), so its bounds sit slightly
    below auto_LiRPA's float32 bounds, which ignore rounding: never above the float64 truth."""
    ref = reference_bounds
    net = reference_network(reference_onnx).astype(numpy.float32)
    lower = IBP(dtype=numpy.float32).margin_lower(net, ref["x"], ref["y"], float(ref["eps"]))
    ours = _in_reference_order(lower, ref["C_margin"]).astype(numpy.float64)
    truth = ref["ibp_f64_margin_lb"]
    assert (ours <= truth).all()
    assert (numpy.abs(ours - truth) / numpy.maximum(1.0, numpy.abs(truth))).max() <= 1e-3


def _in_reference_order(lower, c_margin):
    j = numpy.argmin(c_margin, axis=2)  # the column with -1 in each specification row
    return numpy.take_along_axis(lower, j, axis=1)


@pytest.mark.parametrize("key,tol", [("ibp_f64_margin_lb", 1e-6), ("ibp_margin_lb", 1e-5)])
def test_matches_reference_bounds(reference_bounds, reference_onnx, key, tol):
    """robeval's default (float64 with a rounding term) against auto_LiRPA in float64 and float32."""
    ref = reference_bounds
    net = reference_network(reference_onnx).astype(numpy.float64)
    lower = IBP().margin_lower(net, ref["x"].astype(numpy.float64), ref["y"], float(ref["eps"]))
    ours = _in_reference_order(lower, ref["C_margin"])
    rel = numpy.abs(ours - ref[key]) / numpy.maximum(1.0, numpy.abs(ref[key]))
    assert rel.max() <= tol, f"max relative difference to auto_LiRPA {rel.max():.3g}"
    lo, hi = net.astype(numpy.float64).interval(ref["x_L"].astype(numpy.float64), ref["x_U"].astype(numpy.float64))
    assert numpy.abs(lo - ref["ibp_f64_lb"]).max() <= 1e-6 * numpy.abs(ref["ibp_f64_lb"]).max()
    assert numpy.abs(hi - ref["ibp_f64_ub"]).max() <= 1e-6 * numpy.abs(ref["ibp_f64_ub"]).max()


def _sample_box(rng, x, eps, n, domain=(0.0, 1.0)):
    lo, hi = numpy.clip(x - eps, *domain), numpy.clip(x + eps, *domain)
    u = rng.random((n,) + x.shape)
    u[: n // 4] = numpy.round(u[: n // 4])  # corners of the box
    return lo + u * (hi - lo)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(0.0, 0.5), kind=st.sampled_from(
    ["relu", "leaky_relu", "sigmoid", "tanh", "cnn_max", "cnn_avg"]))
def test_sampled_points_never_beat_the_bound(seed, eps, kind):
    rng = numpy.random.default_rng(seed)
    if kind.startswith("cnn"):
        net = random_cnn(rng, pool="maxpool" if kind == "cnn_max" else "avgpool")
    else:
        net = random_mlp(rng, act=kind)
    x = rng.random((1,) + net.input_shape)
    k = net.shapes()[net.output_name][0]
    y = numpy.array([rng.integers(0, k)])
    lower = ibp_margin_bounds(net, x, y, eps)[0]
    pts = _sample_box(rng, x[0], eps, 2000)
    z = net.forward(pts)
    margins = z[:, y[0]][:, None] - z
    margins[:, y[0]] = numpy.inf
    worst = margins.min(axis=0)
    try:
        assert (worst >= lower).all()
    except AssertionError as exc:
        exc.add_note(f"seed={seed} eps={eps} kind={kind} violations at {numpy.nonzero(worst < lower)[0]}")
        raise
    lo, hi = net.interval(numpy.clip(x - eps, 0, 1), numpy.clip(x + eps, 0, 1))
    assert (net.forward(pts) >= lo).all() and (net.forward(pts) <= hi).all()


def test_eps_zero_gives_the_forward_margin_and_bounds_widen_with_eps():
    rng = numpy.random.default_rng(1)
    net = random_cnn(rng)
    x = rng.random((8,) + net.input_shape)
    y = rng.integers(0, 4, 8)
    z = net.forward(x)
    exact = z[numpy.arange(8), y][:, None] - z
    lower0 = ibp_margin_bounds(net, x, y, 0.0)
    mask = numpy.isfinite(lower0)
    assert numpy.allclose(lower0[mask], exact[mask], rtol=1e-9, atol=1e-12)
    assert (lower0[mask] <= exact[mask]).all()
    previous = lower0
    for eps in (0.001, 0.01, 0.05, 0.2):
        current = ibp_margin_bounds(net, x, y, eps)
        assert (current[mask] <= previous[mask]).all()
        previous = current


def test_single_affine_layer_closed_form():
    """For one dense layer without clipping: lower = margin - eps * ||W_y - W_j||_1."""
    rng = numpy.random.default_rng(2)
    w, b = rng.normal(size=(5, 9)), rng.normal(size=5)
    net = Network([Node("fc", "dense", ("input",), {"weight": w, "bias": b})], (9,))
    x = rng.normal(size=(3, 9))
    y = numpy.array([0, 3, 4])
    eps = 0.3
    lower = ibp_margin_bounds(net, x, y, eps, domain=None)
    z = x @ w.T + b
    for i in range(3):
        for j in range(5):
            if j == y[i]:
                continue
            expected = z[i, y[i]] - z[i, j] - eps * numpy.abs(w[y[i]] - w[j]).sum()
            assert lower[i, j] == pytest.approx(expected, rel=1e-12, abs=1e-12)
            assert lower[i, j] <= expected


def test_float32_bounds_are_sound_against_float64_forward():
    rng = numpy.random.default_rng(3)
    net = random_mlp(rng, sizes=(50, 64, 64, 10))
    x = rng.random((20, 1, 50))
    y = rng.integers(0, 10, 20)
    lower32 = ibp_margin_bounds(net.astype(numpy.float32), x.astype(numpy.float32), y, 0.0)
    z = net.forward(x)
    exact = z[numpy.arange(20), y][:, None] - z
    mask = numpy.isfinite(lower32)
    assert (lower32[mask] <= exact[mask]).all()


def test_certify_verdicts_and_errors():
    rng = numpy.random.default_rng(4)
    net = random_mlp(rng)
    x = rng.random((30, 1, 12))
    y = net.forward(x).argmax(axis=1)
    y[:5] = (y[:5] + 1) % 5  # five wrong labels: falsified
    res = IBP().certify(net, x, y, [0.0, 0.001, 10.0])
    assert res.clean_accuracy == pytest.approx(25 / 30)
    assert (res.verdicts[:5] == "falsified").all()
    assert res.certified_accuracy[0] == pytest.approx(25 / 30)
    assert res.certified_accuracy[2] == 0.0
    assert res.to_dict()["results"][0]["counts"] == {"verified": 25, "falsified": 5, "unknown": 0}
    with pytest.raises(InvalidParameterError, match="eps=-0.1"):
        IBP().certify(net, x, y, -0.1)
    bad = x.copy()
    bad[0, 0, 0] = numpy.nan
    with pytest.raises(DataRangeError, match="NaN"):
        IBP().certify(net, bad, y, 0.1)
    with pytest.raises(DataRangeError, match="outside the input domain"):
        IBP().certify(net, x * 3, y, 0.1)
    with pytest.raises(InputShapeError, match=r"expected \(N, 1, 12\)"):
        IBP().certify(net, x[:, 0], y, 0.1)
    with pytest.raises(InvalidParameterError, match="norm"):
        IBP(norm="l7")


def test_batch_size_does_not_change_results():
    rng = numpy.random.default_rng(5)
    net = random_cnn(rng)
    x = rng.random((17,) + net.input_shape)
    y = rng.integers(0, 4, 17)
    a = IBP(batch_size=4).certify(net, x, y, [0.01, 0.05])
    b = IBP().certify(net, x, y, [0.01, 0.05])
    assert numpy.array_equal(a.bound, b.bound)
