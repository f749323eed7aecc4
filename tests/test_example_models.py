"""The trained MNIST models shipped in examples/models/ certify to the numbers recorded beside them,
and the strongest attack never breaks a sample those certificates verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest

import robeval
from robeval.certifiers.attacks import attack
from robeval.data import load_dataset

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"


@pytest.fixture(scope="module")
def mnist_test(mnist_path):
    return load_dataset("mnist", split="test", path=mnist_path)


def _record(name):
    return json.loads((MODELS / f"{name}.json").read_text())


def test_lipschitz_mlp_certifies_as_recorded(mnist_test):
    rec = _record("mnist_lipschitz_mlp")
    result = robeval.certify(MODELS / "mnist_lipschitz_mlp.onnx", mnist_test, method="lipschitz", norm="l2",
                             eps=[0.5, 1.0, 1.58])
    assert result.n == rec["test_images"] == 10000
    assert result.clean_accuracy == pytest.approx(rec["clean accuracy"], abs=1e-12)
    recorded = [rec[f"certified L2 accuracy, radius {r}"] for r in ("0.5", "1.0", "1.58")]
    assert list(result.certified_accuracy) == pytest.approx(recorded, abs=1e-12)


def test_ibp_cnn_certifies_as_recorded(mnist_test):
    rec = _record("mnist_ibp_cnn")
    result = robeval.certify(MODELS / "mnist_ibp_cnn.onnx", mnist_test, method="ibp", eps=0.1)
    assert result.clean_accuracy == pytest.approx(rec["clean_accuracy"], abs=1e-12)
    assert result.certified_accuracy[0] == pytest.approx(rec["ibp_certified_accuracy_eps_0.1"], abs=1e-12)
    assert result.certified_accuracy[0] >= 0.95  # the goal for IBP training at eps = 0.1


@pytest.mark.parametrize("name, norm, eps, method", [
    ("mnist_ibp_cnn", "linf", 0.1, "ibp"),
    ("mnist_lipschitz_mlp", "l2", 1.0, "lipschitz"),
])
def test_attacks_never_break_a_certified_sample(mnist_test, name, norm, eps, method):
    data = (mnist_test.x[:300], mnist_test.y[:300])
    path = MODELS / f"{name}.onnx"
    cert = robeval.certify(path, data, method=method, norm=norm, eps=eps)
    # passing the certificate makes the attack raise ConsistencyError on any contradiction
    report = attack(path, data, attack="pgd", norm=norm, eps=eps, steps=20, certification=cert, seed=0)
    robust = numpy.asarray(report.robust_accuracy)
    assert robust[0] >= cert.certified_accuracy[0]
    assert robust[0] < cert.clean_accuracy  # the attack is not vacuous: it breaks some uncertified samples
