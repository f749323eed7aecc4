"""Sharded runs on the local, process and Ray executors: equal results to the local run, worker
deaths retried, failing shards named (exit 3), resume of only the missing shards, gate fails closed.
Ray runs as a real local cluster (2 CPUs, loopback, no dashboard); those tests skip without Ray."""

from __future__ import annotations

import functools
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import faults
import numpy
import pytest
from click.testing import CliRunner

from robeval.api import certify
from robeval.certifiers.attacks import attack
from robeval.certifiers.noise import sweep
from robeval.cli import main
from robeval.executors import (
    ResumeMismatchError,
    ShardFailedError,
    get_executor,
    jobs,
    make_sharding,
)

from nets import random_mlp

REPO = Path(__file__).resolve().parents[1]
EPS = [0.01, 0.05]


@pytest.fixture(scope="module")
def problem():
    rng = numpy.random.default_rng(0)
    net = random_mlp(rng, sizes=(12, 16, 16, 5))
    x = rng.uniform(0, 1, size=(60, 1, 12))
    y = numpy.asarray(net.forward(x).argmax(axis=1))
    y[::7] = (y[::7] + 1) % 5  # some wrong labels: falsified verdicts too
    return net, x, y


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read at import: bind loopback only
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'robeval[ray]')")
    paths = os.pathsep.join([str(REPO), str(REPO / "tests")])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": paths}})
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    yield ray
    ray.shutdown()


@pytest.fixture(params=["process", "ray"])
def executor(request):
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    return get_executor(request.param, workers=2)


def run_certify(problem, method, **kw):
    net, x, y = problem
    return certify(net, (x, y), method=method, eps=EPS, check=False, **kw)


def assert_same_certification(a, b):
    numpy.testing.assert_array_equal(a.predictions, b.predictions)
    numpy.testing.assert_array_equal(a.verdicts, b.verdicts)
    numpy.testing.assert_array_equal(a.bound, b.bound)  # bit for bit, infinities included
    numpy.testing.assert_array_equal(a.labels, b.labels)


def test_local_ibp_shards_equal_one_pass_on_one_thread(problem):
    # IBP's rows never mix, so shards agree with an unsharded run at the same BLAS thread count (shards
    # run on one); CROWN picks its internal batches from the shard size, so its floats can differ from a
    # one-pass run in the last bits: what is equal by construction is the same shards on any executor
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        one = run_certify(problem, "ibp")
    sharded = run_certify(problem, "ibp", executor="local", shard_size=16)
    assert sharded.extra == {"executor": "local", "shards": 4, "shard_size": 16}
    assert {"verified", "unknown", "falsified"} <= set(numpy.unique(one.verdicts))
    assert_same_certification(one, sharded)


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_certify_equal_to_local(problem, executor, method):
    local = run_certify(problem, method, executor="local", shard_size=16)
    remote = run_certify(problem, method, executor=executor, shard_size=16)
    assert remote.extra["executor"] == executor.name and remote.extra["shards"] == 4
    assert_same_certification(local, remote)


def test_pgd_equal_to_local(problem, executor):
    net, x, y = problem
    kw = {"attack": "pgd", "eps": [0.05, 0.3], "steps": 5, "seed": 3, "checks": False}
    one = attack(net, (x, y), batch_size=16, **kw)
    local = attack(net, (x, y), executor="local", shard_size=16, **kw)
    remote = attack(net, (x, y), executor=executor, shard_size=16, **kw)
    assert 0 < remote.results[1].success.sum() < len(y)
    for a, b, c in zip(one.results, local.results, remote.results):
        for key in ("clean_predictions", "adv_predictions", "success", "x_adv", "perturbation_norms"):
            numpy.testing.assert_array_equal(getattr(a, key), getattr(c, key))
            numpy.testing.assert_array_equal(getattr(b, key), getattr(c, key))
        assert b.params["gradient_calls"] == c.params["gradient_calls"]


