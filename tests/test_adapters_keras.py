"""Keras 3 adapter: channels-last models behind the NCHW interface, native runtime vs converted
network on briefly trained digit models, gradients vs finite differences, file formats, safety."""

from __future__ import annotations

import os
import warnings

import numpy
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
pytest.importorskip("tensorflow", reason="TensorFlow is not installed (pip install 'robeval[keras]')")
keras = pytest.importorskip("keras", reason="Keras 3 is not installed (pip install 'robeval[keras]')")
if int(keras.__version__.split(".")[0]) < 3:
    pytest.skip(f"Keras {keras.__version__} is not Keras 3", allow_module_level=True)

import robeval  # noqa: E402
from robeval.adapters import layout  # noqa: E402
from robeval.adapters.base import load_model  # noqa: E402
from robeval.adapters.fidelity import check_fidelity  # noqa: E402
from robeval.adapters.gradients import loss_and_cotangent, loss_gradient_network  # noqa: E402
from robeval.adapters.keras import KerasModel  # noqa: E402
from robeval.errors import InputShapeError, ModelLoadError, UnsupportedOpError  # noqa: E402

from adapter_models import KERAS_MODELS, digits, keras_float64_twin, train_keras  # noqa: E402

L = keras.layers
SHAPE = (1, 8, 8)


class _Trained(dict):
    def __missing__(self, name):
        self[name] = train_keras(name)
        return self[name]


@pytest.fixture(scope="session")
def keras_models():
    return _Trained()


@pytest.fixture(scope="session")
def test_data():
    return digits("test", limit=96)


def rel_err(a, b) -> float:
    return float(numpy.abs(a - b).max() / max(numpy.abs(b).max(), 1e-30))


@pytest.mark.parametrize("name", list(KERAS_MODELS))
def test_native_and_network_agree(keras_models, test_data, name):
    """NCHW in, logits within 1e-4, gradients within 1e-4 relative. The residual model has
    Conv+Add+LeakyReLU, which TF's graph mode computes with the wrong slope: the adapter runs eagerly."""
    x, y = test_data
    adapter = KerasModel(keras_models[name])
    assert adapter.input_shape == SHAPE and adapter.channels_last is True and adapter.num_classes == 10
    assert adapter.outputs_probabilities == (name == "cnn")
    net = adapter.to_network()
    assert net.input_shape == SHAPE
    assert check_fidelity(adapter, x, atol=1e-4) <= 1e-4
    assert float((adapter.predict(x).argmax(1) == y).mean()) > 0.6
    for loss in ("ce", "margin"):
        native = adapter.input_gradient(x, y, loss)
        assert native.shape == x.shape and native.dtype == numpy.float32
        assert rel_err(native, loss_gradient_network(net, x, y, loss)) <= 1e-4
    logits, grad = adapter.logits_and_gradient(x, y, "margin")  # one pass, as attacks use it
    numpy.testing.assert_array_equal(grad, native)
    expected = net.strip_output_squashers()[0].forward(x)
    shift = (logits - expected).mean(axis=1, keepdims=True)  # log-probabilities are logits shifted per row
    numpy.testing.assert_allclose(logits - shift, expected, atol=1e-4)


def test_flatten_of_nhwc_maps_is_folded_into_dense(keras_models, test_data):
    """Keras flattens (H, W, C); the network is NCHW. The transpose is folded into the Dense columns."""
    adapter = KerasModel(keras_models["residual"])
    ops = [n.op for n in adapter.to_network().nodes]
    assert "transpose" not in ops and ops[-2:] == ["flatten", "dense"]
    assert check_fidelity(adapter, test_data[0]) <= 1e-4


def _losses(predict, x, y, probs):
    out = predict(x)
    logits = numpy.log(numpy.maximum(out, 1e-300)) if probs else out
    return loss_and_cotangent(numpy, logits, y, "ce")[0]


@pytest.mark.parametrize("name", list(KERAS_MODELS))
def test_gradients_match_finite_differences(keras_models, test_data, name):
    """A float64 twin (same weights): tf.GradientTape and the network's vjp match central differences."""
    x, y = test_data[0][:8].astype(numpy.float64), test_data[1][:8]
    x = x + numpy.random.default_rng(0).uniform(0, 0.05, x.shape)  # no ties in max pooling
    adapter = KerasModel(keras_float64_twin(name, keras_models[name]))
    net = adapter.to_network()
    assert net.dtype == numpy.float64
    v = numpy.random.default_rng(1).normal(size=x.shape)
    h = 1e-7
    probs = adapter.outputs_probabilities
    fd = (_losses(adapter.predict, x + h * v, y, probs) - _losses(adapter.predict, x - h * v, y, probs)) / (2 * h)
    native = (adapter.input_gradient(x, y, "ce") * v).reshape(len(x), -1).sum(1)
    rep = (loss_gradient_network(net, x, y, "ce") * v).reshape(len(x), -1).sum(1)
    numpy.testing.assert_allclose(native, fd, rtol=1e-5, atol=1e-8)
    numpy.testing.assert_allclose(rep, fd, rtol=1e-5, atol=1e-8)


