"""robeval audit: the report's numbers against independent computations, report.json against its
schema, the HTML page self-contained and rendered by headless Chromium, the Markdown, skipped
certifiers with their reason, and the CLI."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import replace

import numpy
import pytest
from click.testing import CliRunner

from robeval.auditor import Profile, audit
from robeval.cli import main
from robeval.cli.common import builtin_model_path
from robeval.data import load_dataset
from robeval.report.report import Report, schema

pytest.importorskip("onnx", reason="the audit tests use the built-in ONNX model (pip install 'robeval[onnx]')")

#: A small profile so that the tests stay fast; the shipped profiles are exercised by the CLI test.
TINY = Profile("tiny", limit=40, eps={"linf": (0.05, 0.1), "l2": (0.5,)}, attacks=(("fgsm", None), ("pgd", 5)),
               restarts=1, noise_kinds=("uniform", "pixels"), noise_levels=(0.0, 0.1, 0.3), draws=1,
               certifiers=("ibp", "crown", "lipschitz"), masking_checks=("pgd",), examples=3)
PNG = b"\x89PNG\r\n\x1a\n"


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture(scope="module")
def report() -> Report:
    return audit(builtin_model_path(), "digits", profile=TINY, limit=60)


@pytest.fixture(scope="module")
def saved(report, tmp_path_factory):
    return report.save(tmp_path_factory.mktemp("report"))


def test_report_json_validates_against_the_shipped_schema(saved):
    jsonschema = pytest.importorskip("jsonschema", reason="schema validation needs jsonschema (a dev dependency)")
    payload = json.loads(saved["json"].read_text())
    jsonschema.Draft202012Validator.check_schema(schema())
    jsonschema.validate(payload, schema())
    assert payload["schema_version"] == "1.1"
    assert {m["key"] for m in payload["metrics"]} >= {
        "clean_accuracy", "attack_accuracy(attack='pgd', eps=0.1, norm='linf')",
        "certified_accuracy(eps=0.1, method='ibp', norm='linf')", "noise_accuracy(kind='uniform', level=0.3)",
        "lipschitz_bound"}
    for broken in ({**payload, "clean_accuracy": 1.5}, {k: v for k, v in payload.items() if k != "metrics"},
                   {**payload, "consistency": {**payload["consistency"], "status": "fine"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema())


def test_numbers_match_independent_computations(report):
    import onnxruntime

    ds = load_dataset("digits", limit=60)
    session = onnxruntime.InferenceSession(str(builtin_model_path()), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: ds.x})[0]
    assert report.clean_accuracy == pytest.approx(float((logits.argmax(1) == ds.y).mean()))
    import robeval.api

    ibp = robeval.api.certify(builtin_model_path(), ds, method="ibp", eps=[0.05, 0.1])
    for e, acc in zip(ibp.eps, ibp.certified_accuracy):
        assert report.metric("certified_accuracy", method="ibp", eps=e, norm="linf") == pytest.approx(acc)
    n = report.data["n"]
    for row in report.verdicts():
        assert row["verified"] + row["unknown"] + row["falsified"] == n
        for c in report.certificates:  # the union of certificates verifies at least what each one does
            assert row["verified"] >= c.counts(c.eps.index(row["eps"]))["verified"]
        for rep in report.attacks:  # certified (a lower bound) never exceeds robust under attack (an upper bound)
            robust = rep.robust_accuracy[rep.eps.index(row["eps"])]
            assert row["verified"] <= round(robust * n)
            assert row["falsified"] >= round((1 - robust) * n)
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in onnx.load(str(builtin_model_path())).graph.initializer]
    product = numpy.prod([numpy.linalg.norm(w.astype(numpy.float64), 2) for w in weights if w.ndim == 2])
    assert report.lipschitz_bound == pytest.approx(product, rel=1e-6)  # dense-relu-dense: product of ||W||_2
    assert not report.violations and report.pairs_checked == len(report.certificates) * len(report.attacks)


def test_examples_are_real_adversarial_inputs(report):
    import onnxruntime

    assert report.examples
    session = onnxruntime.InferenceSession(str(builtin_model_path()), providers=["CPUExecutionProvider"])
    for ex in report.examples:
        x_adv = ex.x_adv[None].astype(numpy.float32)
        pred = int(session.run(None, {session.get_inputs()[0].name: x_adv})[0].argmax())
        assert pred == ex.adv_prediction != ex.label == ex.clean_prediction
        assert numpy.abs(ex.x_adv - ex.x).max() <= ex.eps + 1e-6


def test_html_is_one_self_contained_page(report, saved):
    pytest.importorskip("matplotlib", reason="the figures need matplotlib")
    page = saved["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    for pattern in (r"href\s*=", r"<script", r"<link", r"url\(", r"https?://", r"<iframe"):
        assert not re.search(pattern, page, re.I), pattern
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 2 + 3 * len(report.examples)  # accuracy, verdicts; original, adversarial, perturbation
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    assert "per-sample verdicts" in page.lower() and "Adversarial examples" in page


def test_html_renders_in_headless_chromium(saved, tmp_path):
    exe = chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the HTML rendering check needs it")
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tempfile.mkdtemp()}", "--enable-logging=stderr", "--window-size=1200,2400"]
    done = subprocess.run([exe, *flags, f"--screenshot={shot}", saved["html"].resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(PNG) and len(data) > 10_000
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1200, 2400)
    assert "Failed to load resource" not in done.stderr and "Uncaught" not in done.stderr


def test_markdown_for_pull_requests(report, saved):
    text = saved["markdown"].read_text()
    assert text == report.to_markdown()
    assert text.startswith("### robeval audit")
    assert "| eps | FGSM | PGD | ibp (certified) |" in text
    assert "clean accuracy" in text and "consistency" in text
    assert "<img" not in text


def test_violations_and_warnings_are_shown(report):
    flagged = replace(report, violations=("2 sample(s) [3, 7] were broken by pgd",),
                      warnings=("pgd at eps=0.1: random noise broke 3 samples",))
    payload = flagged.to_dict()
    assert payload["consistency"]["status"] == "violation"
    assert payload["warnings"] == ["pgd at eps=0.1: random noise broke 3 samples"]
    page = flagged.to_html()
    assert "Certificate contradicted by an attack" in page and "[3, 7]" in page and "gradient masking" in page
    assert ":x:" in flagged.to_markdown()


def test_certifier_without_a_rule_is_skipped_with_the_reason(tmp_path):
    from robeval.ir import Network, Node

    rng = numpy.random.default_rng(0)
    w1, w2 = rng.normal(size=(16, 64)) * 0.3, rng.normal(size=(10, 16)) * 0.3
    net = Network([Node("flat", "flatten", ("input",)), Node("d1", "dense", ("flat",), {"weight": w1}),
                   Node("lsm", "log_softmax", ("d1",), attrs={"axis": 1}),
                   Node("d2", "dense", ("lsm",), {"weight": w2})], (1, 8, 8))
    rep = audit(net, "digits", profile=replace(TINY, certifiers=("ibp", "crown", "lipschitz")), limit=20)
    skipped = {s.method: s.reason for s in rep.skipped}
    assert "log_softmax" in skipped["crown"] and "'lsm'" in skipped["crown"]  # no linear relaxation
    assert [c.method for c in rep.certificates] == ["ibp", "lipschitz"]
    assert "crown skipped" in rep.to_html()
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(rep.to_dict(), schema())


def test_python_api_mirrors_the_cli():
    import robeval
    import robeval.auditor as module

    ds = load_dataset("digits", limit=20)
    rep = robeval.audit(builtin_model_path(), (ds.x, ds.y), profile=replace(TINY, certifiers=("ibp",)), eps=[0.1])
    assert rep is not None and module.audit is not None
    assert isinstance(rep, Report) and rep.data["n"] == 20 and rep.eps == (0.1,)
    assert json.loads(rep.to_json())["clean_accuracy"] == rep.clean_accuracy
    with pytest.raises(robeval.InvalidParameterError, match="profile"):
        robeval.audit(builtin_model_path(), (ds.x, ds.y), profile="slow")


def test_cli_audit_writes_json_html_and_markdown(tmp_path):
    out = tmp_path / "audit"
    result = CliRunner().invoke(main, ["audit", "--limit", "30", "--eps", "0.05,0.1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "clean accuracy" in result.output and "ibp (certified)" in result.output
    for name in ("report.json", "report.html", "report.md"):
        assert (out / name).stat().st_size > 0
    payload = json.loads((out / "report.json").read_text())
    assert payload["data"] == {"name": "digits:test", "n": 30, "domain": [0.0, 1.0]}
    assert payload["model"]["label"] == "builtin:digits_mlp" and payload["profile"] == "quick"
    assert [a["attack"] for a in payload["settings"]["attacks"]] == ["fgsm", "pgd", "apgd"]


def test_cli_audit_errors_exit_3(tmp_path):
    result = CliRunner().invoke(main, ["audit", str(tmp_path / "missing.onnx"), "--data", "digits",
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 3
    assert "no such model file" in result.output
    assert not (tmp_path / "o").exists()


def test_nan_model_is_refused():
    from robeval.auditor import NonFiniteOutputError
    from robeval.ir import Network, Node

    w = numpy.ones((10, 64))
    w[3, 5] = numpy.nan
    net = Network([Node("flat", "flatten", ("input",)), Node("d", "dense", ("flat",), {"weight": w})], (1, 8, 8))
    with pytest.raises(NonFiniteOutputError, match="NaN"):
        audit(net, "digits", profile=TINY, limit=10)


def test_figures_without_matplotlib_are_replaced_by_a_note(report, monkeypatch):
    from robeval.report import plots

    monkeypatch.setattr(plots, "available", lambda: False)
    page = report.to_html()
    assert "install matplotlib" in page
    # the adversarial examples are written without matplotlib: only those images remain
    assert len(re.findall("<img", page)) == 3 * len(report.examples) > 0
