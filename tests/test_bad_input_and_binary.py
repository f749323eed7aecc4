"""Inputs that used to crash or pass silently, through the CLI (one test per path: one line, exit 3,
no traceback), and single-logit binary classifiers through every command and the Python API."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import robeval
from robeval.cli import main

onnx = pytest.importorskip("onnx", reason="these tests build ONNX models (pip install 'robeval[onnx]')")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

COMMANDS = ["certify", "attack", "sweep", "audit"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *needles):
    assert result.exit_code == 3, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def _save(tmp_path, name, nodes, in_shape, out_shape, inits=(), opset=13):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *out_shape])],
                              [numpy_helper.from_array(v, k) for k, v in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if opset < 13:
        model.ir_version = 4
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _linear_binary(tmp_path, w, b, name="binary.onnx", sigmoid=False):
    """z = w . flatten(x) + b on (1, 8, 8) inputs: one logit (the distance to the boundary is |z| / ||w||)."""
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "W", "B"],
                                                                         ["z" if sigmoid else "y"], transB=1)]
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["z"], ["y"]))
    return _save(tmp_path, name, nodes, (1, 8, 8), (1,), [("W", w.reshape(1, 64)), ("B", np.array([b], np.float32))])


@pytest.fixture
def digits_binary(tmp_path):
    """Digits 0-4 (class 0) against 5-9 (class 1), with a least-squares linear logit."""
    from robeval.data import load_dataset

    ds = load_dataset("digits", split="test")
    x, y = ds.x, (ds.y >= 5).astype(np.int64)
    a = np.c_[x.reshape(len(x), -1), np.ones(len(x))]
    coef = np.linalg.lstsq(a, 2.0 * y - 1, rcond=None)[0]
    w, b = coef[:-1].astype(np.float32), float(coef[-1])
    path = _linear_binary(tmp_path, w, b)
    data = tmp_path / "binary.npz"
    np.savez(data, x=x, y=y)
    return path, data, w, np.float32(b), x, y


# ----------------------------------------------------------------------------- not a class vector
@pytest.mark.parametrize("command", ["info"] + COMMANDS)
def test_per_pixel_output_is_refused_in_every_command(tmp_path, command):
    path = _save(tmp_path, "pixel.onnx", [helper.make_node("Relu", ["x"], ["r"]),
                                          helper.make_node("Reshape", ["r", "s"], ["y"])],
                 (1, 8, 8), (8, 8), [("s", np.array([-1, 8, 8], np.int64))])
    args = [command, path] + ([] if command == "info" else ["--data", "digits", "--limit", "5"])
    assert_one_line_error(run(*args), "shape (8, 8) per sample", "one vector of class scores")


# ----------------------------------------------------------------------------- data checks
@pytest.fixture
def digits_model():
    from robeval.cli.common import builtin_model_path

    return builtin_model_path()


@pytest.mark.parametrize("command", COMMANDS)
def test_empty_npz_is_refused(tmp_path, digits_model, command):
    data = tmp_path / "empty.npz"
    np.savez(data, x=np.zeros((0, 8, 8), np.float32), y=np.zeros((0,), np.int64))
    assert_one_line_error(run(command, digits_model, "--data", data), "holds no samples")


@pytest.mark.parametrize("command", COMMANDS)
def test_x_y_length_mismatch_is_refused_even_with_limit(tmp_path, digits_model, command):
    data = tmp_path / "mismatch.npz"
    np.savez(data, x=np.zeros((10, 8, 8), np.float32), y=np.zeros((7,), np.int64))
    assert_one_line_error(run(command, digits_model, "--data", data, "--limit", "5"), "10 inputs but 7 labels")


def test_python_api_applies_the_same_data_checks(digits_model):
    with pytest.raises(robeval.errors.InputShapeError, match="3 inputs but 2 labels"):
        robeval.certify(digits_model, (np.zeros((3, 1, 8, 8), np.float32), np.zeros(2, np.int64)), limit=1)
    with pytest.raises(robeval.errors.InputShapeError, match="holds no samples"):
        robeval.certify(digits_model, (np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64)))


# ----------------------------------------------------------------------------- old opsets
def test_opset_9_model_is_converted_on_load_and_info_says_so(tmp_path):
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(10, 64)).astype(np.float32), rng.normal(size=10).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "W", "B"], ["g"], transB=1),
             helper.make_node("Relu", ["g"], ["y"])]
    path = _save(tmp_path, "op9.onnx", nodes, (1, 8, 8), (10,), [("W", w), ("B", b)], opset=9)
    result = run("info", path, "--json", "-")
    assert result.exit_code == 0, result.output
    assert "ONNX opset 9 converted to opset 13 on load" in result.output
    facts = json.loads(result.output[result.output.index("{"):])
    assert facts["opset_converted_from"] == 9
    x = rng.random((4, 1, 8, 8)).astype(np.float32)
    model = robeval.load_model(path)
    np.testing.assert_allclose(model.predict(x), np.maximum(x.reshape(4, -1) @ w.T + b, 0), rtol=1e-5, atol=1e-5)
    assert run("certify", path, "--data", "digits", "--limit", "5").exit_code == 0


# ----------------------------------------------------------------------------- binary models
def test_binary_scores_margins_and_lipschitz_radius(digits_binary):
    path, _, w, b, x, y = digits_binary
    model = robeval.load_model(path)
    z = x.reshape(len(x), -1).astype(np.float64) @ w.astype(np.float64) + float(b)
    assert model.num_classes == 2 and model.binary
    scores = model.predict(x)
    np.testing.assert_allclose(scores[:, 1], z, rtol=1e-4, atol=1e-4)
    assert np.all(scores[:, 0] == 0)
    assert np.mean((z > 0) == (y == 1)) > 0.85  # the class is the sign of the logit
    res = robeval.certify(path, (x, y), method="lipschitz", norm="l2", eps=[0.1])
    radius = np.abs(z) / np.linalg.norm(w.astype(np.float64))
    correct = (z > 0) == (y == 1)
    np.testing.assert_allclose(res.certified_radius[correct], radius[correct], rtol=1e-5)
    assert np.all(res.certified_radius <= radius * (1 + 1e-9))


@pytest.mark.parametrize("method", ["ibp", "crown", "best"])
def test_binary_linf_bound_is_the_exact_worst_logit(digits_binary, method):
    """A linear logit over a box without clipping: the worst case is z -+ eps ||w||_1, exactly."""
    path, _, w, b, x, y = digits_binary
    eps = 0.01
    res = robeval.certify(path, (x, y), method=method, eps=[eps], domain=None)
    z = x.reshape(len(x), -1).astype(np.float64) @ w.astype(np.float64) + float(b)
    worst = np.where(y == 1, z, -z) - eps * np.abs(w.astype(np.float64)).sum()
    correct = (z > 0) == (y == 1)
    np.testing.assert_allclose(res.bound[correct, 0], worst[correct], rtol=1e-6, atol=1e-6)
    assert np.all(res.bound[correct, 0] <= worst[correct] + 1e-9)


def test_binary_attack_flips_past_the_exact_radius(digits_binary):
    """FGSM is optimal on a linear logit: it succeeds on every correct sample once eps exceeds |z| / ||w||_1."""
    path, _, w, b, x, y = digits_binary
    z = x.reshape(len(x), -1).astype(np.float64) @ w.astype(np.float64) + float(b)
    need = np.abs(z) / np.abs(w).sum()
    report = robeval.attack(path, (x, y), attack="fgsm", eps=[float(np.quantile(need, 0.5)) * 1.05], domain=None)
    correct = (z > 0) == (y == 1)
    flipped = report.results[0].success
    assert np.all(flipped[correct & (need < np.quantile(need, 0.5))])


@pytest.mark.parametrize("command", COMMANDS)
def test_binary_model_runs_through_every_command(digits_binary, command):
    path, data, *_ = digits_binary
    extra = {"certify": ["--method", "crown"], "attack": [], "sweep": [], "audit": ["--quick"]}[command]
    result = run(command, path, "--data", data, "--limit", "40", *extra)
    assert result.exit_code == 0, result.output
    assert "Error" not in result.output


def test_binary_model_in_the_gate(digits_binary, tmp_path):
    path, data, *_ = digits_binary
    cfg = tmp_path / "robeval.toml"
    cfg.write_text(f'[[models]]\npath = "{path}"\ndata = "{data}"\nlimit = 40\n'
                   'checks = ["clean_accuracy >= 0.8", "certified_accuracy(method=\'ibp\', eps=0.001) >= 0.5"]\n')
    result = run("gate", "--config", cfg)
    assert result.exit_code == 0, result.output


def test_info_says_binary(digits_binary):
    result = run("info", digits_binary[0])
    assert result.exit_code == 0 and "binary classifier: one output logit z" in result.output


def test_single_sigmoid_output_is_refused_with_the_fix(tmp_path):
    path = _linear_binary(tmp_path, np.ones(64, np.float32), 0.0, "sig.onnx", sigmoid=True)
    assert_one_line_error(run("certify", path, "--data", "digits", "--limit", "5"), "ends in a sigmoid",
                          "without its final sigmoid")


def test_binary_torch_and_keras_models():
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1)).eval()
    model = robeval.load_model(net, input_shape=(1, 8, 8))
    x = np.random.default_rng(0).random((6, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        z = net(torch.from_numpy(x)).numpy()[:, 0]
    np.testing.assert_allclose(model.predict(x), np.c_[np.zeros(6), z], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.to_network().forward(x.astype(np.float64)), np.c_[np.zeros(6), z], atol=1e-5)
    g = model.input_gradient(x, np.ones(6, np.int64), loss="margin")  # margin loss of class 1 is -z
    np.testing.assert_allclose(g.reshape(6, -1), -np.tile(net[1].weight.detach().numpy(), (6, 1)), rtol=1e-5)
    with pytest.raises(robeval.errors.ModelLoadError, match="ends in a Sigmoid"):
        robeval.load_model(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1), torch.nn.Sigmoid()),
                           input_shape=(1, 8, 8))
    keras = pytest.importorskip("keras")
    km = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(1)])
    kmodel = robeval.load_model(km)
    xk = x.transpose(0, 2, 3, 1)
    zk = np.asarray(km(xk))[:, 0]
    np.testing.assert_allclose(kmodel.predict(x), np.c_[np.zeros(6), zk], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kmodel.to_network().forward(x.astype(np.float64)), np.c_[np.zeros(6), zk], atol=1e-5)
    with pytest.raises(robeval.errors.ModelLoadError, match="sigmoid activation"):
        robeval.load_model(keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                             keras.layers.Dense(1, activation="sigmoid")]))
