"""robeval gate: the check parser, exit codes 0/1/2/3 through click's CliRunner and a real
subprocess, baseline regressions, JUnit XML, and computing only what the checks need."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from xml.etree import ElementTree

import numpy
import pytest
from click.testing import CliRunner

from robeval.cli import main
from robeval.cli.common import builtin_model_path
from robeval.gate import (
    EXIT_ERROR,
    EXIT_FAIL,
    EXIT_PASS,
    Check,
    CheckResult,
    GateResult,
    GateUsageError,
    load_config,
    parse_check,
    run_gate,
)

onnx = pytest.importorskip("onnx", reason="the gate tests use ONNX models (pip install 'robeval[onnx]')")
BUILTIN = builtin_model_path().as_posix()


def write_config(tmp_path, checks, path=BUILTIN, extra="", model_extra="", data="digits", limit=40):
    lines = [extra, "[[models]]", f'path = "{path}"', f'data = "{data}"', f"limit = {limit}", model_extra,
             "checks = [" + ", ".join(json.dumps(c) for c in checks) + "]"]
    cfg = tmp_path / "robeval.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def gate(*args):
    return CliRunner().invoke(main, ["gate", *map(str, args)])


# ---------------------------------------------------------------------------- the parser
def test_parse_check_fills_defaults_and_keeps_the_text():
    c = parse_check("certified_accuracy(method='ibp', eps=0.1) >= 0.90")
    assert (c.metric, c.op, c.threshold) == ("certified_accuracy", ">=", 0.9)
    assert c.kwargs == {"method": "ibp", "eps": 0.1, "norm": "linf"}
    assert c.key == "certified_accuracy(eps=0.1, method='ibp', norm='linf')"
    c = parse_check("attack_accuracy(attack='pgd', eps=8/255, norm='l2', steps=20) > 0.5")
    assert c.kwargs == {"attack": "pgd", "eps": pytest.approx(8 / 255), "norm": "l2", "steps": 20}
    assert c.identity == {"attack": "pgd", "eps": pytest.approx(8 / 255), "norm": "l2"}  # no budget
    assert parse_check("lipschitz_bound <= 10").kwargs == {}
    assert parse_check("noise_accuracy(kind='pixels', level=0.3) >= 0.9").kwargs["kind"] in ("replace", "pixels")
    assert parse_check("clean_accuracy>=.98").threshold == 0.98


@pytest.mark.parametrize("text, message", [
    ("clean_accuracy >= ", "does not parse"),
    ("clean_acc >= 0.9", "unknown metric 'clean_acc'; valid metrics: clean_accuracy"),
    ("certified_accuracy(method='ibp', epsilon=0.1) >= 0.9", "valid arguments: method, eps, norm"),
    ("certified_accuracy(method='magic', eps=0.1) >= 0.9", "valid values:"),
    ("certified_accuracy(method='ibp') >= 0.9", "needs eps="),
    ("certified_accuracy('ibp', eps=0.1) >= 0.9", "arguments must be named"),
    ("attack_accuracy(attack='pgd', eps=0.1, norm='l3') >= 0.9", "norm='l3'"),
    ("attack_accuracy(attack='pgd', eps=-0.1) >= 0.9", "expected a number >= 0"),
    ("attack_accuracy(attack='pgd', eps=0.1, steps=True) >= 0.9", "not a literal"),
    ("0.5 <= clean_accuracy <= 0.9", "one comparison"),
    ("clean_accuracy == 0.9", "one comparison"),
    ("__import__('os').system('true') >= 0", "left side must be a metric"),
    ("clean_accuracy >= threshold", "not a literal"),
    ("noise_accuracy(kind='blur', level=0.1) >= 0.9", "kind='blur'"),
])
def test_bad_checks_are_usage_errors_that_say_what_is_valid(text, message):
    with pytest.raises(GateUsageError) as info:
        parse_check(text)
    assert message in str(info.value)


def test_exit_code_comes_from_the_results_only():
    check = parse_check("clean_accuracy >= 0.5")
    ok, bad, err = (CheckResult("m", check, s) for s in ("pass", "fail", "error"))
    assert GateResult(()).exit_code == EXIT_ERROR  # nothing checked is not a pass
    assert GateResult((ok, ok)).exit_code == EXIT_PASS
    assert GateResult((ok, bad)).exit_code == EXIT_FAIL
    assert GateResult((ok, bad, err)).exit_code == EXIT_ERROR
    assert GateResult((replace(ok, status="weird"),)).exit_code == EXIT_ERROR


# ---------------------------------------------------------------------------- exit codes via CliRunner
def test_pass_exits_0_and_prints_a_table(tmp_path):
    cfg = write_config(tmp_path, ["clean_accuracy >= 0.9", "certified_accuracy(method='ibp', eps=0.05) >= 0.8",
                                  "attack_accuracy(attack='fgsm', eps=0.05) >= 0.8", "lipschitz_bound <= 1000",
                                  "noise_accuracy(kind='uniform', level=0.1) >= 0.8"])
    result = gate("--config", cfg)
    assert result.exit_code == 0, result.output
    assert "MODEL" in result.output and "PASS" in result.output
    assert "5 passed, 0 failed, 0 error(s) -> exit 0" in result.output


def test_fail_exits_1_and_junit_has_one_testcase_per_check(tmp_path):
    checks = ["clean_accuracy >= 0.5", "clean_accuracy > 1", "certified_accuracy(method='ibp', eps=0.3) > 0.5"]
    cfg = write_config(tmp_path, checks)
    junit = tmp_path / "out.xml"
    result = gate("--config", cfg, "--junit", junit)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "measured" in result.output
    root = ElementTree.parse(junit).getroot()
    cases = root.findall(".//testcase")
    assert [c.get("name") for c in cases] == checks
    assert root.get("tests") == "3" and root.get("failures") == "2" and root.get("errors") == "0"
    failure = cases[1].find("failure")
    assert cases[0].find("failure") is None and failure is not None
    assert "threshold > 1" in failure.get("message") and "measured " in failure.get("message")
    assert "measured:" in failure.text and "threshold: > 1" in failure.text


@pytest.mark.parametrize("checks, extra, message", [
    (["clean_accuracy >= "], "", "does not parse"),
    (["robust_accuracy(eps=0.1) >= 0.9"], "", "unknown metric 'robust_accuracy'"),
    (["clean_accuracy >= 0.9"], "thresholds = 3", "unknown key(s) ['thresholds']"),
    (["clean_accuracy >= 0.9"], 'profile = "slow"', "profile = 'slow'"),
    ([], "", "checks must be a non-empty list"),
])
def test_usage_errors_exit_2(tmp_path, checks, extra, message):
    result = gate("--config", write_config(tmp_path, checks, extra=extra))
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_usage_errors_exit_2_for_files_and_options(tmp_path):
    assert gate("--config", tmp_path / "none.toml").exit_code == 2
    (tmp_path / "bad.toml").write_text("[[models]\npath = 1\n")
    assert "not valid TOML" in gate("--config", tmp_path / "bad.toml").output
    assert gate("--config", tmp_path / "bad.toml").exit_code == 2
    assert gate("--no-such-option").exit_code == 2  # click's own
    cfg = write_config(tmp_path, ["clean_accuracy >= 0.5"])
    result = gate("--config", cfg, "--baseline", tmp_path / "missing.json")
    assert result.exit_code == 2 and "does not exist" in result.output


def nan_model(path):
    """Flatten -> Gemm whose weights hold a NaN: every output row is NaN."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy.ones((10, 64), numpy.float32)
    w[2, 3] = numpy.nan
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("Gemm", ["flat", "W"], ["logits"],
                                                                            transB=1)],
        "nan", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def log_softmax_model(path):
    """Flatten -> Gemm -> LogSoftmax -> Gemm: LogSoftmax inside the network has no CROWN relaxation."""
    from onnx import TensorProto, helper, numpy_helper

    rng = numpy.random.default_rng(0)
    w1, w2 = (rng.normal(size=s).astype(numpy.float32) * 0.3 for s in ((16, 64), (10, 16)))
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("Gemm", ["flat", "W1"], ["h"], transB=1),
         helper.make_node("LogSoftmax", ["h"], ["l"], axis=1), helper.make_node("Gemm", ["l", "W2"], ["logits"],
                                                                               transB=1)],
        "lsm", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_evaluation_errors_exit_3(tmp_path):
    missing = gate("--config", write_config(tmp_path, ["clean_accuracy >= 0.5"], path=tmp_path / "no.onnx"))
    assert missing.exit_code == 3 and "ModelLoadError" in missing.output and "ERROR" in missing.output
    nan = gate("--config", write_config(tmp_path, ["clean_accuracy >= 0.0"], path=nan_model(tmp_path / "nan.onnx")))
    assert nan.exit_code == 3 and "NaN" in nan.output  # a NaN model must not pass "accuracy >= 0"
    unsupported = gate("--config", write_config(tmp_path, ["certified_accuracy(method='crown', eps=0.1) >= 0",
                                                           "clean_accuracy >= 0"],
                                                path=log_softmax_model(tmp_path / "lsm.onnx")))
    assert unsupported.exit_code == 3 and "log_softmax" in unsupported.output
    no_data = gate("--config", write_config(tmp_path, ["clean_accuracy >= 0"], data="missing.npz"))
    assert no_data.exit_code == 3 and "DataNotFoundError" in no_data.output
    no_mnist = gate("--config", write_config(tmp_path, ["clean_accuracy >= 0"], data="mnist",
                                             model_extra=f'data_path = "{(tmp_path / "empty").as_posix()}"'))
    assert no_mnist.exit_code == 3


