"""PyTorch adapter: native runtime vs converted network on real (briefly trained) digit models,
input gradients vs autograd and finite differences, every way a model can come in, and safety."""

from __future__ import annotations

import copy
import warnings

import numpy
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install 'robeval[torch]')")
from torch import nn  # noqa: E402

import robeval  # noqa: E402
from robeval.adapters.base import load_model, sniff_format  # noqa: E402
from robeval.adapters.fidelity import check_fidelity  # noqa: E402
from robeval.adapters.gradients import loss_and_cotangent, loss_gradient_network  # noqa: E402
from robeval.adapters.torch import TorchModel  # noqa: E402
from robeval.errors import FidelityError, ModelLoadError, UnsupportedOpError  # noqa: E402

from adapter_models import TORCH_MODELS, digits, train_torch  # noqa: E402

SHAPE = (1, 8, 8)


class _Trained(dict):
    """Models trained on first use, once per session."""

    def __missing__(self, name):
        self[name] = train_torch(name)
        return self[name]


@pytest.fixture(scope="session")
def torch_models():
    return _Trained()


@pytest.fixture(scope="session")
def test_data():
    return digits("test", limit=96)


def rel_err(a, b) -> float:
    return float(numpy.abs(a - b).max() / max(numpy.abs(b).max(), 1e-30))


@pytest.mark.parametrize("name", list(TORCH_MODELS))
def test_native_and_network_agree(torch_models, test_data, name):
    """Logits within 1e-4 and input gradients (both losses) within 1e-4 relative."""
    x, y = test_data
    adapter = TorchModel(torch_models[name], input_shape=SHAPE)
    net = adapter.to_network()
    assert check_fidelity(adapter, x, atol=1e-4) <= 1e-4
    assert float((adapter.predict(x).argmax(1) == y).mean()) > 0.6  # the fixture did learn
    for loss in ("ce", "margin"):
        native = adapter.input_gradient(x, y, loss)
        assert native.shape == x.shape and native.dtype == numpy.float32
        assert rel_err(native, loss_gradient_network(net, x, y, loss)) <= 1e-4
    logits, grad = adapter.logits_and_gradient(x, y, "margin")  # one pass, as attacks use it
    numpy.testing.assert_array_equal(grad, native)
    expected = net.strip_output_squashers()[0].forward(x)
    shift = (logits - expected).mean(axis=1, keepdims=True)  # log-probabilities are logits shifted per row
    numpy.testing.assert_allclose(logits - shift, expected, atol=1e-4)
    assert adapter.outputs_probabilities == (name == "softmax")
    assert adapter.num_classes == 10 and adapter.channels_last is False


def _losses(predict, x, y, probs):
    out = predict(x)
    logits = numpy.log(numpy.maximum(out, 1e-300)) if probs else out
    return loss_and_cotangent(numpy, logits, y, "ce")[0]


@pytest.mark.parametrize("name", ["cnn", "resnet", "softmax", "normalized"])
def test_gradients_match_finite_differences(torch_models, test_data, name):
    """float64 copies: autograd and the network's vjp both match central differences."""
    x, y = test_data[0][:8].astype(numpy.float64), test_data[1][:8]
    x = x + numpy.random.default_rng(0).uniform(0, 0.05, x.shape)  # no ties in max pooling (flat background)
    adapter = TorchModel(copy.deepcopy(torch_models[name]).double(), input_shape=SHAPE)
    net = adapter.to_network()
    assert net.dtype == numpy.float64
    v = numpy.random.default_rng(1).normal(size=x.shape)
    h = 1e-7
    fd = (_losses(adapter.predict, x + h * v, y, adapter.outputs_probabilities)
          - _losses(adapter.predict, x - h * v, y, adapter.outputs_probabilities)) / (2 * h)
    native = (adapter.input_gradient(x, y, "ce") * v).reshape(len(x), -1).sum(1)
    rep = (loss_gradient_network(net, x, y, "ce") * v).reshape(len(x), -1).sum(1)
    numpy.testing.assert_allclose(native, fd, rtol=1e-5, atol=1e-8)
    numpy.testing.assert_allclose(rep, fd, rtol=1e-5, atol=1e-8)


