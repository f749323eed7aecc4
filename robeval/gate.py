"""``robeval gate``: robustness thresholds for CI, read from a TOML file, with exit codes that cannot lie.

    [[models]]
    path = "model.onnx"
    data = "mnist"
    limit = 500
    checks = ["clean_accuracy >= 0.98", "certified_accuracy(method='ibp', eps=0.1) >= 0.90"]

A check is ``metric(name=value, ...) OP threshold``, parsed by walking Python's syntax tree of the
expression and accepting only a metric name, keyword arguments with literal values and one
comparison — nothing is ever evaluated. Only the metrics the checks name are computed. A baseline
report (report.json from ``robeval audit``) turns each check into a regression test as well.

Exit codes (``GateResult.exit_code``, computed from the results only): 0 every check passes,
1 a check fails, 2 usage error (bad config, bad expression), 3 any evaluation error.

Layout: this module holds the results and the evaluation; the check parser and METRICS are in
``gate_checks``, the config and baseline reading in ``gate_config``, the table and JUnit rendering
in ``gate_output``. Their public names are re-exported here.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass
from typing import Any

from .errors import RobevalError
from .gate_checks import COMPARE as COMPARE
from .gate_checks import METRICS, Check, GateUsageError, parse_check
from .gate_checks import OPERATORS as OPERATORS
from .gate_checks import REQUIRED as REQUIRED
from .gate_checks import MetricSpec as MetricSpec
from .gate_checks import check_args as check_args
from .gate_config import MODEL_KEYS as MODEL_KEYS
from .gate_config import TOP_KEYS as TOP_KEYS
from .gate_config import GateConfig, ModelConfig, load_baseline, load_config
from .gate_output import junit_xml, result_table
from .report.report import find_metric, format_number

EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3


@dataclass(frozen=True)
class CheckResult:
    """One check of one model: the measured value, the verdict and why."""

    model: str
    check: Check
    status: str  # "pass", "fail" or "error"
    value: float | None = None
    baseline: float | None = None
    message: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class GateResult:
    """Every check's result; ``exit_code`` is derived from them, so no error can turn into a pass."""

    results: tuple[CheckResult, ...]
    tolerance: float = 0.0
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        statuses = [r.status for r in self.results]
        if not statuses or any(s not in ("pass", "fail") for s in statuses):
            return EXIT_ERROR
        return EXIT_FAIL if "fail" in statuses else EXIT_PASS

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.results) for s in ("pass", "fail", "error")}

    def table(self) -> list[str]:
        """A short fixed-width table, then one line per failure or error (see gate_output)."""
        return result_table(self)

    def to_junit(self) -> str:
        """JUnit XML: one testsuite per model, one testcase per check (see gate_output)."""
        return junit_xml(self)


# ---------------------------------------------------------------------------- evaluation
def compute_metrics(ev: Any, checks: Any, profile: Any) -> tuple[dict[Check, float], dict[Check, float]]:
    """The value of every check's metric, each kind computed once over the union of its radii
    or levels; returns (values, seconds per check)."""
    values: dict[Check, float] = {}
    seconds: dict[Check, float] = {}
    groups: dict[tuple, list[Check]] = {}
    for c in checks:
        groups.setdefault(_group(c), []).append(c)
    attacks, certs = [], []
    default_steps = dict(profile.attacks)
    for group, members in groups.items():
        t0 = time.perf_counter()
        if group[0] == "attack":
            _, name, norm, steps, restarts = group
            eps = sorted({c.kwargs["eps"] for c in members})
            steps = steps if steps is not None else default_steps.get(name, 10)
            rep = ev.attack(name, eps, steps, restarts or profile.restarts, norm=norm)
            attacks.append(rep)
            got = {e: r.robust_accuracy for e, r in zip(eps, rep.results)}
            values.update({c: got[c.kwargs["eps"]] for c in members})
        elif group[0] == "cert":
            eps = sorted({c.kwargs["eps"] for c in members})
            res = ev.certify(group[1], eps, norm=group[2])
            certs.append(res)
            values.update({c: res.certified_accuracy[eps.index(c.kwargs["eps"])] for c in members})
        elif group[0] == "noise":
            levels = sorted({c.kwargs["level"] for c in members})
            res = ev.noise(group[1], levels, group[2] or profile.draws)
            values.update({c: res.accuracy[levels.index(c.kwargs["level"])] for c in members})
        elif group[0] == "smooth":
            _, sigma, alpha, n, n0 = group
            radii = sorted({c.kwargs["radius"] for c in members})
            res = ev.smooth(sigma, radii, alpha=alpha, n=n, n0=n0)
            values.update({c: res.certified_accuracy[radii.index(c.kwargs["radius"])] for c in members})
        elif group[0] == "clean_accuracy":
            values.update({c: ev.clean_accuracy for c in members})
        else:
            values.update({c: ev.lipschitz_bound() for c in members})
        spent = (time.perf_counter() - t0) / len(members)
        seconds.update({c: spent for c in members})
    _consistency(attacks, certs)
    return values, seconds


def _group(c: Check) -> tuple:
    """Checks that one computation answers share a group: same attack and budget, same certifier."""
    a = c.kwargs
    if c.metric == "attack_accuracy":
        return ("attack", a["attack"], a["norm"], a.get("steps"), a.get("restarts"))
    if c.metric == "certified_accuracy":
        return ("cert", a["method"], a["norm"])
    if c.metric == "noise_accuracy":
        return ("noise", a["kind"], a.get("draws"))
    if c.metric == "smoothed_certified_accuracy":
        return ("smooth", a["sigma"], a["alpha"], a.get("n"), a.get("n0"))
    return (c.metric,)


