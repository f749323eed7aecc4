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
"""

from __future__ import annotations

import ast
import json
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from .errors import InvalidParameterError, RobevalError
from .report.report import find_metric, format_number, metric_key

EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3
REQUIRED = object()
OPERATORS = {ast.GtE: ">=", ast.Gt: ">", ast.LtE: "<=", ast.Lt: "<"}
COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}


class GateUsageError(InvalidParameterError):
    """The gate's configuration or a check expression is wrong (exit code 2)."""


@dataclass(frozen=True)
class MetricSpec:
    """A metric's keyword arguments (name -> (type, default)), which of them identify the number
    (the rest only set the budget), and its direction."""

    args: dict[str, tuple[type, Any]]
    identity: tuple[str, ...]
    higher_is_better: bool
    doc: str


METRICS: dict[str, MetricSpec] = {
    "clean_accuracy": MetricSpec({}, (), True, "accuracy on the unperturbed inputs"),
    "attack_accuracy": MetricSpec(
        {"attack": (str, "pgd"), "eps": (float, REQUIRED), "norm": (str, "linf"), "steps": (int, None),
         "restarts": (int, None)}, ("attack", "eps", "norm"), True,
        "robust accuracy under an attack (fgsm, pgd, apgd): an upper bound"),
    "certified_accuracy": MetricSpec(
        {"method": (str, "ibp"), "eps": (float, REQUIRED), "norm": (str, "linf")}, ("method", "eps", "norm"), True,
        "certified accuracy (ibp, crown, lipschitz, ...): a lower bound"),
    "noise_accuracy": MetricSpec(
        {"kind": (str, "uniform"), "level": (float, REQUIRED), "draws": (int, None)}, ("kind", "level"), True,
        "accuracy under random noise (uniform, gaussian, pixels)"),
    "lipschitz_bound": MetricSpec({}, (), False, "global L2 Lipschitz bound of the logits (lower is better)"),
}


# ---------------------------------------------------------------------------- check expressions
@dataclass(frozen=True)
class Check:
    """A parsed check: ``metric(args) op threshold``; ``args`` holds every argument, defaults included."""

    text: str
    metric: str
    args: tuple[tuple[str, Any], ...]
    op: str
    threshold: float

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.args)

    @property
    def identity(self) -> dict[str, Any]:
        """The arguments that name the number (for baseline look-ups): no budget settings."""
        spec = METRICS[self.metric]
        return {k: v for k, v in self.args if k in spec.identity}

    @property
    def key(self) -> str:
        return metric_key(self.metric, self.identity)