def _layout_for(adapter, x):
    """NHWC data for an ONNX export that kept the Keras NHWC input (an MLP: no transpose to fold)."""
    return layout.to_nhwc(x) if tuple(adapter.input_shape) == layout.nhwc_shape(SHAPE) else x


@pytest.mark.parametrize("name", list(KERAS_MODELS))
def test_same_certificates_whichever_way_in(keras_models, test_data, tmp_path, name):
    x, y = test_data
    model = keras_models[name]
    model.save(tmp_path / "model.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(tmp_path / "model.h5")
    adapters = {"object": KerasModel(model), "keras": load_model(tmp_path / "model.keras"),
                "h5": load_model(tmp_path / "model.h5")}
    try:
        import tf2onnx  # noqa: F401

        from robeval.adapters.onnx import load_onnx  # noqa: F401
    except ImportError:
        pass  # covered where tf2onnx and robeval's ONNX importer are installed
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.export(str(tmp_path / "model.onnx"), format="onnx", verbose=False)
        adapters["onnx"] = load_model(tmp_path / "model.onnx")
    for method, norm, eps in (("ibp", "linf", [0.005, 0.02]), ("lipschitz", "l2", [0.05])):
        results = {k: robeval.certify(a, (_layout_for(a, x), y), method=method, norm=norm, eps=eps)
                   for k, a in adapters.items()}
        ref = results["object"]
        for key, res in results.items():
            assert res.certified_accuracy == ref.certified_accuracy, (method, key)
            if key != "onnx":
                numpy.testing.assert_array_equal(res.verdicts, ref.verdicts)
                numpy.testing.assert_allclose(res.bound, ref.bound, rtol=1e-12, atol=0)


def test_file_format_from_content_not_extension(keras_models, tmp_path):
    keras_models["mlp"].save(tmp_path / "model.keras")
    os.rename(tmp_path / "model.keras", tmp_path / "model.bin")
    adapter = load_model(tmp_path / "model.bin")
    x = digits("test", limit=4)[0]
    numpy.testing.assert_array_equal(adapter.predict(x), KerasModel(keras_models["mlp"]).predict(x))


def test_lambda_layers_refused_by_safe_mode(tmp_path):
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Lambda(lambda t: t * 2.0), L.Flatten(), L.Dense(10)])
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(ModelLoadError, match="safe_mode"):
        load_model(tmp_path / "lambda.keras")


def test_unsupported_layers_reported_together():
    inp = keras.Input((8, 8, 1))
    h = L.Conv2D(4, 3, activation="gelu", name="conv")(inp)
    h = L.UpSampling2D(name="up")(h)
    h = L.Flatten()(h)
    out = L.Dense(10)(L.Dense(8, activation="elu", name="hidden")(h))
    with pytest.raises(UnsupportedOpError) as info:
        KerasModel(keras.Model(inp, out)).to_network()
    assert info.value.framework == "Keras"
    assert set(info.value.problems) == {("activation 'gelu'", "conv (Conv2D)"), ("UpSampling2D", "up"),
                                        ("activation 'elu'", "hidden (Dense)")}


def test_more_layers_convert_faithfully(test_data):
    """Untrained, random: depthwise conv, 'same' pooling with stride, Normalization, Concatenate,
    Reshape, Softmax/ReLU variants, a nested Sequential and an (H, W) grayscale input."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 1))
    h = L.Normalization(mean=0.3, variance=0.04)(inp)
    a = L.DepthwiseConv2D(3, depth_multiplier=3, padding="same", activation="relu6")(h)
    b = L.Conv2D(3, 3, padding="same", dilation_rate=2)(L.Reshape((8, 8, 1))(L.Reshape((64,))(h)))
    c = L.Concatenate()([a, b])
    c = L.ReLU(max_value=4.0)(c)
    c = L.AveragePooling2D(3, strides=2, padding="same")(c)
    c = L.MaxPooling2D(3, strides=2, padding="same")(c)
    c = keras.Sequential([L.Conv2D(4, 1), L.GlobalMaxPooling2D(), L.Dense(10)])(c)
    out = L.Softmax()(L.Subtract()([c, L.Dense(10)(L.Flatten()(h))]))
    adapter = KerasModel(keras.Model(inp, out))
    assert check_fidelity(adapter, test_data[0]) <= 1e-4
    gray = KerasModel(keras.Sequential([keras.Input((8, 8)), L.Flatten(), L.Dense(10)]))
    assert gray.input_shape == SHAPE
    assert check_fidelity(gray, test_data[0]) <= 1e-4


def test_nhwc_data_rejected_with_a_hint(keras_models, test_data):
    adapter = KerasModel(keras_models["mlp"])
    with pytest.raises(InputShapeError, match="channels-last"):
        adapter.predict(test_data[0].transpose(0, 2, 3, 1))
    with pytest.raises(InputShapeError, match=r"\(1, 8, 8\)"):
        KerasModel(keras_models["mlp"], input_shape=(8, 8, 1))
