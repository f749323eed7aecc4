"""CROWN / CROWN-IBP against the auto_LiRPA reference bounds, a plain dense-matrix CROWN written here,
closed forms, and sampled points (soundness) on random networks with every supported op."""

from __future__ import annotations

import math

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robeval.certifiers import IBP, get_certifier, ibp_margin_bounds
from robeval.certifiers.crown import CROWN, Best, crown_margin_bounds
from robeval.errors import InvalidParameterError, RobevalError, UnsupportedOpError
from robeval.ir import Network, Node

from nets import random_cnn, random_mlp
from reference_helpers import in_reference_order, reference_network, relative_error

METHODS = ("crown", "crown-pure", "crown-ibp")


# ----------------------------------------------------------------------------- a plain CROWN
def _relu_lines(lo, hi):
    """CROWN's adaptive ReLU relaxation: lower slope, upper slope, upper intercept."""
    unstable = (lo < 0) & (hi > 0)
    width = numpy.where(unstable, hi - lo, 1.0)
    up = numpy.where(unstable, hi / width, (lo >= 0) * 1.0)
    icpt = numpy.where(unstable, -hi * lo / width, 0.0)
    low = numpy.where(unstable, (hi > -lo) * 1.0, (lo >= 0) * 1.0)
    return low, up, icpt


def plain_crown(layers, x, y, eps, norm="linf", mode="crown-pure", domain=(0.0, 1.0)):
    """Textbook CROWN on explicit matrices ``layers`` = [(W, b), ...] with a ReLU between consecutive
    layers, one layer at a time. mode: 'crown-pure' (every pre-activation bound by CROWN), 'crown'
    (CROWN only where IBP leaves a neuron unstable, intersected with IBP), 'crown-ibp'."""
    n = len(x)
    x = x.reshape(n, -1)
    if norm == "linf":
        lo, hi = numpy.clip(x - eps, *domain), numpy.clip(x + eps, *domain)
    else:
        lo, hi = x - eps, x + eps

    def concretize(a, c):
        if norm == "linf":
            return c + numpy.einsum("nsd,nd->ns", numpy.maximum(a, 0), lo) + numpy.einsum(
                "nsd,nd->ns", numpy.minimum(a, 0), hi)
        return c + numpy.einsum("nsd,nd->ns", a, x) - eps * numpy.linalg.norm(a, axis=-1)

    def backsub(a, c, k, bounds):  # a acts on the output of affine layer k
        for j in range(k, -1, -1):
            w, b = layers[j]
            c = c + a @ b
            a = a @ w
            if j == 0:
                break
            low, up, icpt = _relu_lines(*bounds[j - 1])
            pos, neg = numpy.maximum(a, 0), numpy.minimum(a, 0)
            c = c + numpy.einsum("nsd,nd->ns", neg, icpt)
            a = pos * low[:, None] + neg * up[:, None]
        return concretize(a, c)

    ibp, l, h = [], lo, hi
    for w, b in layers[:-1]:
        wp, wn = numpy.maximum(w, 0), numpy.minimum(w, 0)
        zl, zh = l @ wp.T + h @ wn.T + b, h @ wp.T + l @ wn.T + b
        ibp.append((zl, zh))
        l, h = numpy.maximum(zl, 0), numpy.maximum(zh, 0)
    bounds = []
    for k, (w, _) in enumerate(layers[:-1]):
        if mode == "crown-ibp":
            bounds.append(ibp[k])
            continue
        m = w.shape[0]
        eye = numpy.concatenate([numpy.eye(m), -numpy.eye(m)])[None].repeat(n, 0)
        lower = backsub(eye, numpy.zeros((n, 2 * m)), k, bounds)
        lk, uk = lower[:, :m], -lower[:, m:]
        if mode == "crown":
            il, ih = ibp[k]
            unstable = (il < 0) & (ih > 0)
            lk = numpy.where(unstable, numpy.maximum(lk, il), il)
            uk = numpy.where(unstable, numpy.minimum(uk, ih), ih)
        bounds.append((lk, uk))
    eye = numpy.eye(layers[-1][0].shape[0])
    spec = eye[y][:, None, :] - eye[None]  # logit[y] - logit[j] on the output
    out = backsub(spec, numpy.zeros(spec.shape[:2]), len(layers) - 1, bounds)
    out[numpy.arange(n), y] = numpy.inf
    return out


