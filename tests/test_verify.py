"""``verify``: verdicts on tiny networks with known answers, the prover contract (a 'sat' without a
replay is never believed), model kinds and the row-major input mapping, gzip ONNX, the CLI (verify
and vnncomp run, through CliRunner and one real subprocess) and the benchmark comparison."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from click.testing import CliRunner
from conftest import REPO, SHARED

pytest.importorskip("onnx", reason="the verifier tests build ONNX models (pip install 'robeval[onnx]')")
pytest.importorskip("onnxruntime", reason="counterexamples replay on onnxruntime")

import robeval  # noqa: E402
from robeval.adapters.onnx import OnnxModel, load_onnx  # noqa: E402
from robeval.cli import main  # noqa: E402
from robeval.errors import InvalidParameterError, ModelLoadError  # noqa: E402
from robeval.verify import Case, Disjunct, Spec, read_vnnlib, robustness_spec, verify  # noqa: E402
from robeval.verify import verifier as verifier_module  # noqa: E402

from verify_models import mlp_onnx, random_layers, save, sum_net, vnnlib_text  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))


def relu_identity():
    return mlp_onnx([(numpy.eye(2), numpy.zeros(2)), (numpy.eye(2), numpy.zeros(2))])


# ---------------------------------------------------------------------------- verdicts
def test_holds_and_violated_on_tiny_nets():
    model = relu_identity()
    held = verify(model, robustness_spec(numpy.array([0.9, 0.1]), 0.05, label=0, num_classes=2), timeout=20)
    assert (held.status, held.vnncomp, held.counterexample) == ("holds", "unsat", None)
    assert [c.status for c in held.cases] == ["unsat"]
    broken = verify(model, robustness_spec(numpy.array([0.55, 0.45]), 0.1, label=0, num_classes=2), timeout=20)
    assert (broken.status, broken.vnncomp) == ("violated", "sat")
    cex = broken.counterexample
    assert cex.y[1] >= cex.y[0] and abs(cex.x - [0.55, 0.45]).max() <= 0.1 + 1e-12
    assert broken.to_dict()["counterexample"]["x"] == cex.x.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_verdicts_agree_with_a_lipschitz_certified_grid(seed):
    """Two inputs: a grid with spacing h and a Lipschitz bound L give the exact answer when the
    threshold is outside [grid max, grid max + L h / sqrt 2]; verify must then say exactly that."""
    rng = numpy.random.default_rng(seed)
    layers = random_layers(rng, (2, 12, 12, 1))
    model = mlp_onnx(layers)
    net = load_onnx(model, channels_last=False)
    g = numpy.linspace(-1, 1, 401)
    pts = numpy.stack(numpy.meshgrid(g, g), -1).reshape(-1, 2)
    top = float(numpy.asarray(net.astype(numpy.float64).forward(pts)).max())
    lip = numpy.prod([numpy.linalg.norm(numpy.asarray(w, numpy.float32).astype(float), 2) for w, _ in layers])
    slack = lip * (g[1] - g[0]) * numpy.sqrt(2) / 2 + 1e-6
    for threshold, truth in ((top + slack + 0.05, "holds"), (top - 0.05, "violated")):
        spec = Spec.from_box([-1, -1], [1, 1], [[-1.0]], [-threshold])  # violated iff y >= threshold
        result = verify(model, spec, timeout=20, seed=seed)
        assert result.status == truth, (seed, threshold, result.status)


def test_flat_inputs_map_row_major_onto_the_input_tensor(tmp_path):
    # input (N, 2, 3); only element [1, 1] (flat index 4) reaches the output: y = (x[1,1], 0)
    w = numpy.zeros((6, 2))
    w[4, 0] = 1.0
    model = mlp_onnx([(w, numpy.zeros(2))], in_shape=(2, 3))
    lo, hi = numpy.zeros(6), numpy.zeros(6)
    hi[4] = 1.0
    spec = Spec.from_box(lo, hi, [[-1.0, 0.0]], [-0.9])  # y0 >= 0.9
    result = verify(save(model, tmp_path / "m.onnx"), spec, timeout=10)
    assert result.status == "violated" and result.counterexample.x[4] >= 0.9
    closed = Spec.from_box(lo, numpy.eye(6)[3], [[-1.0, 0.0]], [-0.9])  # only X_3 may move: holds
    assert verify(model, closed, timeout=10).status == "holds"


def test_every_model_kind_gives_the_same_verdict(tmp_path):
    model = sum_net(3)
    spec = Spec.from_box(numpy.zeros(3), numpy.ones(3), [[-1.0, 0.0]], [-2.5])
    kinds = [model, save(model, tmp_path / "s.onnx"), save(model, tmp_path / "s.onnx.gz", compress=True),
             str(tmp_path / "s.onnx.gz"), OnnxModel(model), load_onnx(model),
             verifier_module.prepare_model(tmp_path / "s.onnx.gz")]
    for kind in kinds:
        result = verify(kind, spec, timeout=10)
        assert result.status == "violated" and result.counterexample.y[0] >= 2.5, type(kind)
    assert robeval.verify(model, spec, timeout=10).status == "violated"  # the package is callable


def test_sizes_and_arguments_are_checked():
    model = sum_net(3)
    with pytest.raises(InvalidParameterError, match=r"4 inputs and 2 outputs; the network .* has 3 inputs"):
        verify(model, Spec.from_box(numpy.zeros(4), numpy.ones(4), [[1.0, 0.0]], [0.0]))
    with pytest.raises(InvalidParameterError, match="timeout=0"):
        verify(model, Spec.from_box(numpy.zeros(3), numpy.ones(3), [[1.0, 0.0]], [0.0]), timeout=0)
    with pytest.raises(InvalidParameterError, match="expected a robeval.verify.Spec"):
        verify(model, "prop.vnnlib")


def test_a_property_without_cases_holds():
    spec = read_vnnlib(vnnlib_text([0.0], [1.0], [([1.0], 0.0)]).replace("(assert (>= X_0 0.0))",
                                                                           "(assert (>= X_0 2.0))"))
    assert spec.cases == ()
    assert verify(mlp_onnx([(numpy.eye(1), numpy.zeros(1))]), spec, timeout=5).status == "holds"


# ---------------------------------------------------------------------------- the prover contract
class FakeProver:
    """A prove_case double: the status per case index, optionally calling check(x) first."""

    def __init__(self, statuses, points=None):
        self.statuses, self.points, self.calls, self.progress = statuses, points or {}, [], []

    def __call__(self, net, case, deadline, check=None, progress=None):
        i = len(self.calls)
        self.calls.append(deadline)
        self.progress.append(progress)
        if progress is not None:
            progress(f"fake stage of case {i}")
        detail = {"stage": "fake"}
        if i in self.points:
            detail["x"] = self.points[i]
            if check is not None and check(self.points[i]):
                return "sat", detail
        return self.statuses[i], detail


def crown_proves_nothing(net, case):
    """A crown_case double, so that every case reaches the (fake) full prover."""
    return "unknown", {"stage": "crown", "time": 0.0}


def two_cases():
    # y = (x, -x); case 0 on [0, 1], case 1 on [2, 3]; both ask for y0 <= -1: impossible
    model = mlp_onnx([(numpy.array([[1.0, -1.0]]), numpy.zeros(2))])
    d = (Disjunct([[1.0, 0.0]], [-1.0]),)
    return model, Spec((Case([0.0], [1.0], d), Case([2.0], [3.0], d)), 1, 2)


@pytest.mark.parametrize("statuses, verdict", [
    (["unsat", "unsat"], "holds"), (["unsat", "unknown"], "unknown"), (["timeout", "unsat"], "timeout"),
    (["unknown", "timeout"], "timeout"), (["bogus", "unsat"], "unknown"),
])
def test_the_property_holds_only_when_every_case_is_unsat(monkeypatch, statuses, verdict):
    prover = FakeProver(statuses)
    monkeypatch.setattr("robeval.verify.prove.prove_case", prover)
    monkeypatch.setattr("robeval.verify.prove.crown_case", crown_proves_nothing)
    monkeypatch.setattr(verifier_module, "SEARCH_ROUNDS", 1)
    model, spec = two_cases()
    result = verify(model, spec, timeout=5)
    assert result.status == verdict and len(prover.calls) == 2
    assert prover.calls[0] < prover.calls[1]  # case 0 gets half the time left, case 1 the rest


@pytest.mark.parametrize("progress", [True, False])
def test_progress_forwards_the_provers_lines_per_case(monkeypatch, capsys, progress):
    prover = FakeProver(["unsat", "unsat"])
    monkeypatch.setattr("robeval.verify.prove.prove_case", prover)
    monkeypatch.setattr("robeval.verify.prove.crown_case", crown_proves_nothing)
    model, spec = two_cases()
    assert verify(model, spec, timeout=5, progress=progress).status == "holds"
    err = capsys.readouterr().err
    if progress:
        assert "] case 0: fake stage of case 0\n" in err and "] case 1: fake stage of case 1\n" in err
    else:
        assert prover.progress == [None, None] and "fake stage" not in err


def test_a_sat_from_the_prover_needs_a_replay(monkeypatch):
    model, spec = two_cases()
    monkeypatch.setattr("robeval.verify.prove.crown_case", crown_proves_nothing)
    # the prover claims sat with a point that does not violate: never reported as violated
    monkeypatch.setattr("robeval.verify.prove.prove_case", FakeProver(["sat", "unsat"], {0: numpy.array([0.5])}))
    monkeypatch.setattr(verifier_module, "SEARCH_ROUNDS", 1)
    assert verify(model, spec, timeout=5).status == "unknown"
    # a point the replay accepts: violated, with that point
    model = mlp_onnx([(numpy.array([[1.0, -1.0]]), numpy.zeros(2))])
    d = (Disjunct([[1.0, 0.0]], [0.25]),)  # y0 <= 0.25: x <= 0.25, but falsify starts at the centre 0.5...
    spec = Spec((Case([0.0], [1.0], d),), 1, 2)
    monkeypatch.setattr(verifier_module, "falsify", lambda *a, **k: None)  # ...and is switched off here
    monkeypatch.setattr("robeval.verify.prove.prove_case", FakeProver(["unknown"], {0: numpy.array([0.125])}))
    result = verify(model, spec, timeout=5)
    assert result.status == "violated" and result.counterexample.x.tolist() == [0.125]
    assert result.cases[0].detail["stage"] == "branch and bound"


def test_the_real_prover_is_called_with_a_perf_counter_deadline(monkeypatch):
    import time

    from robeval.verify import prove

    seen = []
    real = prove.prove_case

    def spy(net, case, deadline, check=None, progress=None):
        seen.append(deadline - time.perf_counter())
        return real(net, case, deadline, check=check, progress=progress)

    monkeypatch.setattr(prove, "prove_case", spy)
    monkeypatch.setattr(prove, "crown_case", crown_proves_nothing)
    model, spec = two_cases()
    assert verify(model, spec, timeout=8).status == "holds"
    assert 0 < seen[0] <= 8 and 0 < seen[1] <= 8


def test_crown_decides_easy_cases_before_the_full_search(monkeypatch):
    """A short search, then CROWN on every case; the full search and the full prover only on what CROWN
    left open (here nothing), so an easy property does not wait for them."""
    from robeval.verify import prove

    searches = []
    real_falsify = verifier_module.falsify

    def spy_falsify(*args, **kwargs):
        searches.append((kwargs.get("restarts"), kwargs.get("steps")))
        return real_falsify(*args, **kwargs)

    monkeypatch.setattr(verifier_module, "falsify", spy_falsify)
    monkeypatch.setattr(prove, "prove_case", FakeProver([]))  # would fail with IndexError if called
    model, spec = two_cases()
    result = verify(model, spec, timeout=60)
    assert result.status == "holds" and result.time < 20
    assert searches == [(2, 25), (2, 25)]  # the quick pass only
    assert [c.detail["stage"] for c in result.cases] == ["crown", "crown"]


def test_the_full_search_runs_on_cases_crown_leaves_open(monkeypatch):
    from robeval.verify import prove

    searches = []
    monkeypatch.setattr(verifier_module, "falsify", lambda *a, **k: searches.append(k.get("restarts")))
    monkeypatch.setattr(prove, "crown_case", lambda net, case: ("unsat" if case.lo[0] >= 2 else "unknown",
                                                                 {"stage": "crown", "time": 0.0}))
    prover = FakeProver(["unsat"])
    monkeypatch.setattr(prove, "prove_case", prover)
    model, spec = two_cases()
    result = verify(model, spec, timeout=5)
    assert result.status == "holds"
    assert searches == [2, 2, None]  # quick on both cases, the full search (default restarts) on case 0
    assert len(prover.calls) == 1
    assert [c.detail["stage"] for c in sorted(result.cases, key=lambda c: c.index)] == ["fake", "crown"]


# ---------------------------------------------------------------------------- gzip ONNX
def test_gzip_onnx_everywhere(tmp_path):
    model = sum_net(3)
    gz = save(model, tmp_path / "m.onnx.gz", compress=True)
    adapter = robeval.load_model(gz)
    x = numpy.array([[0.25, 0.5, 1.0]], numpy.float32)
    assert adapter.predict(x).tolist() == [[1.75, 0.0]]
    out = CliRunner().invoke(main, ["info", str(gz)])
    assert out.exit_code == 0 and "dense" in out.output and "input shape: (3,)" in out.output
    bad = tmp_path / "bad.onnx.gz"
    bad.write_bytes(gzip.compress(b"not a model")[:12])
    with pytest.raises(ModelLoadError, match="cannot be decompressed"):
        robeval.load_model(bad)
    other = tmp_path / "weights.gz"
    other.write_bytes(gzip.compress(b"PK\x03\x04 zip inside"))
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        robeval.load_model(other)


# ---------------------------------------------------------------------------- CLI
@pytest.fixture
def files(tmp_path):
    model = save(relu_identity(), tmp_path / "net.onnx.gz", compress=True)
    ok = tmp_path / "holds.vnnlib"
    ok.write_text(vnnlib_text([0.85, 0.05], [0.95, 0.15], [([1.0, -1.0], 0.0)]))  # y0 - y1 <= 0: impossible
    bad = tmp_path / "violated.vnnlib.gz"
    bad.write_bytes(gzip.compress(vnnlib_text([0.4, 0.4], [0.6, 0.6], [([1.0, -1.0], 0.0)]).encode()))
    return model, ok, bad


def test_cli_verify_holds_and_violated(files, tmp_path):
    model, ok, bad = files
    out = CliRunner().invoke(main, ["verify", str(model), str(ok), "--timeout", "20"])
    assert out.exit_code == 0 and out.output.startswith("holds (unsat) in "), out.output
    cex_file, json_file = tmp_path / "cex.txt", tmp_path / "out.json"
    out = CliRunner().invoke(main, ["verify", str(model), str(bad), "--counterexample", str(cex_file),
                                    "--json", str(json_file), "--seed", "3"])
    assert out.exit_code == 1 and out.output.startswith("violated (sat) in "), out.output
    lines = cex_file.read_text().splitlines()
    assert lines[0] == "sat" and lines[1] == "(" and lines[-1] == ")" and len(lines) == 2 + 2 + 2 + 1
    x = [float(line.split()[1].rstrip(")")) for line in lines[2:4]]
    y = [float(line.split()[1].rstrip(")")) for line in lines[4:6]]
    assert all(0.4 <= v <= 0.6 for v in x) and y[1] >= y[0]
    payload = json.loads(json_file.read_text())
    assert payload["status"] == "violated" and payload["vnncomp"] == "sat" and payload["counterexample"]["x"] == x
    out = CliRunner().invoke(main, ["verify", str(model), str(ok), "--counterexample", str(cex_file)])
    assert cex_file.read_text() == "unsat\n"


def test_cli_errors_are_one_line_exit_3(files, tmp_path):
    model, ok, _ = files
    broken = tmp_path / "broken.vnnlib"
    broken.write_text("(declare-const X_0 Real)\n(assert (<= X_0 1)")
    out = CliRunner().invoke(main, ["verify", str(model), str(broken)])
    assert out.exit_code == 3 and "broken.vnnlib:2:1: unbalanced '('" in out.output
    wrong = tmp_path / "wrong.vnnlib"
    wrong.write_text(vnnlib_text([0, 0, 0], [1, 1, 1], [([1.0, 0.0], 0.0)]))
    out = CliRunner().invoke(main, ["verify", str(model), str(wrong)])
    assert out.exit_code == 3 and "3 inputs and 2 outputs" in out.output and "has 2 inputs" in out.output
    out = CliRunner().invoke(main, ["verify", str(tmp_path / "none.onnx"), str(ok)])
    assert out.exit_code == 3 and "no such model file" in out.output
    out = CliRunner().invoke(main, ["verify", str(model), str(ok), "--timeout", "-1"])
    assert out.exit_code == 2


def test_verify_in_a_real_subprocess(files):
    model, _, bad = files
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", "from robeval.cli import main; main()", "verify", str(model),
                           str(bad), "--timeout", "20"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("violated (sat) in ") and "replayed on the model" in proc.stdout


def make_benchmark(root: Path, files) -> Path:
    model, ok, bad = files
    bench = root / "tiny_bench"
    (bench / "onnx").mkdir(parents=True)
    (bench / "vnnlib").mkdir()
    (bench / "onnx" / "net.onnx.gz").write_bytes(model.read_bytes())
    (bench / "vnnlib" / "holds.vnnlib").write_text(ok.read_text())
    (bench / "vnnlib" / "violated.vnnlib.gz").write_bytes(bad.read_bytes())
    (bench / "instances.csv").write_text("onnx/net.onnx,vnnlib/holds.vnnlib,30\n"
                                         "onnx/net.onnx,vnnlib/violated.vnnlib,30\n"
                                         "onnx/net.onnx,vnnlib/holds.vnnlib,5\n")
    return bench


def test_vnncomp_run_writes_the_competition_csv(files, tmp_path):
    bench = make_benchmark(tmp_path, files)
    out = tmp_path / "res" / "results.csv"
    res = CliRunner().invoke(main, ["vnncomp", "run", "--benchmark", str(bench), "--timeout", "20", "--out", str(out),
                                    "--limit", "2"])
    assert res.exit_code == 0, res.output
    rows = list(csv.reader(out.open()))
    where = "./benchmarks/tiny_bench/"
    assert [r[:3] + [r[4]] for r in rows] == [
        ["tiny_bench", where + "onnx/net.onnx", where + "vnnlib/holds.vnnlib", "unsat"],
        ["tiny_bench", where + "onnx/net.onnx", where + "vnnlib/violated.vnnlib", "sat"]]
    assert all(len(r) == 6 and float(r[3]) >= 0 and 0 <= float(r[5]) < 20 for r in rows)
    assert "[1/2] onnx/net.onnx vnnlib/holds.vnnlib: unsat" in res.output and "unsat 1, sat 1" in res.output
    cex = tmp_path / "res" / "results_counterexamples" / "net__violated.counterexample"
    assert cex.read_text().startswith("sat\n(\n(X_0 ")


def test_vnncomp_run_records_errors_and_exits_3(files, tmp_path):
    bench = make_benchmark(tmp_path, files)
    (bench / "vnnlib" / "wrong.vnnlib").write_text(vnnlib_text([0, 0, 0], [1, 1, 1], [([1.0, 0.0], 0.0)]))
    (bench / "other.csv").write_text("onnx/net.onnx,vnnlib/wrong.vnnlib,10\n")
    out = tmp_path / "r.csv"
    res = CliRunner().invoke(main, ["vnncomp", "run", "--benchmark", str(bench), "--out", str(out),
                                    "--instances", "other.csv"])
    assert res.exit_code == 3 and "error: " in res.output
    assert next(csv.reader(out.open()))[4] == "error"
    (bench / "bad.csv").write_text("onnx/net.onnx,vnnlib/missing.vnnlib,10\n")
    res = CliRunner().invoke(main, ["vnncomp", "run", "--benchmark", str(bench), "--out", str(out),
                                    "--instances", "bad.csv"])
    assert res.exit_code == 3 and "'vnnlib/missing.vnnlib' does not exist" in res.output


def test_bench_comparison_flags_contradictions():
    import vnncomp as bench_script

    from robeval.verify.vnncomp import ResultRow

    def row(prop, result, where="./benchmarks/b/"):
        return ResultRow("b", where + "onnx/n.onnx", where + f"vnnlib/{prop}.vnnlib", 0.0, result, 1.0)

    ours = [row("p0", "unsat"), row("p1", "sat"), row("p2", "unknown"), row("p3", "unsat")]
    ref = [row("p0", "unsat", "./x/"), row("p1", "unsat"), row("p2", "sat"), row("p3", "sat")]
    lines, bad = bench_script.compare(ours, ref)
    assert bad == ["n.onnx p1.vnnlib: robeval says sat, the reference unsat",
                   "n.onnx p3.vnnlib: robeval says unsat, the reference sat"]
    assert sum("CONTRADICTION" in line for line in lines) == 2
    assert any(line.split() == ["solved", "3", "4"] for line in lines)


def test_shared_mnist_fc_through_the_cli(tmp_path):
    bench = SHARED / "vnncomp" / "mnist_fc"
    if not (bench / "instances.csv").exists():
        pytest.skip(f"VNN-COMP mnist_fc not found at {bench} (set ROBEVAL_SHARED to the shared folder)")
    out = tmp_path / "results.csv"
    res = CliRunner().invoke(main, ["vnncomp", "run", "--benchmark", str(bench), "--timeout", "20", "--out", str(out),
                                    "--limit", "2"])
    assert res.exit_code == 0, res.output
    ref = {(r[1], r[2]): r[4] for r in csv.reader((bench / "alpha_beta_crown_2022.csv").open())}
    for r in csv.reader(out.open()):
        # the first two instances: prop_0_0.03 (unsat) and prop_1_0.03 (sat) for mnist-net_256x2
        assert r[4] == ref[(r[1], r[2])], r


def test_importing_the_verifier_imports_no_framework():
    code = ("import sys, robeval, robeval.verify, robeval.verify.verifier, robeval.verify.vnncomp, robeval.cli; "
            "robeval.verify.read_vnnlib('(declare-const X_0 Real)(declare-const Y_0 Real)"
            "(assert (>= X_0 0))(assert (<= X_0 1))(assert (<= Y_0 0))'); "
            "print(','.join(m for m in ('torch', 'tensorflow', 'keras', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert out.stdout.strip() == "", f"importing robeval.verify pulled in {out.stdout.strip()}"
