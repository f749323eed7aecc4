"""The audit ``Report``: one frozen object holding every result of ``robeval.audit``, rendered as
JSON (``report.json``, validated by ``schema.json``), one self-contained HTML page and Markdown.

The JSON carries a flat ``metrics`` list — name, arguments, value — that ``robeval gate`` reads to
compare a new run with a baseline report, so metric names and arguments match the gate's checks:
``attack_accuracy(attack='pgd', eps=0.1, norm='linf')``."""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy

from .empirical import AttackReport, NoiseResult
from .results import VERIFIED, CertificationResult
from .smoothing import SmoothingResult

SCHEMA_VERSION = "1.1"  # 1.1 added the optional "smoothing" list
#: Metrics where a smaller value is better (everything else is an accuracy).
LOWER_IS_BETTER = frozenset({"lipschitz_bound"})


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _version() -> str:
    from .. import __version__

    return __version__


@dataclass(frozen=True, eq=False)
class Example:
    """An adversarial input beside its original: (C, H, W) arrays and both predictions."""

    index: int
    label: int
    clean_prediction: int
    adv_prediction: int
    attack: str
    eps: float
    x: numpy.ndarray
    x_adv: numpy.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "clean_prediction": self.clean_prediction,
                "adv_prediction": self.adv_prediction, "attack": self.attack, "eps": self.eps}


@dataclass(frozen=True)
class SkippedCertificate:
    """A certifier that could not run on this model, and why."""

    method: str
    reason: str


