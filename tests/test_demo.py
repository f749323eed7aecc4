"""robeval demo in its reduced form (--quick: tiny training and audit): both models trained and
exported, both reports written and valid, the comparison printed; and the fallback without torch."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from robeval.cli import main

pytest.importorskip("onnx", reason="the demo audits ONNX models (pip install 'robeval[onnx]')")
pytest.importorskip("sklearn", reason="the demo's data set (8x8 digits) comes with scikit-learn")


def validate(path):
    jsonschema = pytest.importorskip("jsonschema", reason="schema validation needs jsonschema")
    from robeval.report.report import schema

    payload = json.loads(path.read_text())
    jsonschema.validate(payload, schema())
    return payload


def test_quick_demo_trains_audits_and_compares(tmp_path):
    pytest.importorskip("torch", reason="the demo trains with PyTorch")
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--data", "digits", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("plain", "robust"):
        assert (out / "models" / f"{name}.onnx").stat().st_size > 0
        payload = validate(out / name / "report.json")
        assert payload["data"]["name"] == "digits:test" and payload["model"]["label"].endswith(f"{name}.onnx")
        assert (out / name / "report.html").read_text().count("data:image/png;base64,") >= 2
        assert (out / name / "report.md").read_text().startswith("### robeval audit")
    assert "trained the robust model (IBP" in result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "clean" in line and "PGD@" in line)
    assert "certified@" in header
    assert any(line.split()[0] == "plain" for line in lines) and any(line.split()[0] == "robust" for line in lines)
    assert (out / "summary.md").read_text().startswith("# robeval demo")


def test_demo_without_torch_falls_back_to_the_shipped_model(tmp_path, monkeypatch):
    from robeval import demo

    monkeypatch.setattr(demo, "has_torch", lambda: False)
    logged = []
    result = demo.run_demo(tmp_path / "d", quick=True, log=logged.append)
    assert any("PyTorch is not installed" in line for line in logged)
    assert "PyTorch is not installed" in "\n".join(result.summary())
    assert result.reports["robust"].model["label"].endswith("digits_mlp.onnx")
    assert result.reports["plain"].model["label"] == "plain (scikit-learn MLP)"
    for name in ("plain", "robust"):
        validate(tmp_path / "d" / name / "report.json")
    assert result.reports["plain"].clean_accuracy > 0.8  # the scikit-learn MLP is a real classifier


def test_auto_data_prefers_mnist_only_when_it_is_on_disk(tmp_path, monkeypatch, request):
    from robeval.demo import choose_data

    monkeypatch.setenv("ROBEVAL_DATA", str(tmp_path / "nothing"))
    monkeypatch.setenv("ROBEVAL_CACHE", str(tmp_path / "cache"))
    assert choose_data("auto", quick=False) == "digits"  # never downloads
    assert choose_data("auto", quick=True) == "digits"
    assert choose_data("mnist", quick=True) == "mnist"
    with pytest.raises(ValueError, match="expected 'auto'"):
        choose_data("cifar", quick=False)
    mnist = request.getfixturevalue("mnist_path")  # skips without the shared MNIST file
    monkeypatch.setenv("ROBEVAL_DATA", str(mnist))
    assert choose_data("auto", quick=False) == "mnist"