def _save_all(model, tmp_path, class_spec):
    """The same model as an object, TorchScript, .pt2 and state_dict + class."""
    example = torch.rand(2, *SHAPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(model, example) if not isinstance(model, nn.Sequential) else torch.jit.script(model)
        scripted.save(str(tmp_path / "model.ts"))
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, str(tmp_path / "model.pt2"))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    return {
        "object": TorchModel(model, input_shape=SHAPE),
        "torchscript": load_model(tmp_path / "model.ts", input_shape=SHAPE),
        "pt2": load_model(tmp_path / "model.pt2"),
        "state_dict": load_model(tmp_path / "weights.pt", input_shape=SHAPE, model_class=class_spec),
    }


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
def test_same_certificates_whichever_way_in(torch_models, test_data, tmp_path, name):
    x, y = test_data
    model = torch_models[name]
    adapters = _save_all(model, tmp_path, f"adapter_models:{type(model).__name__}")
    assert adapters["torchscript"].kind == "torchscript" and adapters["pt2"].kind == "exported"
    assert adapters["pt2"].input_shape == SHAPE
    onnx = pytest.importorskip("robeval.adapters.onnx", reason="robeval.adapters.onnx is not written yet")
    if hasattr(onnx, "load_onnx"):
        path = tmp_path / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.rand(2, *SHAPE),), str(path), dynamo=False, input_names=["input"],
                              dynamic_axes={"input": {0: "batch"}})
        adapters["onnx"] = load_model(path)
    for method, norm, eps in (("ibp", "linf", [0.005, 0.02]), ("lipschitz", "l2", [0.05])):
        results = {k: robeval.certify(a, (x, y), method=method, norm=norm, eps=eps) for k, a in adapters.items()}
        ref = results["object"]
        assert ref.clean_accuracy > 0.6
        for key, res in results.items():
            assert res.certified_accuracy == ref.certified_accuracy, (method, key)
            if key != "onnx":  # the same weights through the same rules: bit-identical bounds
                numpy.testing.assert_array_equal(res.verdicts, ref.verdicts)
                numpy.testing.assert_allclose(res.bound, ref.bound, rtol=1e-12, atol=0)
    assert max(results["object"].certified_accuracy) >= 0.0


def test_ibp_certifies_something(torch_models, test_data):
    x, y = test_data
    res = robeval.certify(TorchModel(torch_models["cnn"], input_shape=SHAPE), (x, y), method="ibp", eps=0.002)
    assert res.certified_accuracy[0] > 0.3