def _consistency(attacks: list, certs: list) -> None:
    """An attack breaking a certified sample proves a bug: raise ConsistencyError (exit 3)."""
    from .certifiers.consistency import check_certified

    for cert in certs:
        for rep in attacks:
            check_certified(rep.results, cert)


def judge(model: str, check: Check, value: float, baseline: dict | None, tolerance: float,
          seconds: float = 0.0) -> CheckResult:
    """pass / fail against the threshold and, with a baseline, against the baseline's value."""
    if value is None or not math.isfinite(value):
        return CheckResult(model, check, "error", value, message=f"the metric came out as {value!r}", seconds=seconds)
    threshold = format_number(check.threshold)
    problems = []
    if not COMPARE[check.op](value, check.threshold):
        problems.append(f"measured {value:.4f}, threshold {check.op} {threshold}")
    base = None
    if baseline is not None:
        found = find_metric(baseline.get("metrics", []), check.metric, check.identity)
        base = found.get("value") if found else None
        if isinstance(base, (int, float)):
            higher = METRICS[check.metric].higher_is_better
            regressed = value < base - tolerance if higher else value > base * (1 + tolerance)
            if regressed:
                kind = "absolute" if higher else "relative"
                problems.append(f"regressed from baseline {base:.4f} to {value:.4f} (tolerance {tolerance:g}, {kind})")
        else:
            base = None
    message = "; ".join(problems) if problems else f"measured {value:.4f} {check.op} {threshold}"
    return CheckResult(model, check, "fail" if problems else "pass", float(value), base, message, seconds)


def evaluate_model(mc: ModelConfig, config: GateConfig, progress: bool = False) -> list[CheckResult]:
    """Every check of one model; an evaluation error becomes an "error" result for each check."""
    from .auditor import Evaluator, get_profile

    profile = get_profile(config.profile)
    baseline = load_baseline(mc.baseline) if mc.baseline else None  # usage errors surface before evaluating
    try:
        ev = Evaluator.load(str(mc.path), mc.data, limit=mc.limit if mc.limit else profile.limit, split=mc.split,
                            data_path=str(mc.data_path) if mc.data_path else None, seed=config.seed,
                            device=config.device, batch_size=config.batch_size, progress=progress)
        values, seconds = compute_metrics(ev, mc.checks, profile)
    except RobevalError as exc:
        return [CheckResult(mc.name, c, "error", message=f"{type(exc).__name__}: {exc}") for c in mc.checks]
    except Exception as exc:  # a bug: show it, and make sure it can only fail the gate
        traceback.print_exc()
        return [CheckResult(mc.name, c, "error", message=f"internal error {type(exc).__name__}: {exc}")
                for c in mc.checks]
    return [judge(mc.name, c, values[c], baseline, config.tolerance, seconds[c]) for c in mc.checks]


def run_gate(config: GateConfig, progress: bool = False, executor: Any = None) -> GateResult:
    """Evaluate every model's checks. Usage problems (a bad baseline file) raise GateUsageError
    before any model is evaluated; evaluation errors are results, never exceptions.

    ``executor`` ('process', 'ray' or an Executor) evaluates the models in parallel, one model per
    shard; a model whose shard is lost (its worker died on every attempt) gets an "error" result
    for each of its checks, so the gate fails closed."""
    for mc in config.models:
        if mc.baseline:
            load_baseline(mc.baseline)
    start = time.perf_counter()
    results: list[CheckResult] = []
    if executor is None:
        for mc in config.models:
            results += evaluate_model(mc, config, progress)
    else:
        results = _run_parallel(config, executor, progress)
    return GateResult(tuple(results), config.tolerance, time.perf_counter() - start)


def _run_parallel(config: GateConfig, executor: Any, progress: bool) -> list[CheckResult]:
    """One shard per model on ``executor``; lost shards become error results."""
    from dataclasses import replace

    from .executors import Shard, get_executor, jobs, run_shards

    ex = get_executor(executor)
    models = [_absolute(mc) for mc in config.models]  # workers may run in another folder
    shards = [Shard(i, i, i + 1) for i in range(len(models))]
    failures: dict[int, str] = {}
    parts = run_shards(ex, jobs.gate_shard, (replace(config, models=tuple(models)),), shards,
                       lambda s: models[s.index], desc="gate models", progress=progress, failures=failures)
    results: list[CheckResult] = []
    for shard, mc, part in zip(shards, models, parts):
        if shard.index in failures:
            why = f"the evaluation was lost ({failures[shard.index]}) on every attempt of {shard.name.split(' (')[0]}"
            results += [CheckResult(mc.name, c, "error", message=why) for c in mc.checks]
        else:
            results += part
    return results


def _absolute(mc: ModelConfig) -> ModelConfig:
    from dataclasses import replace
    from pathlib import Path

    data = mc.data
    if data and Path(data).suffix == ".npz" and Path(data).exists():
        data = str(Path(data).resolve())
    return replace(mc, path=Path(mc.path).resolve(), data=data,
                   data_path=Path(mc.data_path).resolve() if mc.data_path else None,
                   baseline=Path(mc.baseline).resolve() if mc.baseline else None)


__all__ = ["parse_check", "load_config", "run_gate", "Check", "CheckResult", "GateResult", "GateConfig",
           "ModelConfig", "METRICS", "GateUsageError", "EXIT_PASS", "EXIT_FAIL", "EXIT_USAGE", "EXIT_ERROR"]