def test_noise_equal_to_local(problem, executor):
    net, x, y = problem
    kw = {"kind": "gaussian", "levels": [0.0, 0.2, 0.5], "draws": 3, "seed": 1}
    local = sweep(net, (x, y), sharding=make_sharding("local", shard_size=16), **kw)
    remote = sweep(net, (x, y), sharding=make_sharding(executor, shard_size=16), **kw)
    numpy.testing.assert_array_equal(local.per_image, remote.per_image)
    assert local.accuracy == remote.accuracy and local.ci_low == remote.ci_low
    assert local.accuracy[2] < local.accuracy[0]  # the noise did something


def test_killed_worker_is_retried(problem, executor, tmp_path, monkeypatch):
    marker = tmp_path / "died"
    monkeypatch.setattr(jobs, "certify_shard", functools.partial(faults.exit_once, str(marker)))
    remote = run_certify(problem, "ibp", executor=executor, shard_size=16, shards=tmp_path / "run")
    assert marker.exists()  # a worker really died
    assert_same_certification(run_certify(problem, "ibp", executor="local", shard_size=16), remote)
    assert sorted(p.name for p in (tmp_path / "run").glob("*.npz")) == [f"certify-ibp.{i:05d}.npz" for i in range(4)]


def test_failing_shard_is_named_then_resumed(problem, executor, tmp_path, monkeypatch):
    folder, log, log2 = tmp_path / "run", str(tmp_path / "log"), str(tmp_path / "log2")
    monkeypatch.setattr(jobs, "certify_shard", functools.partial(faults.fail_shard, 2, log))
    with pytest.raises(ShardFailedError, match=r"shard 2 \(samples 32-47\) failed 3 time\(s\) \(RuntimeError: "
                                               r"injected failure in shard 2\)"):
        run_certify(problem, "crown", executor=executor, shard_size=16, shards=folder)
    assert faults.ran(log) == [0, 1, 2, 2, 2, 3]  # shard 2: first try and 2 retries
    assert sorted(p.name for p in folder.glob("*.npz")) == [f"certify-crown.{i:05d}.npz" for i in (0, 1, 3)]
    monkeypatch.setattr(jobs, "certify_shard", functools.partial(faults.logged, log2))
    resumed = run_certify(problem, "crown", executor=executor, shard_size=16, shards=folder, resume=True)
    assert faults.ran(log2) == [2]  # only the missing shard ran again
    assert_same_certification(run_certify(problem, "crown", executor="local", shard_size=16), resumed)


def test_resume_of_another_job_is_refused(problem, tmp_path):
    net, x, y = problem
    folder = tmp_path / "run"
    run_certify(problem, "ibp", executor="local", shard_size=16, shards=folder)
    with pytest.raises(ResumeMismatchError, match="already holds shards"):
        run_certify(problem, "ibp", executor="local", shard_size=16, shards=folder)
    with pytest.raises(ResumeMismatchError, match="different run .*method: 'ibp' here, 'crown' now"):
        run_certify(problem, "crown", executor="local", shard_size=16, shards=folder, resume=True)
    with pytest.raises(ResumeMismatchError, match="data_hash"):
        certify(net, (x[::-1].copy(), y[::-1].copy()), method="ibp", eps=EPS, check=False, executor="local",
                shard_size=16, shards=folder, resume=True)
    with pytest.raises(ResumeMismatchError, match="no manifest.json"):
        run_certify(problem, "ibp", executor="local", shard_size=16, shards=tmp_path / "empty", resume=True)


CLI = ["certify", "--method", "ibp", "--eps", "0.01,0.05", "--shard-size", "100"]