def test_evaluation_error_junit_has_error_elements(tmp_path):
    cfg = write_config(tmp_path, ["clean_accuracy >= 0.5", "lipschitz_bound <= 5"], path=tmp_path / "no.onnx")
    junit = tmp_path / "j.xml"
    assert gate("--config", cfg, "--junit", junit).exit_code == 3
    cases = ElementTree.parse(junit).getroot().findall(".//testcase")
    assert len(cases) == 2 and all(c.find("error") is not None for c in cases)


def test_unexpected_exception_prints_traceback_and_exits_3(tmp_path, monkeypatch):
    from robeval import auditor as audit

    def broken(self, *args, **kwargs):
        raise ZeroDivisionError("planted bug")

    monkeypatch.setattr(audit.Evaluator, "certify", broken)
    result = gate("--config", write_config(tmp_path, ["certified_accuracy(method='ibp', eps=0.1) >= 0"]))
    assert result.exit_code == 3
    assert "Traceback" in result.stderr and "planted bug" in result.output


# ---------------------------------------------------------------------------- a real process
@pytest.mark.parametrize("check, path, code", [
    ("clean_accuracy >= 0.5", BUILTIN, 0),
    ("clean_accuracy > 1", BUILTIN, 1),
    ("clean_accuracy >>= 0.5", BUILTIN, 2),
    ("clean_accuracy >= 0.5", "does/not/exist.onnx", 3),
])
def test_exit_codes_in_a_real_process(tmp_path, check, path, code):
    cfg = write_config(tmp_path, [check], path=path, limit=20)
    done = subprocess.run([sys.executable, "-c", "from robeval.cli import main; main()", "gate", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == code, done.stdout + done.stderr


# ---------------------------------------------------------------------------- baselines
@pytest.fixture(scope="module")
def baseline_report(tmp_path_factory):
    from robeval.auditor import PROFILES, audit

    tiny = replace(PROFILES["quick"], attacks=(("fgsm", None),), certifiers=("ibp",), noise_kinds=(), examples=0)
    path = tmp_path_factory.mktemp("baseline") / "report.json"
    path.write_text(audit(BUILTIN, "digits", profile=tiny, limit=40).to_json())
    return json.loads(path.read_text())


BASELINE_CHECKS = ["clean_accuracy >= 0.5", "certified_accuracy(method='ibp', eps=0.05) >= 0.5",
                   "lipschitz_bound <= 1000"]


def planted(tmp_path, baseline, name, change):
    payload = json.loads(json.dumps(baseline))
    for m in payload["metrics"]:
        if m["name"] == name and (name != "certified_accuracy" or m["args"]["eps"] == 0.05):
            m["value"] = change(m["value"])
    path = tmp_path / f"baseline_{name}.json"
    path.write_text(json.dumps(payload))
    return path


def test_unchanged_baseline_passes(tmp_path, baseline_report):
    cfg = write_config(tmp_path, BASELINE_CHECKS)
    base = planted(tmp_path, baseline_report, "none", lambda v: v)
    result = gate("--config", cfg, "--baseline", base)
    assert result.exit_code == 0, result.output
    values = {m["key"]: m["value"] for m in baseline_report["metrics"]}
    assert f"{values['clean_accuracy']:.4f}" in result.output  # the baseline column


@pytest.mark.parametrize("name, change", [
    ("clean_accuracy", lambda v: v + 0.05),  # the new run is 5 points below the baseline
    ("certified_accuracy", lambda v: v + 0.05),
    ("lipschitz_bound", lambda v: v * 0.9),  # lower is better: the new bound is 11% above the baseline
])
def test_planted_regression_fails(tmp_path, baseline_report, name, change):
    cfg = write_config(tmp_path, BASELINE_CHECKS)
    result = gate("--config", cfg, "--baseline", planted(tmp_path, baseline_report, name, change),
                  "--tolerance", "0.01")
    assert result.exit_code == 1, result.output
    failing = [line for line in result.output.splitlines() if line.startswith("  FAIL")]
    assert len(failing) == 1 and name in failing[0] and "regressed from baseline" in failing[0]


def test_regression_within_tolerance_passes_and_config_baseline_is_used(tmp_path, baseline_report):
    base = planted(tmp_path, baseline_report, "clean_accuracy", lambda v: v + 0.005)
    cfg = write_config(tmp_path, BASELINE_CHECKS, extra=f'baseline = "{base.name}"\ntolerance = 0.01')
    assert gate("--config", cfg).exit_code == 0
    cfg = write_config(tmp_path, BASELINE_CHECKS, extra=f'baseline = "{base.name}"\ntolerance = 0.001')
    assert gate("--config", cfg).exit_code == 1
    assert load_config(cfg).models[0].baseline == base  # relative to the config file


# ---------------------------------------------------------------------------- only what is needed
def test_only_the_needed_metrics_are_computed(tmp_path, monkeypatch):
    from robeval import auditor as audit

    calls = []
    for name in ("attack", "certify", "noise", "lipschitz_bound"):
        original = getattr(audit.Evaluator, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, args[:2]))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(audit.Evaluator, name, spy)
    cfg = write_config(tmp_path, ["certified_accuracy(method='ibp', eps=0.1) >= 0",
                                  "certified_accuracy(method='ibp', eps=0.05) >= 0", "clean_accuracy >= 0"])
    result = run_gate(load_config(cfg))
    assert result.exit_code == 0
    assert calls == [("certify", ("ibp", [0.05, 0.1]))]  # one certification for both radii, no attack or noise


def test_check_is_hashable_and_comparable():
    assert parse_check("clean_accuracy >= 0.5") == parse_check("clean_accuracy >= 0.5")
    assert isinstance(hash(parse_check("certified_accuracy(eps=0.1) >= 0.5")), int)
    assert isinstance(parse_check("clean_accuracy >= 0.5"), Check)


def test_shipped_example_config_parses():
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[1] / "examples" / "robeval.toml")
    (model,) = config.models
    assert model.path.resolve() == builtin_model_path().resolve()
    assert len(model.checks) == 8 and config.tolerance == 0.01 and config.profile == "quick"