def format_number(v: Any) -> str:
    """Short, exact enough for keys and tables: 0.1, 0.00392157, 10."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return repr(v)
    return f"{float(v):.6g}" if isinstance(v, float) else str(v)


def metric_key(name: str, args: dict[str, Any]) -> str:
    """``name(k='v', k2=0.1)`` with keys sorted; the form checks are written in."""
    if not args:
        return name
    inner = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={format_number(v)}"
                      for k, v in sorted(args.items()))
    return f"{name}({inner})"


def same_args(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal keys and values, numbers compared with a relative tolerance of 1e-9."""
    if set(a) != set(b):
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, (int, float)) and isinstance(w, (int, float)) and not isinstance(v, bool):
            if not math.isclose(float(v), float(w), rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif v != w:
            return False
    return True


def find_metric(metrics: list[dict], name: str, args: dict[str, Any]) -> dict | None:
    """The entry of a report's ``metrics`` list with this name and these arguments, or None."""
    return next((m for m in metrics if m.get("name") == name and same_args(m.get("args", {}), args)), None)


def json_safe(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays become Python ones, NaN None, +/-inf "inf"/"-inf"."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, numpy.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, numpy.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


@dataclass(frozen=True, eq=False)
class Report:
    """Everything one audit found. Build it with ``robeval.audit``; render it with ``to_json``,
    ``to_html`` or ``to_markdown``, or write all three with ``save(dir)``."""

    model: dict[str, Any]
    data: dict[str, Any]
    profile: str
    settings: dict[str, Any]
    clean_accuracy: float
    attacks: tuple[AttackReport, ...] = ()
    noise: tuple[NoiseResult, ...] = ()
    certificates: tuple[CertificationResult, ...] = ()
    skipped: tuple[SkippedCertificate, ...] = ()
    violations: tuple[str, ...] = ()
    pairs_checked: int = 0
    warnings: tuple[str, ...] = ()
    examples: tuple[Example, ...] = ()
    lipschitz_bound: float | None = None
    smoothing: tuple[SmoothingResult, ...] = ()  # probabilistic; never mixed into ``verdicts``
    seconds: dict[str, float] = field(default_factory=dict)
    created: str = field(default_factory=_now)
    version: str = field(default_factory=_version)

    @property
    def eps(self) -> tuple[float, ...]:
        return tuple(self.settings.get("eps", ()))

    # ------------------------------------------------------------------ derived figures
    def metrics(self) -> list[dict[str, Any]]:
        """Every headline number as {name, args, key, value, higher_is_better}."""
        out = [("clean_accuracy", {}, self.clean_accuracy)]
        for rep in self.attacks:
            out += [("attack_accuracy", {"attack": r.attack, "eps": r.eps, "norm": r.norm}, r.robust_accuracy)
                    for r in rep.results]
        for c in self.certificates:
            out += [("certified_accuracy", {"method": c.method, "eps": e, "norm": c.norm}, a)
                    for e, a in zip(c.eps, c.certified_accuracy)]
        for nr in self.noise:
            out += [("noise_accuracy", {"kind": nr.kind, "level": lv}, a) for lv, a in zip(nr.levels, nr.accuracy)]
        if self.lipschitz_bound is not None:
            out.append(("lipschitz_bound", {}, self.lipschitz_bound))
        for sm in self.smoothing:
            out += [("smoothed_certified_accuracy", {"sigma": sm.sigma, "radius": r, "alpha": sm.alpha}, a)
                    for r, a in zip(sm.eps, sm.certified_accuracy)]
        return [{"name": n, "args": a, "key": metric_key(n, a), "value": float(v),
                 "higher_is_better": n not in LOWER_IS_BETTER} for n, a, v in out]

    def metric(self, name: str, **args) -> float | None:
        """One metric's value, e.g. ``report.metric("certified_accuracy", method="ibp", eps=0.1, norm="linf")``."""
        found = find_metric(self.metrics(), name, args)
        return None if found is None else found["value"]

    def verdicts(self) -> list[dict[str, Any]]:
        """Per eps: samples verified by some certificate, falsified (wrong clean prediction or broken
        by some attack) and unknown (neither). A sample both certified and broken is a consistency
        violation (listed separately) and counted as falsified."""
        n = int(self.data.get("n", 0))
        rows = []
        for e in self.eps:
            verified = numpy.zeros(n, dtype=bool)
            broken = numpy.zeros(n, dtype=bool)
            methods, attacks = [], []
            for c in self.certificates:
                j = _index(c.eps, e)
                if j is not None:
                    verified |= c.verdicts[:, j] == VERIFIED
                    broken |= c.predictions != c.labels
                    methods.append(c.method)
            for rep in self.attacks:
                for r in rep.results:
                    if math.isclose(r.eps, e):
                        broken |= ~r.robust
                        attacks.append(r.attack)
            rows.append({"eps": e, "verified": int((verified & ~broken).sum()), "falsified": int(broken.sum()),
                         "unknown": int((~verified & ~broken).sum()), "certifiers": methods, "attacks": attacks})
        return rows

    def eps_table(self) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of the per-eps summary: each attack's and certificate's accuracy (%) and
        the verdict counts, as strings for the HTML and Markdown renderers."""
        header = ["eps"] + [f"{r.results[0].attack.upper()}" for r in self.attacks if r.results]
        header += [f"{c.method} (certified)" for c in self.certificates]
        header += ["verified", "unknown", "falsified"]
        rows = []
        for v in self.verdicts():
            e = v["eps"]
            row = [format_number(e)]
            for rep in self.attacks:
                if rep.results:
                    j = _index(rep.eps, e)
                    row.append("-" if j is None else f"{100 * rep.robust_accuracy[j]:.1f}%")
            for c in self.certificates:
                j = _index(c.eps, e)
                row.append("-" if j is None else f"{100 * c.certified_accuracy[j]:.1f}%")
            rows.append(row + [str(v["verified"]), str(v["unknown"]), str(v["falsified"])])
        return header, rows

    def smoothing_table(self) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of the randomized-smoothing results, one row per (sigma, radius): the
        fraction certified with probability >= 1 - alpha and the counts of each verdict."""
        header = ["sigma", "L2 radius", "certified (p >= 1-alpha)", "alpha", "abstain", "incorrect",
                  "not certified", "n0", "n"]
        rows = []
        for sm in self.smoothing:
            for i, (r, acc) in enumerate(zip(sm.eps, sm.certified_accuracy)):
                c = sm.counts(i)
                rows.append([format_number(sm.sigma), format_number(r), f"{100 * acc:.1f}%", format_number(sm.alpha),
                             str(c["abstain"]), str(c["incorrect"]), str(c["not_certified"]), str(sm.n0),
                             str(sm.n_draws)])
        return header, rows

    # ------------------------------------------------------------------ renderers
    def to_dict(self) -> dict[str, Any]:
        out = {
            "schema_version": SCHEMA_VERSION, "robeval_version": self.version, "created": self.created,
            "profile": self.profile, "model": self.model, "data": self.data, "settings": self.settings,
            "clean_accuracy": self.clean_accuracy, "lipschitz_bound": self.lipschitz_bound,
            "metrics": self.metrics(),
            "attacks": [r.to_dict(samples=False) for r in self.attacks],
            "noise": [r.to_dict(samples=False) for r in self.noise],
            "certificates": [c.to_dict(samples=False) for c in self.certificates],
            "skipped": [{"method": s.method, "reason": s.reason} for s in self.skipped],
            "verdicts": self.verdicts(),
            "consistency": {"status": "violation" if self.violations else ("ok" if self.pairs_checked else "not_run"),
                            "pairs_checked": self.pairs_checked, "violations": list(self.violations)},
            "warnings": list(self.warnings),
            "examples": [x.to_dict() for x in self.examples],
            "seconds": self.seconds,
        }
        if self.smoothing:
            out["smoothing"] = [sm.to_dict(samples=False) for sm in self.smoothing]
        return json_safe(out)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_html(self) -> str:
        from .html import render_html

        return render_html(self)

    def to_markdown(self) -> str:
        from .markdown import render_markdown

        return render_markdown(self)

    def example_files(self) -> dict[str, bytes]:
        """The adversarial examples as PNG files, {relative path: bytes}, as report.md links them."""
        from .images import KINDS, example_file, example_images

        domain = self.data.get("domain", (0.0, 1.0))
        files = {}
        for j, ex in enumerate(self.examples):
            images = example_images(ex, domain)
            files.update({example_file(j, ex, kind): images[kind] for kind in KINDS})
        return files

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write report.json, report.html, report.md and the example images (``examples/*.png``,
        linked from report.md) into ``directory``; returns the paths of the three reports and, under
        "examples", the image folder."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = {"json": d / "report.json", "html": d / "report.html", "markdown": d / "report.md"}
        paths["json"].write_text(self.to_json() + "\n", encoding="utf-8")
        paths["html"].write_text(self.to_html(), encoding="utf-8")
        paths["markdown"].write_text(self.to_markdown(), encoding="utf-8")
        files = self.example_files()
        if files:
            from .images import EXAMPLES_DIR

            paths["examples"] = d / EXAMPLES_DIR
            paths["examples"].mkdir(exist_ok=True)
            for old in paths["examples"].glob("*-sample*-*.png"):  # a previous run's examples
                if f"{EXAMPLES_DIR}/{old.name}" not in files:
                    old.unlink()
            for name, data in files.items():
                (d / name).write_bytes(data)
        return paths


def headline_eps(eps) -> float | None:
    """The radius summaries lead with: 0.1 when audited, else the middle one."""
    eps = sorted(eps)
    if not eps:
        return None
    return next((e for e in eps if math.isclose(e, 0.1)), eps[len(eps) // 2])


def _index(values, e: float) -> int | None:
    return next((j for j, v in enumerate(values) if math.isclose(v, e)), None)


def schema() -> dict[str, Any]:
    """The JSON Schema of report.json (shipped as robeval/report/schema.json)."""
    return json.loads((resources.files("robeval.report") / "schema.json").read_text(encoding="utf-8"))


def validate(payload: dict[str, Any]) -> None:
    """Validate a report dict against the schema (needs the jsonschema package)."""
    import jsonschema

    jsonschema.validate(payload, schema())


__all__ = ["Report", "Example", "SkippedCertificate", "SCHEMA_VERSION", "metric_key", "find_metric", "json_safe",
           "schema", "validate", "format_number", "headline_eps"]