def test_cli_failing_shard_exits_3_then_resumes(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    local = tmp_path / "local.json"
    assert CliRunner().invoke(main, [*CLI, "--json", str(local)]).exit_code == 0
    monkeypatch.setattr(jobs, "certify_shard", functools.partial(faults.fail_shard, 1, str(tmp_path / "log")))
    res = CliRunner().invoke(main, [*CLI, "--executor", "process", "--workers", "2", "--shards", str(folder)])
    assert res.exit_code == 3, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "shard 1 (samples 100-199) failed 3 time(s)" in errors[0]
    assert f"--resume {folder}" in errors[0] and "Traceback" not in res.output
    assert "certified" not in res.output  # no partial table
    monkeypatch.setattr(jobs, "certify_shard", faults.REAL_CERTIFY)
    out = tmp_path / "resumed.json"
    res = CliRunner().invoke(main, [*CLI, "--executor", "process", "--resume", str(folder), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "sharded: 5 shard(s) of 100 samples on the process executor" in res.output
    assert json.loads(out.read_text())["samples"] == json.loads(local.read_text())["samples"]


def test_cli_without_ray_says_how_to_install():
    code = ("import sys; sys.modules['ray'] = None; from robeval.cli import main; "
            "main(['certify', '--executor', 'ray', '--eps', '0.01'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 3
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: --executor ray needs Ray, which is not installed; pip install 'robeval[ray]' "
                      "(or pip install ray)"]
    assert "Traceback" not in proc.stderr


def write_gate(tmp_path) -> Path:
    model = REPO / "robeval" / "models" / "digits_mlp.onnx"
    text = "".join(f'[[models]]\nname = "{name}"\npath = "{model}"\ndata = "digits"\nlimit = 100\n'
                   f'checks = ["clean_accuracy >= 0.5", "certified_accuracy(method=\'ibp\', eps=0.01) >= 0.5"]\n\n'
                   for name in ("a", "b"))
    path = tmp_path / "robeval.toml"
    path.write_text(text)
    return path


def test_gate_in_parallel_equals_sequential_and_fails_closed(executor, tmp_path, monkeypatch):
    from robeval.gate import load_config, run_gate

    config = load_config(write_gate(tmp_path))
    one = run_gate(config)
    par = run_gate(config, executor=executor)
    assert one.exit_code == par.exit_code == 0
    assert [(r.model, r.status, r.value) for r in one.results] == [(r.model, r.status, r.value) for r in par.results]
    monkeypatch.setattr(jobs, "gate_shard", functools.partial(faults.exit_for_model, "b"))
    lost = run_gate(config, executor=executor)
    assert [(r.model, r.status) for r in lost.results] == [("a", "pass"), ("a", "pass"), ("b", "error"),
                                                            ("b", "error")]
    assert "lost" in lost.results[2].message and "shard 1" in lost.results[2].message
    assert lost.exit_code == 3


def test_cli_gate_executor(tmp_path):
    res = CliRunner().invoke(main, ["gate", "--config", str(write_gate(tmp_path)), "--executor", "process",
                                    "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert "gate: 4 passed, 0 failed, 0 error(s) -> exit 0" in res.output


def test_bad_executor_options_are_one_line_errors(problem):
    from robeval.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="not known"):
        run_certify(problem, "ibp", executor="spark")
    with pytest.raises(InvalidParameterError, match="with the local executor; it runs one shard"):
        run_certify(problem, "ibp", executor="local", workers=4)
    with pytest.raises(InvalidParameterError, match="shard_size=0"):
        run_certify(problem, "ibp", executor="local", shard_size=0)
    res = CliRunner().invoke(main, [*CLI, "--executor", "local", "--ray-address", "ray://h:10001"])
    assert res.exit_code == 2 and "--ray-address needs --executor ray" in res.output


def test_cli_ray_starts_its_own_loopback_cluster(tmp_path):
    """No cluster running in that process: --executor ray starts one for the run (loopback only)."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'robeval[ray]')")
    local, remote = tmp_path / "local.json", tmp_path / "ray.json"
    code = "import sys; from robeval.cli import main; main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, *CLI, "--method", "crown", "--executor", "ray", "--workers",
                           "2", "--json", str(remote)], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    assert "sharded: 5 shard(s) of 100 samples on the ray executor" in proc.stdout
    crown = json.loads(remote.read_text())["samples"]
    proc = subprocess.run([sys.executable, "-c", code, *CLI, "--method", "crown", "--executor", "local", "--json",
                           str(local)], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(local.read_text())["samples"] == crown


def test_gpus_per_worker_without_gpus_is_refused(problem, ray_cluster):
    from robeval.executors import ExecutorUnavailableError

    with pytest.raises(ExecutorUnavailableError, match="--gpus-per-worker 1 but the Ray cluster has 0 GPU"):
        run_certify(problem, "ibp", executor="ray", gpus_per_worker=1.0, shard_size=16)


def test_audit_on_ray_equals_local_and_resumes_from_its_shards(ray_cluster, tmp_path, monkeypatch):
    from dataclasses import replace

    from robeval.auditor import PROFILES, audit

    prof = replace(PROFILES["quick"], attacks=(("fgsm", None), ("pgd", 5)), noise_levels=(0.0, 0.2), draws=2,
                   certifiers=("ibp", "crown"), examples=0)
    model = REPO / "robeval" / "models" / "digits_mlp.onnx"
    kw = {"profile": prof, "limit": 70, "eps": [0.02, 0.1], "seed": 5, "shard_size": 32}
    local = audit(model, "digits", executor="local", **kw)
    folder = tmp_path / "run"
    remote = audit(model, "digits", executor="ray", workers=2, shards=folder, **kw)
    a, b = json.loads(local.to_json()), json.loads(remote.to_json())
    assert a["metrics"] == b["metrics"] and a["verdicts"] == b["verdicts"]
    assert len(list(folder.glob("*.npz"))) == 3 * (2 + 2 * 2 + 2)  # 3 shards: 2 certifiers, 2 attacks x 2 eps, 2 noise
    log = str(tmp_path / "log")
    monkeypatch.setattr(jobs, "certify_shard", functools.partial(faults.logged, log))
    again = audit(model, "digits", executor="ray", workers=2, shards=folder, resume=True, **kw)
    assert faults.ran(log) == []  # every shard came from the folder
    assert json.loads(again.to_json())["metrics"] == a["metrics"]


# ----------------------------------------------------------------------------- vnncomp run
def test_vnncomp_run_on_several_workers_matches_the_local_run(executor, tmp_path):
    """Instances run at once on real workers: the same verdicts as one at a time here, the CSV in the
    instances' order, and the counterexample written by the driver."""
    from test_verify import make_benchmark, relu_identity

    from robeval.verify.vnncomp import read_results, run_benchmark

    from verify_models import save, vnnlib_text

    model = save(relu_identity(), tmp_path / "net.onnx.gz", compress=True)
    ok = tmp_path / "holds.vnnlib"
    ok.write_text(vnnlib_text([0.85, 0.05], [0.95, 0.15], [([1.0, -1.0], 0.0)]))
    bad = tmp_path / "violated.vnnlib.gz"
    bad.write_bytes(gzip.compress(vnnlib_text([0.4, 0.4], [0.6, 0.6], [([1.0, -1.0], 0.0)]).encode()))
    bench = make_benchmark(tmp_path, (model, ok, bad))
    local = [r.result for r in run_benchmark(bench, timeout=20)]
    assert local == ["unsat", "sat", "unsat"]
    seen = []
    rows = list(run_benchmark(bench, timeout=20, executor=executor, counterexamples=tmp_path / "cex",
                              report=lambda i, n, inst, row, note: seen.append(i)))
    assert sorted(seen) == [1, 2, 3]
    by_instance = dict(zip(seen, [r.result for r in rows]))
    assert [by_instance[i] for i in (1, 2, 3)] == local
    assert (tmp_path / "cex" / "net__violated.counterexample").read_text().startswith("sat\n(\n(X_0 ")
    out = tmp_path / "results.csv"
    res = CliRunner().invoke(main, ["vnncomp", "run", "--benchmark", str(bench), "--timeout", "20", "--out", str(out),
                                    "--executor", executor.name, "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert [r.result for r in read_results(out)] == local  # the CSV keeps the instances' order
