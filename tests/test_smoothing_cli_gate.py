"""Smoothing and --mean/--std through the CLI, and the smoothed_certified_accuracy gate metric."""

from __future__ import annotations

import json

import numpy
import pytest
from click.testing import CliRunner

from robeval.cli import main
from robeval.cli.common import builtin_model_path
from robeval.gate import load_config, parse_check, run_gate
from robeval.gate_checks import GateUsageError

pytest.importorskip("onnx")
BUILTIN = builtin_model_path().as_posix()


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_cli_certify_smoothing_table_and_json(tmp_path):
    out = tmp_path / "r.json"
    res = run("certify", BUILTIN, "--data", "digits", "--limit", "6", "--method", "smoothing", "--sigma", "0.25",
              "--draws", "500", "--n0", "50", "--eps", "0,0.25", "--json", str(out))
    assert res.exit_code == 0, res.output
    assert "method: smoothing (probabilistic)" in res.output and "probability >= 0.999" in res.output
    payload = json.loads(out.read_text())
    assert payload["kind"] == "probabilistic" and payload["n"] == 500 and payload["samples_count"] == 6
    counts = payload["results"][0]["counts"]
    assert sum(counts.values()) == 6
    radius = numpy.array(payload["samples"]["radius"])
    certified_at_025 = sum(v == "certified" for v in payload["samples"]["verdict"][1])
    right = numpy.array(payload["samples"]["prediction"]) == numpy.array(payload["samples"]["label"])
    assert certified_at_025 == int(((radius >= 0.25) & right).sum())


@pytest.mark.parametrize("args, message", [
    (["--method", "smoothing"], "needs --sigma"),
    (["--method", "smoothing", "--sigma", "0.25", "--norm", "linf"], "L2 radii only"),
    (["--method", "ibp", "--sigma", "0.25"], "--method smoothing only"),
    (["--mean", "0.5"], "--mean and --std go together"),
])
def test_cli_usage_errors_exit_2(args, message):
    res = run("certify", BUILTIN, "--data", "digits", "--limit", "2", *args)
    assert res.exit_code == 2 and message in res.output


def test_cli_bad_std_is_one_line_error():
    res = run("certify", BUILTIN, "--data", "digits", "--limit", "2", "--mean", "0,0", "--std", "1,1,1")
    assert res.exit_code == 3 and "std" in res.output and "Traceback" not in res.output


def test_cli_normalisation_identity_changes_nothing():
    """mean 0, std 1 prepended: the same certified counts as without it."""
    base = run("certify", BUILTIN, "--data", "digits", "--limit", "20", "--eps", "0.01,0.05", "--json", "-")
    norm = run("certify", BUILTIN, "--data", "digits", "--limit", "20", "--eps", "0.01,0.05", "--mean", "0",
               "--std", "1", "--json", "-")
    assert base.exit_code == 0 and norm.exit_code == 0, norm.output

    def counts(text):
        payload = json.loads(text[text.index("{"):])
        return [r["counts"] for r in payload["results"]]

    assert counts(base.output) == counts(norm.output)
    assert "normalised: mean [0.0], std [1.0]" in norm.output


def test_gate_metric_parse_and_refusals():
    c = parse_check("smoothed_certified_accuracy(sigma=0.25, radius=0.5) >= 0.4")
    assert c.kwargs == {"sigma": 0.25, "radius": 0.5, "alpha": 0.001}
    assert c.key.startswith("smoothed_certified_accuracy(")
    for bad in ["smoothed_certified_accuracy(radius=0.5) >= 0", "smoothed_certified_accuracy(sigma=0, radius=1) >= 0",
                "smoothed_certified_accuracy(sigma=0.2, radius=1, alpha=2) >= 0",
                "certified_accuracy(method='smoothing', eps=0.5, norm='l2') >= 0"]:
        with pytest.raises(GateUsageError):
            parse_check(bad)


def test_gate_runs_smoothing(tmp_path):
    cfg = tmp_path / "robeval.toml"
    cfg.write_text("[[models]]\n" f'path = "{BUILTIN}"\ndata = "digits"\nlimit = 8\n'
                   'checks = ["smoothed_certified_accuracy(sigma=0.25, radius=0.0, n=300, n0=30) >= 0.5", '
                   '"smoothed_certified_accuracy(sigma=0.25, radius=100, n=300, n0=30) > 0"]\n')
    result = run_gate(load_config(cfg))
    first, second = result.results
    assert first.status == "pass" and 0.5 <= first.value <= 1.0
    assert second.status == "fail" and second.value == 0.0  # 300 draws cannot certify radius 100
