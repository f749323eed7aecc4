"""--mean/--std as the network's first ops: certificates in pixel space equal certificates of the
normalised model on the per-channel scaled box; models that normalise their own input (ONNX Sub/Div
or Sub/Mul by constants at opsets 11 and 13, a Keras Normalization layer, a torch first module or
inline (x - mean) / std) import with the framework's forward values and certify in pixel space,
exactly as the bare model under --mean/--std; smoothing radii of such a model are pixel radii."""

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


# ---------------------------------------------------------------- normalisation inside the model
# A model that normalises its own input (ONNX Sub/Div by constants, a Keras Normalization layer, a
# torch first module computing (x - mean) / std) imports as a network whose forward matches the
# framework, and whose certificates are in pixel space: equal to certifying the same model without
# its normalisation through --mean/--std (NormalisedAdapter), an independent path to the same function.

IMG = (3, 8, 8)
EPS = [0.0, 0.002, 0.005, 0.01]


def colour_data(n=8, seed=5):
    return numpy.random.default_rng(seed).uniform(0, 1, (n, *IMG)).astype(numpy.float32)


def assert_pixel_space_certificates(inside, outside, x, rtol_bound=1e-4):
    """IBP of the model with its own normalisation == IBP of the bare model under --mean/--std."""
    from robeval.api import certify

    y = numpy.asarray(inside.predict(x)).argmax(1)
    a = certify(inside, (x, y), method="ibp", eps=EPS, domain=(0.0, 1.0))
    b = certify(outside, (x, y), method="ibp", eps=EPS, domain=(0.0, 1.0))
    assert [a.counts(i) for i in range(len(EPS))] == [b.counts(i) for i in range(len(EPS))]
    numpy.testing.assert_allclose(a.bound, b.bound, rtol=rtol_bound, atol=1e-5)
    assert a.counts(1)["verified"] > 0 and a.counts(len(EPS) - 1)["verified"] < len(x)  # radii that matter
    return a