def _literal(node: ast.AST, text: str) -> Any:
    """A string or number literal (also -x and a/b such as 8/255); anything else is refused."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float)) and not isinstance(node.value,
                                                                                                      bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand, text)
        if isinstance(v, (int, float)):
            return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        a, b = _literal(node.left, text), _literal(node.right, text)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b != 0:
            return a / b
    raise GateUsageError(f"check {text!r}: {ast.unparse(node)!r} is not a literal; values are strings in quotes "
                         "('pgd') or numbers (0.1, 8/255)")


def parse_check(text: str) -> Check:
    """Parse ``metric(name=value, ...) OP threshold`` (OP one of >=, >, <=, <) without evaluating it.

    >>> parse_check("certified_accuracy(method='ibp', eps=0.1) >= 0.9").key
    "certified_accuracy(eps=0.1, method='ibp', norm='linf')"
    """
    if not isinstance(text, str) or not text.strip():
        raise GateUsageError(f"check {text!r} is not a non-empty string such as \"clean_accuracy >= 0.98\"")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise GateUsageError(f"check {text!r} does not parse ({exc.msg} at column {exc.offset}); expected "
                             "metric(name=value, ...) >= threshold, e.g. \"attack_accuracy(attack='pgd', eps=0.3) "
                             ">= 0.85\"") from None
    if not isinstance(tree, ast.Compare) or len(tree.ops) != 1 or type(tree.ops[0]) not in OPERATORS:
        raise GateUsageError(f"check {text!r} must be one comparison with >=, >, <= or <, e.g. "
                             "\"clean_accuracy >= 0.98\"")
    op = OPERATORS[type(tree.ops[0])]
    threshold = _literal(tree.comparators[0], text)
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise GateUsageError(f"check {text!r}: the threshold must be a finite number, not {threshold!r}")
    left = tree.left
    if isinstance(left, ast.Name):
        name, given = left.id, {}
    elif isinstance(left, ast.Call) and isinstance(left.func, ast.Name):
        name = left.func.id
        if left.args:
            raise GateUsageError(f"check {text!r}: arguments must be named, e.g. {name}(eps=0.1)")
        if any(k.arg is None for k in left.keywords):
            raise GateUsageError(f"check {text!r}: ** is not allowed; name each argument")
        given = {k.arg: _literal(k.value, text) for k in left.keywords}
    else:
        raise GateUsageError(f"check {text!r}: the left side must be a metric name or call, e.g. "
                             "certified_accuracy(method='ibp', eps=0.1)")
    return Check(text.strip(), name, tuple(sorted(check_args(name, given, text).items())), op, float(threshold))


def check_args(name: str, given: dict[str, Any], text: str) -> dict[str, Any]:
    """Every argument of metric ``name`` with defaults filled in, types and values checked."""
    if name not in METRICS:
        raise GateUsageError(f"check {text!r}: unknown metric {name!r}; valid metrics: "
                             + "; ".join(f"{m}({', '.join(s.args)}) - {s.doc}" for m, s in METRICS.items()))
    spec = METRICS[name]
    unknown = sorted(set(given) - set(spec.args))
    if unknown:
        valid = ", ".join(spec.args) or "none"
        raise GateUsageError(f"check {text!r}: {name} takes no argument(s) {unknown}; valid arguments: {valid}")
    out = {}
    for arg, (kind, default) in spec.args.items():
        value = given.get(arg, default)
        if value is REQUIRED:
            raise GateUsageError(f"check {text!r}: {name} needs {arg}=..., e.g. {name}({arg}=0.1)")
        if value is not None:
            value = _typed(value, kind, arg, text)
        out[arg] = value
    _check_values(out, text)
    return {k: v for k, v in out.items() if v is not None}


def _typed(value: Any, kind: type, arg: str, text: str) -> Any:
    if kind is str and isinstance(value, str):
        return value.lower()
    if kind is float and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
        return float(value)
    if kind is int and isinstance(value, int) and value >= 1:
        return value
    want = {str: "a string in quotes", float: "a number >= 0", int: "an integer >= 1"}[kind]
    raise GateUsageError(f"check {text!r}: {arg}={value!r}; expected {want}")


def _check_values(args: dict[str, Any], text: str) -> None:
    from .auditor import certifier_classes, noise_kind
    from .certifiers.attacks import attack_classes

    choices = {"norm": ("linf", "l2"), "method": tuple(sorted(certifier_classes())),
               "attack": tuple(sorted(attack_classes()))}
    for arg, valid in choices.items():
        if arg in args and args[arg] not in valid:
            raise GateUsageError(f"check {text!r}: {arg}={args[arg]!r}; valid values: {', '.join(valid)}")
    if "kind" in args:
        try:
            args["kind"] = noise_kind(args["kind"])
        except InvalidParameterError as exc:
            raise GateUsageError(f"check {text!r}: {exc}") from None


# ---------------------------------------------------------------------------- configuration
MODEL_KEYS = {"name": str, "path": str, "data": str, "data_path": str, "limit": int, "split": str, "checks": list,
              "baseline": str}
TOP_KEYS = {"models": list, "baseline": str, "tolerance": (int, float), "profile": str, "seed": int, "device": str,
            "batch_size": int}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    path: Path
    data: str
    checks: tuple[Check, ...]
    limit: int | None = None
    data_path: Path | None = None
    split: str = "test"
    baseline: Path | None = None


@dataclass(frozen=True)
class GateConfig:
    models: tuple[ModelConfig, ...]
    tolerance: float = 0.01
    profile: str = "quick"
    seed: int = 0
    device: str = "cpu"
    batch_size: int | None = None


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise GateUsageError("reading robeval.toml needs Python 3.11+ or the tomli package (pip install tomli)") \
                from None
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise GateUsageError(f"config file {path} does not exist; write one (see docs/gate.md) or pass --config")\
            from None
    except tomllib.TOMLDecodeError as exc:
        raise GateUsageError(f"{path} is not valid TOML: {exc}") from None


def _check_keys(table: dict, allowed: dict, where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise GateUsageError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(allowed)}")
    for key, kind in allowed.items():
        if key in table and (not isinstance(table[key], kind) or isinstance(table[key], bool)):
            raise GateUsageError(f"{where}: {key} = {table[key]!r} has the wrong type; expected "
                                 f"{getattr(kind, '__name__', 'a number')}")


def _resolve(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def load_config(path: str | Path, baseline: str | None = None, tolerance: float | None = None) -> GateConfig:
    """Read and check a gate config; ``baseline`` and ``tolerance`` (the CLI's) override the file's.
    Relative paths in the file are relative to the file's folder."""
    from .auditor import PROFILES

    path = Path(path)
    raw = _load_toml(path)
    _check_keys(raw, TOP_KEYS, str(path))
    models = raw.get("models")
    if not models:
        raise GateUsageError(f"{path}: no [[models]] tables; add at least one with path, data and checks")
    base = path.resolve().parent
    top_baseline = _resolve(Path.cwd(), baseline) if baseline else _resolve(base, raw.get("baseline"))
    tol = tolerance if tolerance is not None else raw.get("tolerance", 0.01)
    if not tol >= 0:
        raise GateUsageError(f"tolerance = {tol!r}; expected a number >= 0 (0.01 allows one point of accuracy)")
    profile = raw.get("profile", "quick")
    if profile not in PROFILES:
        raise GateUsageError(f"{path}: profile = {profile!r}; expected one of {', '.join(PROFILES)}")
    parsed = [_model(m, i, base, path, top_baseline, baseline is not None) for i, m in enumerate(models)]
    names = [m.name for m in parsed]
    if len(set(names)) != len(names):
        raise GateUsageError(f"{path}: model names {names} are not unique; set name = \"...\" in each [[models]]")
    if raw.get("batch_size") is not None and raw["batch_size"] < 1:
        raise GateUsageError(f"{path}: batch_size must be >= 1")
    return GateConfig(tuple(parsed), float(tol), profile, raw.get("seed", 0), raw.get("device", "cpu"),
                      raw.get("batch_size"))


def _model(m: Any, i: int, base: Path, path: Path, top_baseline: Path | None, cli_baseline: bool) -> ModelConfig:
    where = f"{path}: [[models]] #{i + 1}"
    if not isinstance(m, dict):
        raise GateUsageError(f"{where} is not a table")
    _check_keys(m, MODEL_KEYS, where)
    for key in ("path", "data", "checks"):
        if key not in m:
            raise GateUsageError(f"{where} has no {key!r}; e.g. path = \"model.onnx\", data = \"mnist\", "
                                 "checks = [\"clean_accuracy >= 0.98\"]")
    if not m["checks"] or not all(isinstance(c, str) for c in m["checks"]):
        raise GateUsageError(f"{where}: checks must be a non-empty list of strings")
    if "limit" in m and m["limit"] < 1:
        raise GateUsageError(f"{where}: limit = {m['limit']}; expected a positive number of samples")
    if m.get("split", "test") not in ("test", "train"):
        raise GateUsageError(f"{where}: split = {m['split']!r}; expected 'test' or 'train'")
    data = m["data"]
    if data.lower() not in ("mnist", "digits"):
        data = str(_resolve(base, data))
    own = None if cli_baseline else _resolve(base, m.get("baseline"))
    return ModelConfig(name=m.get("name") or Path(m["path"]).stem, path=_resolve(base, m["path"]), data=data,
                       checks=tuple(parse_check(c) for c in m["checks"]), limit=m.get("limit"),
                       data_path=_resolve(base, m.get("data_path")), split=m.get("split", "test"),
                       baseline=own or top_baseline)


def load_baseline(path: Path) -> dict:
    """A report.json (schema 1.x) to compare with; a missing or foreign file is a usage error."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GateUsageError(f"baseline report {path} does not exist; write one with `robeval audit MODEL --out DIR`")\
            from None
    except (OSError, ValueError) as exc:
        raise GateUsageError(f"baseline report {path} cannot be read as JSON: {exc}") from None
    version = str(payload.get("schema_version", "")) if isinstance(payload, dict) else ""
    if not version.startswith("1.") or not isinstance(payload.get("metrics"), list):
        raise GateUsageError(f"baseline {path} is not a robeval report (schema_version {version or 'missing'}; "
                             "expected 1.x with a 'metrics' list)")
    return payload


# ---------------------------------------------------------------------------- results
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
        """A short fixed-width table, then one line per failure or error."""
        width = max([len(r.check.text) for r in self.results] + [5])
        mw = max([len(r.model) for r in self.results] + [5])
        lines = [f"{'MODEL':<{mw}}  {'CHECK':<{width}}  {'VALUE':>9}  {'BASELINE':>9}  RESULT"]
        for r in self.results:
            lines.append(f"{r.model:<{mw}}  {r.check.text:<{width}}  {_num(r.value):>9}  {_num(r.baseline):>9}  "
                         f"{r.status.upper()}")
        lines += [f"  {r.status.upper()} {r.model}: {r.check.text}: {r.message}" for r in self.results
                  if r.status != "pass"]
        c = self.counts()
        lines.append(f"gate: {c['pass']} passed, {c['fail']} failed, {c['error']} error(s) -> exit {self.exit_code}")
        return lines

    def to_junit(self) -> str:
        """JUnit XML: one testsuite per model, one testcase per check."""
        c = self.counts()
        root = ElementTree.Element("testsuites", name="robeval gate", tests=str(len(self.results)),
                                   failures=str(c["fail"]), errors=str(c["error"]), time=f"{self.seconds:.3f}")
        for model in dict.fromkeys(r.model for r in self.results):
            rs = [r for r in self.results if r.model == model]
            suite = ElementTree.SubElement(
                root, "testsuite", name=f"robeval gate: {model}", tests=str(len(rs)),
                failures=str(sum(r.status == "fail" for r in rs)), errors=str(sum(r.status == "error" for r in rs)),
                time=f"{sum(r.seconds for r in rs):.3f}")
            for r in rs:
                case = ElementTree.SubElement(suite, "testcase", classname=f"robeval.gate.{model}",
                                              name=r.check.text, time=f"{r.seconds:.3f}")
                details = (f"measured: {_num(r.value)}\nthreshold: {r.check.op} {format_number(r.check.threshold)}\n"
                           f"baseline: {_num(r.baseline)} (tolerance {format_number(self.tolerance)})")
                if r.status == "fail":
                    ElementTree.SubElement(case, "failure", message=r.message, type="ThresholdNotMet").text = details
                elif r.status == "error":
                    ElementTree.SubElement(case, "error", message=r.message, type="EvaluationError").text = r.message
                ElementTree.SubElement(case, "system-out").text = details
        ElementTree.indent(root)
        return '<?xml version="1.0" encoding="utf-8"?>\n' + ElementTree.tostring(root, encoding="unicode") + "\n"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"


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


def run_gate(config: GateConfig, progress: bool = False) -> GateResult:
    """Evaluate every model's checks. Usage problems (a bad baseline file) raise GateUsageError
    before any model is evaluated; evaluation errors are results, never exceptions."""
    for mc in config.models:
        if mc.baseline:
            load_baseline(mc.baseline)
    start = time.perf_counter()
    results: list[CheckResult] = []
    for mc in config.models:
        results += evaluate_model(mc, config, progress)
    return GateResult(tuple(results), config.tolerance, time.perf_counter() - start)


__all__ = ["parse_check", "load_config", "run_gate", "Check", "CheckResult", "GateResult", "GateConfig",
           "ModelConfig", "METRICS", "GateUsageError", "EXIT_PASS", "EXIT_FAIL", "EXIT_USAGE", "EXIT_ERROR"]
