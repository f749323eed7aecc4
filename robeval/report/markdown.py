"""``report.md``: the audit in GitHub-flavoured Markdown, short enough for a pull-request comment
(headline, per-eps table, checks, smoothing apart as probabilistic; noise and the adversarial
examples folded away). The example images are PNG files that ``Report.save`` writes next to
report.md (``examples/``), linked by relative path: they show where report.md sits beside them (a
CI artifact, a repository), not in a comment pasted alone."""

from __future__ import annotations

from .html import SMOOTHING_NOTE, headline, smoothing_headline, smoothing_lines
from .images import example_file
from .report import format_number


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|"] + [line(r) for r in rows]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def render_markdown(report) -> str:
    """The report as Markdown text."""
    m, d = report.model, report.data
    norm = report.settings.get("norm", "linf")
    h = headline(report)
    out = [f"### robeval audit: `{m.get('label')}`", "",
           f"{d.get('name')} ({d.get('n')} samples), profile **{report.profile}**, norm {norm}, "
           f"robeval {report.version}", ""]
    facts = [["clean accuracy", _pct(report.clean_accuracy)]]
    if h["attack"]:
        facts.append([f"robust accuracy, {h['attack'][1].upper()} eps={h['eps']:g} (upper bound)",
                      _pct(h["attack"][0])])
    if h["certified"]:
        facts.append([f"certified accuracy, {h['certified'][1]} eps={h['eps']:g} (lower bound)",
                      _pct(h["certified"][0])])
    if report.lipschitz_bound is not None:
        facts.append(["global L2 Lipschitz bound", f"{report.lipschitz_bound:.4g}"])
    sm = smoothing_headline(report)
    if sm is not None:
        facts.append([f"smoothed certified accuracy, sigma={sm['sigma']:g} L2 r={sm['radius']:g} "
                      f"(probabilistic, alpha={sm['alpha']:g})", _pct(sm["value"])])
    out += _table(["", "value"], facts) + [""]
    header, rows = report.eps_table()
    out += _table(header, rows) + [""]
    if report.smoothing:
        header, rows = report.smoothing_table()
        out += ["**Randomized smoothing (probabilistic)**", "", f"_{SMOOTHING_NOTE}_", ""]
        out += _table(header, rows) + [""] + [f"- {line}" for line in smoothing_lines(report)] + [""]
    if report.violations:
        out += [f"- :x: **certificate contradicted by an attack** (a bug): {v.splitlines()[0]}"
                for v in report.violations]
    elif report.pairs_checked:
        out.append(f"- :white_check_mark: consistency: no attack broke a certified sample "
                   f"({report.pairs_checked} pairs checked)")
    out += [f"- :warning: possible gradient masking: {w}" for w in report.warnings]
    out += [f"- {s.method} skipped: {s.reason.splitlines()[0]}" for s in report.skipped]
    out.append("")
    if report.noise:
        out += ["<details><summary>Random noise</summary>", ""]
        rows = [[r.kind, format_number(lv), _pct(a), f"{100 * lo:.1f}-{100 * hi:.1f}%"]
                for r in report.noise for lv, a, lo, hi in zip(r.levels, r.accuracy, r.ci_low, r.ci_high)]
        header = ["kind", "level", "accuracy", f"{report.noise[0].confidence:.0%} interval"]
        out += _table(header, rows) + ["", "</details>", ""]
    out += _examples(report)
    total = report.seconds.get("total")
    if total is not None:
        out.append(f"_{total:.1f}s; attacks are upper bounds on robust accuracy, certificates lower bounds._")
    return "\n".join(out) + "\n"


def _examples(report) -> list[str]:
    if not report.examples:
        return []
    rows = [[str(ex.index), str(ex.label), str(ex.clean_prediction), str(ex.adv_prediction), ex.attack,
             f"{ex.eps:.4g}", " ".join(f"![{kind}]({example_file(j, ex, kind)})"
                                       for kind in ("original", "adversarial", "perturbation"))]
            for j, ex in enumerate(report.examples)]
    header = ["sample", "label", "prediction", "adversarial prediction", "attack", "eps",
              "original / adversarial / perturbation"]
    return (["<details><summary>Adversarial examples</summary>", ""] + _table(header, rows)
            + ["", "_Images: the model's inputs as PNG files in examples/ beside this file._", "", "</details>", ""])


__all__ = ["render_markdown"]
