"""Gate check expressions: the metrics a check may name and a parser that never evaluates the text."""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidParameterError
from .report.report import metric_key

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
    "smoothed_certified_accuracy": MetricSpec(
        {"sigma": (float, REQUIRED), "radius": (float, REQUIRED), "alpha": (float, 0.001), "n": (int, None),
         "n0": (int, None)}, ("sigma", "radius", "alpha"), True,
        "randomized smoothing: fraction certified at L2 radius with probability >= 1 - alpha (probabilistic)"),
}


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

    deterministic = [m for m, cls in certifier_classes().items() if not getattr(cls, "probabilistic", False)]
    choices = {"norm": ("linf", "l2"), "method": tuple(sorted(deterministic)),
               "attack": tuple(sorted(attack_classes()))}
    for arg, valid in choices.items():
        if arg in args and args[arg] not in valid:
            raise GateUsageError(f"check {text!r}: {arg}={args[arg]!r}; valid values: {', '.join(valid)}")
    if "kind" in args:
        try:
            args["kind"] = noise_kind(args["kind"])
        except InvalidParameterError as exc:
            raise GateUsageError(f"check {text!r}: {exc}") from None
    if "sigma" in args and args["sigma"] <= 0:
        raise GateUsageError(f"check {text!r}: sigma={args['sigma']!r}; expected a noise level > 0, e.g. 0.25")
    if "alpha" in args and not 0 < args["alpha"] < 1:
        raise GateUsageError(f"check {text!r}: alpha={args['alpha']!r}; expected a probability in (0, 1)")