def conv_matrix(weight, in_shape, stride, pads):
    """The explicit matrix of a 2-D cross-correlation (loops over taps: an independent definition)."""
    cout, cin, kh, kw = weight.shape
    _, h, w = in_shape
    t, left, b, r = pads
    ho, wo = (h + t + b - kh) // stride[0] + 1, (w + left + r - kw) // stride[1] + 1
    mat = numpy.zeros((cout, ho, wo, cin, h, w))
    for i in range(ho):
        for j in range(wo):
            for a in range(kh):
                for c in range(kw):
                    p, q = i * stride[0] + a - t, j * stride[1] + c - left
                    if 0 <= p < h and 0 <= q < w:
                        mat[:, i, j, :, p, q] += weight[:, :, a, c]
    return mat.reshape(cout * ho * wo, cin * h * w), (cout, ho, wo)


def avgpool_matrix(shape, k):
    c, h, w = shape
    mat = numpy.zeros((c, h // k, w // k, c, h, w))
    for ch in range(c):
        for i in range(h // k):
            for j in range(w // k):
                mat[ch, i, j, ch, i * k:(i + 1) * k, j * k:(j + 1) * k] = 1.0 / (k * k)
    return mat.reshape(c * (h // k) * (w // k), -1)


def cnn_layers(net):
    """random_cnn(pool='avgpool') as explicit (W, b) layers with a ReLU between them."""
    nodes = {n.name: n for n in net.nodes}
    c1, c2, fc = nodes["c1"], nodes["c2"], nodes["fc"]
    m1, s1 = conv_matrix(c1.params["weight"], net.input_shape, c1.attrs["stride"], c1.attrs["padding"])
    pool = avgpool_matrix(s1, 2)
    s_pool = (s1[0], s1[1] // 2, s1[2] // 2)
    m2, s2 = conv_matrix(c2.params["weight"], s_pool, c2.attrs["stride"], c2.attrs["padding"])
    b1 = numpy.repeat(c1.params["bias"], s1[1] * s1[2])
    b2 = numpy.repeat(c2.params["bias"], s2[1] * s2[2])
    return [(m1, b1), (m2 @ pool, b2), (fc.params["weight"], fc.params["bias"])]


def mlp_layers(net):
    dense = [n for n in net.nodes if n.op == "dense"]
    return [(n.params["weight"], n.params["bias"]) for n in dense]


@pytest.mark.parametrize("mode", METHODS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_matches_plain_dense_crown_on_mlps(mode, norm):
    rng = numpy.random.default_rng(0)
    for sizes in [(20, 30, 30, 6), (12, 16, 16, 16, 5), (8, 3)]:
        net = random_mlp(rng, sizes=sizes)
        x = rng.random((40, 1, sizes[0]))
        y = rng.integers(0, sizes[-1], 40)
        for eps in (0.0, 0.02, 0.1, 0.4):
            ours = crown_margin_bounds(net, x, y, eps, norm=norm, method=mode)
            ref = plain_crown(mlp_layers(net), x, y, eps, norm=norm, mode=mode)
            finite = numpy.isfinite(ref)
            assert relative_error(ours[finite], ref[finite]) <= 1e-9, (sizes, eps)
            assert (ours[finite] <= ref[finite]).all(), "the rounding allowance only ever lowers the bound"


@pytest.mark.parametrize("mode", METHODS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_matches_plain_dense_crown_on_a_cnn(mode, norm):
    rng = numpy.random.default_rng(1)
    net = random_cnn(rng, pool="avgpool")
    x = rng.random((10,) + net.input_shape)
    y = rng.integers(0, 4, 10)
    layers = cnn_layers(net)
    assert numpy.allclose(plain_forward(layers, x), net.forward(x), atol=1e-12)
    for eps in (0.01, 0.05, 0.2):
        ours = crown_margin_bounds(net, x, y, eps, norm=norm, method=mode)
        ref = plain_crown(layers, x, y, eps, norm=norm, mode=mode)
        finite = numpy.isfinite(ref)
        assert relative_error(ours[finite], ref[finite]) <= 1e-9, eps
        assert (ours[finite] <= ref[finite]).all()


def plain_forward(layers, x):
    a = x.reshape(len(x), -1)
    for i, (w, b) in enumerate(layers):
        a = a @ w.T + b
        if i < len(layers) - 1:
            a = numpy.maximum(a, 0)
    return a


# ----------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("method,key,tol", [
    ("crown", "crown_f64_margin_lb", 1e-6), ("crown", "crown_margin_lb", 1e-5),
    ("crown-pure", "crown_pure_f64_margin_lb", 1e-6), ("crown-pure", "crown_pure_margin_lb", 1e-5),
    ("crown-ibp", "crownibp_f64_margin_lb", 1e-6), ("crown-ibp", "crownibp_margin_lb", 1e-5),
])
def test_matches_reference_bounds(reference_bounds, reference_onnx, method, key, tol):
    """float64 bounds (the default) against auto_LiRPA in float64 and float32."""
    ref = reference_bounds
    net = reference_network(reference_onnx).astype(numpy.float64)
    lower = get_certifier(method).margin_lower(net, ref["x"].astype(numpy.float64), ref["y"], float(ref["eps"]))
    ours = in_reference_order(lower, ref["C_margin"])
    assert relative_error(ours, ref[key]) <= tol
    if "f64" in key:
        assert (ours <= ref[key] + 1e-9 * numpy.abs(ref[key])).all()


def test_float32_mode_is_close_to_the_reference_and_below_attacks(reference_bounds, reference_onnx):
    """In float32 the rigorous rounding allowance (gamma_784 ~ 5e-5 relative per product) costs ~1%, and
    slightly different intermediate bounds may flip a few adaptive ReLU slopes either way, so the
    float32 bound is not ordered with auto_LiRPA's; it must stay below margins an attack reaches."""
    ref = reference_bounds
    net = reference_network(reference_onnx)
    x, y, eps = ref["x"][:20], ref["y"][:20], float(ref["eps"])
    rng = numpy.random.default_rng(10)
    worst = numpy.stack([_attack(net, x[i].astype(numpy.float64), y[i], eps, "linf", rng, starts=8, steps=10)
                         for i in range(len(y))])
    z = net.forward(worst.reshape((-1,) + net.input_shape)).reshape(len(y), -1, 10)
    attacked = (z[numpy.arange(len(y)), :, y][..., None] - z).min(axis=1)
    for method, key in [("crown", "crown_f64_margin_lb"), ("crown-ibp", "crownibp_f64_margin_lb")]:
        lower = crown_margin_bounds(net.astype(numpy.float32), ref["x"], ref["y"], eps, method=method)
        assert lower.dtype == numpy.float32
        ours = in_reference_order(lower, ref["C_margin"]).astype(numpy.float64)
        assert relative_error(ours, ref[key]) <= 2e-2
        mask = numpy.isfinite(lower[:20])
        assert (lower[:20][mask] <= attacked[mask]).all()


def test_certify_on_the_reference_model(reference_bounds, reference_onnx):
    ref = reference_bounds
    net = reference_network(reference_onnx)
    x, y = ref["x"], ref["y"]
    res = get_certifier("crown").certify(net, x, y, [0.0, 0.005, float(ref["eps"])])
    assert res.method == "crown" and res.dtype == "float64"
    assert res.clean_accuracy == pytest.approx((ref["logits"].argmax(1) == y).mean())
    assert res.certified_accuracy[0] == pytest.approx(res.clean_accuracy)
    assert res.bound[:, 2] == pytest.approx(ref["crown_f64_margin_lb"].min(axis=1), rel=1e-6)
    ibp = IBP().certify(net, x, y, [0.005])
    assert (res.bound[:, 1] >= ibp.bound[:, 0]).mean() > 0.9


# ----------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("norm,order", [("linf", 1), ("l2", 2)])
def test_single_dense_layer_closed_form(norm, order):
    """One affine layer: lower = margin - eps ||W_y - W_j||_1 (L-inf) or _2 (L2), no domain clip."""
    rng = numpy.random.default_rng(2)
    w, b = rng.normal(size=(5, 9)), rng.normal(size=5)
    net = Network([Node("fc", "dense", ("input",), {"weight": w, "bias": b})], (9,))
    x = rng.normal(size=(3, 9))
    y = numpy.array([0, 3, 4])
    eps = 0.3
    for method in METHODS:
        lower = crown_margin_bounds(net, x, y, eps, norm=norm, domain=None, method=method)
        z = x @ w.T + b
        for i in range(3):
            for j in range(5):
                if j == y[i]:
                    assert lower[i, j] == numpy.inf
                    continue
                expected = z[i, y[i]] - z[i, j] - eps * numpy.linalg.norm(w[y[i]] - w[j], ord=order)
                assert lower[i, j] == pytest.approx(expected, rel=1e-12, abs=1e-12)
                assert lower[i, j] <= expected


# ----------------------------------------------------------------------------- soundness
ACTS = ["relu", "leaky_relu", "prelu", "sigmoid", "tanh", "clip"]


def _act(name, rng, inp, kind):
    # slopes of both signs: negative ones make the activation |x|-like (not monotone)
    attrs = {"alpha": float(rng.choice([0.01, 0.2, 1.5, -0.5, -2.0]))} if kind == "leaky_relu" else {}
    if kind == "clip":
        attrs = {"low": float(rng.uniform(-1, 0)), "high": float(rng.uniform(0, 1))}
    params = {"slope": numpy.array(float(rng.choice([-1.5, -0.3, 0.4, 2.0])))} if kind == "prelu" else {}
    return Node(name, kind, (inp,), params, attrs)


def _conv(name, inp, rng, cin, cout, k, stride, pads):
    return Node(name, "conv", (inp,), {"weight": rng.normal(size=(cout, cin, k, k)) / k,
                                      "bias": rng.normal(size=cout) * 0.2},
                {"stride": stride, "padding": pads})


def every_op_net(rng, acts, pool, extremum, group, tail=False):
    """conv (stride, padding) -> batchnorm -> act -> pool -> conv -> act -> conv + residual add ->
    max/min with the residual -> groupsort -> flatten -> dense -> act -> dense (-> scale with ``tail``,
    so that no dense head can take the margin specification)."""
    c = 4
    stride = (int(rng.integers(1, 3)),) * 2
    pad = int(rng.integers(0, 2))
    nodes = [_conv("c1", "input", rng, 2, c, 3, stride, (pad, pad, pad, pad)),
             Node("bn", "batchnorm", ("c1",), {"gamma": rng.uniform(0.5, 1.5, (c, 1, 1)),
                                              "beta": rng.normal(size=(c, 1, 1)) * 0.2,
                                              "mean": rng.normal(size=(c, 1, 1)) * 0.1,
                                              "var": rng.uniform(0.5, 2.0, (c, 1, 1))}, {"eps": 1e-5}),
             _act("a1", rng, "bn", acts[0])]
    pool_attrs = {"kernel": (2, 2), "stride": (2, 2), "padding": (0, 0, 1, 1) if rng.random() < 0.5 else (0, 0, 0, 0)}
    nodes.append(Node("p1", pool, ("a1",), attrs=pool_attrs))
    nodes += [_conv("c2", "p1", rng, c, c, 3, (1, 1), (1, 1, 1, 1)), _act("a2", rng, "c2", acts[1]),
              _conv("c3", "a2", rng, c, c, 3, (1, 1), (1, 1, 1, 1)), Node("res", "add", ("c3", "c2")),
              _act("a3", rng, "res", acts[2]), Node("mx", extremum, ("a3", "c2")),
              Node("gs", "groupsort", ("mx",), attrs={"group_size": group}), Node("f", "flatten", ("gs",))]
    net = Network(nodes, (2, 7, 7))
    d = math.prod(net.shapes()["f"])
    nodes += [Node("fc1", "dense", ("f",), {"weight": rng.normal(size=(10, d)) / math.sqrt(d),
                                           "bias": rng.normal(size=10) * 0.1}),
              _act("a4", rng, "fc1", acts[3]),
              Node("fc2", "dense", ("a4",), {"weight": rng.normal(size=(3, 10)), "bias": rng.normal(size=3) * 0.1})]
    if tail:
        nodes.append(Node("out", "scale", ("fc2",), {"scale": rng.uniform(0.5, 2, 3), "shift": rng.normal(size=3)}))
    return Network(nodes, (2, 7, 7))


def skip_mlp(rng, act, d=10, twice=False):
    """flatten -> dense -> act -> dense -> add(., flatten) -> act -> dense; with ``twice`` the add also
    reads the network input directly (so the input has two consumers)."""
    def dense(name, inp, n_out, n_in):
        return Node(name, "dense", (inp,), {"weight": rng.normal(size=(n_out, n_in)) / 3,
                                             "bias": rng.normal(size=n_out) * .1})

    nodes = [Node("flat", "flatten", ("input",)), dense("fc0", "flat", 12, d), _act("a0", rng, "fc0", act),
             dense("fc1", "a0", d, 12),
             Node("res", "add", ("fc1", "input" if twice else "flat")), _act("a1", rng, "res", act),
             Node("fc2", "dense", ("a1",), {"weight": rng.normal(size=(4, d)), "bias": rng.normal(size=4) * .1})]
    return Network(nodes, (d,))


def _points(rng, x, eps, norm, n):
    if norm == "linf":
        lo, hi = numpy.clip(x - eps, 0, 1), numpy.clip(x + eps, 0, 1)
        u = rng.random((n,) + x.shape)
        u[: n // 4] = numpy.round(u[: n // 4])  # corners of the box
        return lo + u * (hi - lo)
    d = rng.normal(size=(n, x.size))
    d /= numpy.linalg.norm(d, axis=1, keepdims=True)
    r = eps * rng.random((n, 1)) ** (1.0 / x.size)
    r[: n // 4] = eps * (1 - 1e-12)  # on the sphere
    return x[None] + (d * r).reshape((n,) + x.shape)


def _attack(net, x, y, eps, norm, rng, starts=24, steps=15):
    """PGD on the margin against the currently closest class, from random starts in the region."""
    pts = _points(rng, x, eps, norm, starts)
    lo, hi = numpy.clip(x - eps, 0, 1), numpy.clip(x + eps, 0, 1)
    rows = numpy.arange(starts)
    for t in range(steps):
        z = net.forward(pts)
        z[:, y] = -numpy.inf
        g = numpy.zeros_like(z)
        g[:, y], g[rows, z.argmax(axis=1)] = 1.0, -1.0
        grad = net.vjp(pts, g)
        step = eps * 0.5 * 0.8**t
        if norm == "linf":
            pts = numpy.clip(pts - step * numpy.sign(grad), lo, hi)
        else:
            flat = grad.reshape(starts, -1)
            pts = pts - step * (flat / numpy.maximum(numpy.linalg.norm(flat, axis=1, keepdims=True), 1e-300)
                                ).reshape(pts.shape)
            d = (pts - x).reshape(starts, -1)
            scale = numpy.minimum(1.0, eps / numpy.maximum(numpy.linalg.norm(d, axis=1, keepdims=True), 1e-300))
            pts = x + (d * scale * (1 - 1e-12)).reshape(pts.shape)
    return pts


def _check_sound(net, x, y, eps, norm, rng, note):
    pts = numpy.concatenate([_points(rng, x[0], eps, norm, 1500), _attack(net, x[0], y[0], eps, norm, rng)])
    z = net.forward(pts)
    margins = z[:, y[0]][:, None] - z
    margins[:, y[0]] = numpy.inf
    worst = margins.min(axis=0)
    for method in METHODS:
        lower = crown_margin_bounds(net, x, y, eps, norm=norm, method=method)[0]
        try:
            assert (worst >= lower).all()
        except AssertionError as exc:
            exc.add_note(f"{note} method={method} norm={norm} eps={eps} worst={worst} lower={lower}")
            raise


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(0.0, 0.3), norm=st.sampled_from(["linf", "l2"]),
       acts=st.lists(st.sampled_from(ACTS), min_size=4, max_size=4), pool=st.sampled_from(["maxpool", "avgpool"]),
       extremum=st.sampled_from(["max", "min"]), group=st.sampled_from([2, 4]), tail=st.booleans())
def test_sampled_points_never_beat_the_bound_on_every_op(seed, eps, norm, acts, pool, extremum, group, tail):
    rng = numpy.random.default_rng(seed)
    net = every_op_net(rng, acts, pool, extremum, group, tail)
    x = rng.random((1,) + net.input_shape)
    y = numpy.array([int(rng.integers(0, 3))])
    _check_sound(net, x, y, eps, norm, rng, f"seed={seed} acts={acts} pool={pool} {extremum} group={group}")


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(0.0, 0.5), norm=st.sampled_from(["linf", "l2"]),
       act=st.sampled_from(ACTS), arch=st.sampled_from(["mlp", "skip", "skip-input"]))
def test_sampled_points_never_beat_the_bound_on_mlps(seed, eps, norm, act, arch):
    rng = numpy.random.default_rng(seed)
    if arch == "mlp":
        net = random_mlp(rng, act=act) if act != "clip" else random_mlp(rng)
    else:
        net = skip_mlp(rng, act, twice=arch == "skip-input")
    x = rng.random((1,) + net.input_shape)
    y = numpy.array([int(rng.integers(0, net.shapes()[net.output_name][0]))])
    _check_sound(net, x, y, eps, norm, rng, f"seed={seed} act={act}")


def test_eps_zero_gives_the_exact_margin():
    rng = numpy.random.default_rng(3)
    for acts, pool, ext, group in [(["relu", "sigmoid", "tanh", "leaky_relu"], "maxpool", "max", 2),
                                   (["prelu", "leaky_relu", "prelu", "relu"], "maxpool", "max", 2),
                                   (["clip", "relu", "relu", "tanh"], "avgpool", "min", 4)]:
        net = every_op_net(rng, acts, pool, ext, group)
        x = rng.random((6,) + net.input_shape)
        y = rng.integers(0, 3, 6)
        z = net.forward(x)
        exact = z[numpy.arange(6), y][:, None] - z
        for norm in ("linf", "l2"):
            for method in METHODS:
                lower = crown_margin_bounds(net, x, y, 0.0, norm=norm, method=method)
                mask = numpy.isfinite(lower)
                assert (lower[mask] <= exact[mask]).all()
                assert numpy.allclose(lower[mask], exact[mask], rtol=1e-9, atol=1e-9), (norm, method)


def test_crown_is_tighter_than_ibp_on_a_plain_mlp():
    rng = numpy.random.default_rng(4)
    net = random_mlp(rng, sizes=(30, 40, 40, 6))
    x = rng.random((20, 1, 30))
    y = rng.integers(0, 6, 20)
    ibp = ibp_margin_bounds(net, x, y, 0.05)
    for method in METHODS:
        lower = crown_margin_bounds(net, x, y, 0.05, method=method)
        mask = numpy.isfinite(lower)
        assert (lower[mask] >= ibp[mask] - 1e-9).mean() > 0.95
    pure = crown_margin_bounds(net, x, y, 0.05, method="crown-pure")
    auto = crown_margin_bounds(net, x, y, 0.05, method="crown")
    assert (auto[mask] >= pure[mask] - 1e-9).all(), "intersecting with IBP only tightens"


# ----------------------------------------------------------------------------- certifiers
def test_best_is_never_worse_than_ibp_per_sample():
    rng = numpy.random.default_rng(5)
    net = random_cnn(rng)
    x = rng.random((24,) + net.input_shape)
    y = net.forward(x).argmax(axis=1)
    y[:3] = (y[:3] + 1) % 4
    eps = [0.001, 0.01, 0.05]
    ibp = IBP().certify(net, x, y, eps)
    best = get_certifier("best").certify(net, x, y, eps)
    assert isinstance(best, type(ibp)) and best.method == "best"
    assert (best.bound >= ibp.bound).all()
    assert ((best.verdicts == "verified") >= (ibp.verdicts == "verified")).all()
    assert (best.verdicts[:3] == "falsified").all()
    crown = get_certifier("crown").certify(net, x, y, eps)
    assert ((best.verdicts == "verified") >= (crown.verdicts == "verified")).all()
    right = slice(3, None)  # correctly classified: CROWN runs on every one still unknown (on a smaller
    # batch, so the rounding allowance may differ in the last digits)
    assert ((best.bound[right] >= crown.bound[right] - 1e-12) | (best.bound[right] > 0)).all()
    rushed = Best(time_budget=1e-9).certify(net, x, y, eps)
    assert numpy.array_equal(rushed.bound, ibp.bound), "past the deadline only IBP runs"
    with pytest.raises(InvalidParameterError, match="time_budget"):
        Best(time_budget=-1)


@pytest.mark.parametrize("name", ["crown", "crown-pure", "crown-ibp", "best"])
def test_registered_and_batch_independent(name):
    rng = numpy.random.default_rng(6)
    net = random_cnn(rng)
    x = rng.random((11,) + net.input_shape)
    y = rng.integers(0, 4, 11)
    a = get_certifier(name, batch_size=3).certify(net, x, y, [0.01, 0.03])
    b = get_certifier(name).certify(net, x, y, [0.01, 0.03])
    assert a.method == name
    assert numpy.allclose(a.bound, b.bound, rtol=1e-12, atol=1e-12)
    l2 = get_certifier(name, norm="l2").certify(net, x, y, [0.05])
    assert l2.norm == "l2" and numpy.isfinite(l2.bound).all()


def test_memory_budget_too_small_raises_a_clear_error(monkeypatch):
    rng = numpy.random.default_rng(7)
    big = Network([_conv("c", "input", rng, 3, 16, 3, (1, 1), (1, 1, 1, 1)), Node("r", "relu", ("c",)),
                   Node("f", "flatten", ("r",)),
                   Node("fc", "dense", ("f",), {"weight": numpy.zeros((10, 16 * 64 * 64)), "bias": numpy.zeros(10)})],
                  (3, 64, 64))
    x = numpy.zeros((2, 3, 64, 64))
    y = numpy.zeros(2, dtype=int)
    monkeypatch.setenv("ROBEVAL_MEMORY_MB", "1")
    with pytest.raises(RobevalError, match=r"CROWN needs at least .* MiB .*ROBEVAL_MEMORY_MB"):
        CROWN().certify(big, x, y, 0.01)
    with pytest.raises(RobevalError, match="memory budget"):
        crown_margin_bounds(big, x, y, 0.01)


def test_unsupported_ops_are_listed():
    net = Network([Node("f", "flatten", ("input",)), Node("s", "softmax", ("f",)),
                   Node("fc", "dense", ("s",), {"weight": numpy.ones((3, 4)), "bias": numpy.zeros(3)})], (1, 4))
    with pytest.raises(UnsupportedOpError, match=r"softmax \(node 's'\)"):
        crown_margin_bounds(net, numpy.zeros((1, 1, 4)), numpy.zeros(1, dtype=int), 0.1)
    with pytest.raises(InvalidParameterError, match="method"):
        crown_margin_bounds(net, numpy.zeros((1, 1, 4)), numpy.zeros(1, dtype=int), 0.1, method="crown-fast")


# ----------------------------------------------------------------------------- the relaxations
def _boxes(rng, shape):
    lo = rng.normal(size=shape) * rng.choice([0.01, 1.0, 30.0], size=shape)
    width = numpy.abs(rng.normal(size=shape)) * rng.choice([0.0, 1e-9, 0.3, 3.0], size=shape)
    return lo, lo + width


@pytest.mark.parametrize("op", ["sigmoid", "tanh", "relu", "leaky_relu", "prelu", "clip"])
def test_elementwise_lines_enclose_the_function(op):
    from robeval.ir.registry import get_op

    rng = numpy.random.default_rng(8)
    node = _act("a", rng, "input", op)
    lo, hi = _boxes(rng, (4000,))
    al, bl, au, bu = get_op(op).relax(numpy, node, lo, hi)
    for t in numpy.linspace(0, 1, 41):
        x = lo + t * (hi - lo)
        f = get_op(op).forward(numpy, node, x.astype(numpy.longdouble)).astype(numpy.longdouble)
        assert (al * x.astype(numpy.longdouble) + bl <= f + 1e-12 * (1 + abs(f))).all()
        assert (au * x.astype(numpy.longdouble) + bu >= f - 1e-12 * (1 + abs(f))).all()


@pytest.mark.parametrize("k", [2, 3, 4, 9])
def test_max_min_and_sort_lines_enclose_the_function(k):
    from robeval.certifiers.crown_relax import groupsort_lines, max_lines, min_lines

    rng = numpy.random.default_rng(k)
    lo, hi = _boxes(rng, (500, k))
    hi[:50, 0] = lo[:50, 0] + 100  # some boxes where one entry dominates, some fixed orders
    pts = lo[None] + rng.random((300, 500, k)) * (hi - lo)[None]
    pts[:80] = numpy.where(rng.random((80, 500, k)) < 0.5, lo, hi)[None][0]
    for fn, ref in ((max_lines, pts.max(axis=-1)), (min_lines, pts.min(axis=-1))):
        lc, lb, uc, ub = fn(numpy, lo, hi)
        assert ((pts * lc).sum(-1) + lb <= ref + 1e-12).all()
        assert ((pts * uc).sum(-1) + ub >= ref - 1e-12).all()
    lc, lb, uc, ub = groupsort_lines(numpy, lo, hi)
    srt = numpy.sort(pts, axis=-1)
    assert (numpy.einsum("...ri,...i->...r", lc[None], pts) + lb <= srt + 1e-12).all()
    assert (numpy.einsum("...ri,...i->...r", uc[None], pts) + ub >= srt - 1e-12).all()
    fixed = lo.copy()
    fixed[:, :] = numpy.arange(k) * 10.0
    lc, lb, uc, ub = groupsort_lines(numpy, fixed, fixed + 1)
    assert numpy.allclose(lc, numpy.eye(k)) and numpy.allclose(uc, numpy.eye(k)), "a fixed order is exact"


def test_large_eps_stays_finite():
    rng = numpy.random.default_rng(9)
    net = every_op_net(rng, ["sigmoid", "tanh", "relu", "clip"], "maxpool", "max", 4)
    x = rng.random((3,) + net.input_shape)
    y = numpy.array([0, 1, 2])
    for method in METHODS:
        for norm in ("linf", "l2"):
            lower = crown_margin_bounds(net, x, y, 5.0, norm=norm, method=method)
            assert numpy.isfinite(lower[numpy.arange(3)[:, None], (y[:, None] + [1, 2]) % 3]).all()


def test_threads_and_batches_do_not_change_the_bounds(monkeypatch):
    """Batches bounded in parallel threads (one per core) give exactly the sequential bounds."""
    import robeval.certifiers.crown as crown

    pytest.importorskip("threadpoolctl")
    rng = numpy.random.default_rng(11)
    net = random_mlp(rng, sizes=(30, 20, 20, 5))
    x = rng.random((13, 1, 30))
    y = rng.integers(0, 5, 13)
    for method in ("crown", "crown-pure"):
        monkeypatch.setenv("ROBEVAL_THREADS", "1")
        monkeypatch.setattr(crown, "FAST_WORKSPACE_MB", 96)
        whole = crown_margin_bounds(net, x, y, 0.05, method=method)
        monkeypatch.setattr(crown, "FAST_WORKSPACE_MB", 0.001)  # one sample per batch
        single = crown_margin_bounds(net, x, y, 0.05, method=method)
        monkeypatch.setenv("ROBEVAL_THREADS", "3")
        assert crown.thread_count(numpy) == 3
        threaded = crown_margin_bounds(net, x, y, 0.05, method=method)
        assert numpy.array_equal(threaded, single)
        assert numpy.allclose(whole, single, rtol=1e-12, atol=1e-12)
    monkeypatch.setenv("ROBEVAL_THREADS", "many")
    with pytest.raises(InvalidParameterError, match="ROBEVAL_THREADS"):
        crown_margin_bounds(net, x, y, 0.05)
