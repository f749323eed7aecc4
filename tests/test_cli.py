"""The command line: info and certify on the built-in model and the reference model, JSON output,
exit codes and one-line errors."""

from __future__ import annotations

import json

import numpy
import pytest
from click.testing import CliRunner

from robeval.cli import main

pytest.importorskip("onnx", reason="the CLI tests load ONNX models (pip install 'robeval[onnx]')")


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_builtin_certify_matches_the_library(tmp_path):
    out = tmp_path / "r.json"
    result = run("certify", "--eps", "0.01,0.1", "--json", str(out))
    assert result.exit_code == 0, result.output
    assert "clean accuracy" in result.output and "certified" in result.output
    payload = json.loads(out.read_text())
    import robeval
    from robeval.cli.common import builtin_model_path
    from robeval.data import load_dataset

    lib = robeval.certify(builtin_model_path(), load_dataset("digits"), method="ibp", eps=[0.01, 0.1])
    assert payload["clean_accuracy"] == pytest.approx(lib.clean_accuracy)
    assert [r["certified_accuracy"] for r in payload["results"]] == pytest.approx(list(lib.certified_accuracy))
    assert len(payload["samples"]["verdict"][0]) == 450
    assert lib.certified_accuracy[0] > 0.8  # the shipped model is IBP-trained
    verdicts = set(payload["samples"]["verdict"][1])
    assert verdicts <= {"verified", "falsified", "unknown"}


def test_info_lists_layers_support_and_lipschitz(reference_onnx):
    result = run("info", str(reference_onnx), "--json", "-")
    assert result.exit_code == 0, result.output
    assert "dense" in result.output and "99,710" in result.output
    assert "ibp        supports every op" in result.output
    facts = json.loads(result.output[result.output.index("{"):])
    assert facts["lipschitz_bound_l2"] > 1
    assert facts["input_shape"] == [1, 28, 28]


def test_info_check_reports_fidelity(reference_onnx, mnist_path):
    result = run("info", str(reference_onnx), "--check", "--data", "mnist", "--data-path", str(mnist_path),
                 "--limit", "64")
    assert result.exit_code == 0, result.output
    assert "fidelity on 64 samples" in result.output


def test_certify_reference_model_lipschitz_json(reference_onnx, mnist_path, tmp_path):
    out = tmp_path / "out.json"
    result = run("certify", str(reference_onnx), "--data", "mnist", "--data-path", str(mnist_path), "--limit", "100",
                 "--norm", "l2", "--eps", "0.05,0.1", "--method", "lipschitz", "--json", str(out))
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["n"] == 100 and payload["clean_accuracy"] == 1.0
    assert payload["lipschitz_bound"] > 0
    score = numpy.array(payload["samples"]["radius_minus_eps"][0], dtype=float)  # radius - 0.05
    verified = numpy.array(payload["samples"]["verdict"][0]) == "verified"
    assert numpy.array_equal(verified, score > 0)
    assert payload["results"][0]["certified_accuracy"] == pytest.approx(verified.mean())
    assert payload["results"][0]["counts"]["verified"] == int(verified.sum())


@pytest.mark.parametrize("args,message", [
    (["certify", "missing.onnx"], "no such model file"),
    (["certify", "--eps", "-0.1"], "negative"),
    (["certify", "--method", "magic"], "method='magic' is not known"),
    (["certify", "--data", "mnist", "--data-path", "/nonexistent/dir"], "mnist"),
])
def test_errors_are_one_line_and_exit_3(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 3, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    result = CliRunner().invoke(main, ["info", str(bad)])
    assert result.exit_code == 3
    assert "Traceback" not in result.output


def test_bad_eps_text_is_a_usage_error():
    result = CliRunner().invoke(main, ["certify", "--eps", "abc"])
    assert result.exit_code == 2
    assert "not a number" in result.output


def test_wrong_data_shape_names_both_shapes(reference_onnx):
    result = CliRunner().invoke(main, ["certify", str(reference_onnx), "--data", "digits"])
    assert result.exit_code == 3
    assert "(1, 28, 28)" in result.output and "(1, 8, 8)" in result.output


def test_attack_never_beats_the_certificate(tmp_path):
    """PGD robust accuracy is an upper bound, IBP certified accuracy a lower bound, on the same samples."""
    out = tmp_path / "a.json"
    result = run("attack", "--attack", "pgd", "--eps", "0.05,0.1", "--steps", "10", "--limit", "120",
                 "--json", str(out))
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    import robeval
    from robeval.cli.common import builtin_model_path
    from robeval.data import load_dataset

    cert = robeval.certify(builtin_model_path(), load_dataset("digits", limit=120), eps=[0.05, 0.1])
    for i, r in enumerate(payload["results"]):
        adv_right = numpy.array(r["samples"]["adv_prediction"]) == numpy.array(r["samples"]["label"])
        verified = cert.verdicts[:, i] == "verified"
        assert adv_right[verified].all(), "an attack broke a certified sample"
        assert r["robust_accuracy"] >= cert.certified_accuracy[i]


def test_sweep_is_reproducible():
    a = run("sweep", "--noise", "pixels", "--levels", "0,0.3", "--draws", "2", "--limit", "60", "--seed", "3")
    b = run("sweep", "--noise", "pixels", "--levels", "0,0.3", "--draws", "2", "--limit", "60", "--seed", "3")
    assert a.exit_code == 0, a.output
    assert a.output == b.output
    assert "95% interval" in a.output