def test_formats_detected_from_content(torch_models, tmp_path):
    model = torch_models["mlp"]
    torch.jit.script(model).save(str(tmp_path / "scripted.bin"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(model, (torch.rand(2, *SHAPE),)), str(tmp_path / "program.pt"))
    torch.save(model.state_dict(), tmp_path / "weights.pt2")
    torch.save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert sniff_format(tmp_path / "scripted.bin") == "torchscript"
    assert sniff_format(tmp_path / "program.pt") == "pt2"
    assert sniff_format(tmp_path / "weights.pt2") == "torch"
    assert sniff_format(tmp_path / "legacy.pt") == "torch"
    program = load_model(tmp_path / "program.pt")  # batch exported as 2: predict pads and splits
    x = digits("test", limit=5)[0]
    numpy.testing.assert_allclose(program.predict(x), TorchModel(model, input_shape=SHAPE).predict(x), atol=1e-5)
    legacy = load_model(tmp_path / "legacy.pt", input_shape=SHAPE, model_class="adapter_models.DigitsMLP")
    numpy.testing.assert_allclose(legacy.predict(x), program.predict(x), atol=1e-5)


class _Marker:
    """Unpickling this opens (creates) a marker file: what a malicious checkpoint could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_code_is_not_run_by_default(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"model": _Marker(marker)}, path)
    for load in (lambda: load_model(path, input_shape=SHAPE), lambda: TorchModel.from_file(path, input_shape=SHAPE)):
        with pytest.raises(ModelLoadError) as info:
            load()
        assert "trust_pickle=True" in str(info.value) and "state_dict" in str(info.value)
    assert not marker.exists()


def test_trusted_pickle_loads_a_whole_module(torch_models, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(torch_models["mlp"], path)
    with pytest.raises(ModelLoadError, match="trust_pickle"):
        load_model(path, input_shape=SHAPE)
    adapter = load_model(path, input_shape=SHAPE, trust_pickle=True)
    x = digits("test", limit=4)[0]
    numpy.testing.assert_array_equal(adapter.predict(x), TorchModel(torch_models["mlp"], input_shape=SHAPE).predict(x))


def test_state_dict_without_class_says_how(torch_models, tmp_path):
    torch.save(torch_models["mlp"].state_dict(), tmp_path / "w.pt")
    with pytest.raises(ModelLoadError, match="model_class='package.module:Class'"):
        load_model(tmp_path / "w.pt", input_shape=SHAPE)
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_model(tmp_path / "w.pt", input_shape=SHAPE, model_class="adapter_models:DigitsCNN")


class _TextModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.encoder = nn.Sequential(nn.Linear(16, 16))
        self.encoder.rnn = nn.LSTM(16, 16, batch_first=True)
        self.head = nn.Sequential(nn.GELU(), nn.Linear(16, 10))

    def forward(self, x):
        h, _ = self.encoder.rnn(self.embed(x.long().flatten(1)))
        return self.head(h[:, -1])


def test_unsupported_layers_reported_together():
    adapter = TorchModel(_TextModel(), input_shape=SHAPE)
    with pytest.raises(UnsupportedOpError) as info:
        adapter.to_network()
    assert info.value.framework == "PyTorch"
    assert set(info.value.problems) == {("Embedding", "embed"), ("LSTM", "encoder.rnn"), ("GELU", "head.0")}
    assert "encoder.rnn" in str(info.value)


def test_unsupported_functions_named_with_their_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            h = self.fc(x.flatten(1))
            return nn.functional.gelu(h) + torch.erf(h)

    with pytest.raises(UnsupportedOpError) as info:
        TorchModel(Block(), input_shape=SHAPE).to_network()
    ops = [op for op, _ in info.value.problems]
    assert ops == ["aten.gelu", "aten.erf"]


def test_eval_mode_is_temporary(torch_models, test_data):
    model = copy.deepcopy(torch_models["cnn"]).train()
    adapter = TorchModel(model, input_shape=SHAPE)
    x, y = test_data
    first = adapter.predict(x)
    adapter.input_gradient(x, y)
    adapter.to_network()
    assert all(m.training for m in model.modules())  # the user's flags are back
    numpy.testing.assert_array_equal(first, adapter.predict(x))  # dropout and batch norm were in eval mode
    running = model[1].running_mean.clone()
    adapter.predict(x)
    assert torch.equal(running, model[1].running_mean)


def test_lipschitz_layers_and_groupsort_in_custom_forward(torch_models, test_data):
    """Lipschitz layers convert through export(); GroupSort stays one op even under torch.export."""
    x, _ = test_data
    lip = torch_models["lipschitz"]
    assert [n.op for n in TorchModel(lip, input_shape=SHAPE).to_network().nodes] == \
        ["flatten", "dense", "groupsort", "dense"]

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = lip

        def forward(self, x):
            return self.body(2.0 * x - 1.0)

    adapter = TorchModel(Wrapped(), input_shape=SHAPE)
    ops = [n.op for n in adapter.to_network().nodes]
    assert "groupsort" in ops and ops[0] == "scale"
    assert check_fidelity(adapter, x) <= 1e-4
    res = robeval.certify(TorchModel(lip, input_shape=SHAPE), (x, test_data[1]), method="lipschitz", eps=0.1)
    assert res.lipschitz_bound is not None and res.lipschitz_bound < 1.1  # orthonormal layers


def test_fidelity_error_names_the_difference(torch_models, test_data):
    adapter = TorchModel(torch_models["mlp"], input_shape=SHAPE)
    net = adapter.to_network()
    broken = net.map_params(lambda a: a * 1.01)
    with pytest.raises(FidelityError, match=r"disagrees .* by up to .*Fix:"):
        check_fidelity(adapter, test_data[0], network=broken)


def test_input_shape_is_needed_and_checked(torch_models):
    with pytest.raises(robeval.InvalidParameterError, match=r"input_shape=\(1, 28, 28\)"):
        TorchModel(torch_models["cnn"])
    adapter = TorchModel(torch_models["cnn"], input_shape=SHAPE)
    with pytest.raises(robeval.InputShapeError, match="channels-last"):
        adapter.predict(numpy.zeros((2, 8, 8, 1), numpy.float32))