def onnx_normalised(with_norm: bool, op="Div", opset=13):
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = numpy.random.default_rng(7)
    w = (rng.normal(size=(4, 3, 3, 3)) / 4).astype(numpy.float32)
    fc = (rng.normal(size=(4 * 6 * 6, 5)) / 12).astype(numpy.float32)
    mean = numpy.array(MEAN, numpy.float32).reshape(1, 3, 1, 1)
    std = numpy.array(STD, numpy.float32).reshape(1, 3, 1, 1)
    nodes, inits, src = [], [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc"),
                              numpy_helper.from_array(numpy.zeros(5, numpy.float32), "fb")], "x"
    if with_norm:
        divisor = std if op == "Div" else (1 / std).astype(numpy.float32)
        nodes += [helper.make_node("Constant", [], ["mean"], value=numpy_helper.from_array(mean)),
                  helper.make_node("Sub", ["x", "mean"], ["c"]), helper.make_node(op, ["c", "std"], ["n"])]
        inits.append(numpy_helper.from_array(divisor, "std"))
        src = "n"
    nodes += [helper.make_node("Conv", [src, "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "fc", "fb"], ["y"])]
    graph = helper.make_graph(nodes, "normalised", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  [None, *IMG])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("op, opset", [("Div", 13), ("Mul", 13), ("Div", 11)])
def test_onnx_sub_div_inside_the_model(op, opset):
    import onnxruntime

    from robeval.adapters.base import load_model

    proto = onnx_normalised(True, op, opset)
    inside = load_model(proto)
    x = colour_data()
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = session.run(None, {"x": x})[0]
    numpy.testing.assert_allclose(inside.to_network().forward(x.astype(numpy.float64)), reference, atol=1e-5)
    ops = [n.op for n in inside.to_network().nodes]
    assert ops[:2] == ["scale", "scale"]  # (x - mean), then / std: first ops of the network, on pixels
    outside = NormalisedAdapter(load_model(onnx_normalised(False)), MEAN, STD)
    assert_pixel_space_certificates(inside, outside, x)


def torch_normalised():
    torch = pytest.importorskip("torch")
    from torch import nn

    class Normalize(nn.Module):
        """What torchvision.transforms.Normalize computes, as the model's first module."""

        def __init__(self, mean, std):
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean).reshape(3, 1, 1))
            self.register_buffer("std", torch.tensor(std).reshape(3, 1, 1))

        def forward(self, x):
            return (x - self.mean) / self.std

    class Inline(nn.Module):
        """Normalisation written into forward, buffers of shape (1, 3, 1, 1)."""

        def __init__(self, body):
            super().__init__()
            self.body = body
            self.register_buffer("m", torch.tensor(MEAN).reshape(1, 3, 1, 1))
            self.register_buffer("s", torch.tensor(STD).reshape(1, 3, 1, 1))

        def forward(self, x):
            return self.body(x.sub(self.m).div(self.s))

    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    return torch, body, nn.Sequential(Normalize(MEAN, STD), body).eval(), Inline(body).eval()


def test_torch_normalising_first_module():
    from robeval.adapters.base import load_model

    torch, body, first_module, inline = torch_normalised()
    x = colour_data()
    outside = NormalisedAdapter(load_model(body.eval(), input_shape=IMG), MEAN, STD)
    for model in (first_module, inline):
        inside = load_model(model, input_shape=IMG)
        with torch.no_grad():
            reference = model(torch.from_numpy(x)).numpy()
        numpy.testing.assert_allclose(inside.to_network().forward(x.astype(numpy.float64)), reference, atol=1e-5)
        assert [n.op for n in inside.to_network().nodes][:2] == ["scale", "scale"]
        assert_pixel_space_certificates(inside, outside, x)


def test_keras_normalization_layer():
    keras = pytest.importorskip("keras")
    from keras import layers as L

    from robeval.adapters.base import load_model

    keras.utils.set_random_seed(1)
    var = numpy.square(STD)
    body = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3, activation="relu"), L.Flatten(), L.Dense(5)])
    model = keras.Sequential([keras.Input((8, 8, 3)), L.Normalization(axis=-1, mean=MEAN, variance=var), body])
    inside = load_model(model)
    x = colour_data()
    reference = model.predict(x.transpose(0, 2, 3, 1), verbose=0)
    numpy.testing.assert_allclose(inside.to_network().forward(x.astype(numpy.float64)), reference, atol=1e-5)
    numpy.testing.assert_allclose(inside.predict(x), reference, atol=1e-6)
    nodes = inside.to_network().nodes
    assert [n.op for n in nodes][:2] == ["scale", "scale"] and "divisor" in nodes[1].params
    # keras divides by max(sqrt(variance), epsilon), here sqrt(variance) = STD to float32 rounding
    std = numpy.sqrt(var.astype(numpy.float32).astype(numpy.float64))
    outside = NormalisedAdapter(load_model(body), MEAN, std)
    assert_pixel_space_certificates(inside, outside, x)


def test_smoothing_radius_of_an_internally_normalised_model_is_in_pixels():
    """One std for every channel: noise sigma in pixels is sigma / s after (x - m) / s, so the same
    draws give the same counts, and the pixel radius is s times the radius on normalised inputs."""
    from robeval.adapters.base import NetworkModel, load_model
    from robeval.api import certify

    m, s = 0.45, 0.25
    inner = load_model(onnx_normalised(False))
    inside = NetworkModel(prepend_normalisation(inner.to_network(), m, s))
    x = colour_data(6).astype(numpy.float64)
    y = inside.to_network().forward(x).argmax(1)
    opts = dict(method="smoothing", norm="l2", n0=50, n=400, alpha=0.001, seed=3, check=False, dtype=numpy.float64)
    pixel = certify(inside, (x, y), eps=[0.0, 0.1], sigma=0.2, domain=(0.0, 1.0), **opts)
    normed = certify(NetworkModel(inner.to_network()), ((x - m) / s, y), eps=[0.0, 0.1 / s], sigma=0.2 / s,
                     domain=None, **opts)
    numpy.testing.assert_array_equal(pixel.predictions, normed.predictions)
    numpy.testing.assert_allclose(pixel.p_lower, normed.p_lower, rtol=0, atol=0)
    numpy.testing.assert_allclose(pixel.radius, s * normed.radius, rtol=1e-12)
    numpy.testing.assert_array_equal(pixel.verdicts, normed.verdicts)
    assert (pixel.radius > 0.1).any()
