"""Gate result rendering: the fixed-width console table and the JUnit XML report for CI."""

from __future__ import annotations

from typing import TYPE_CHECKING
from xml.etree import ElementTree

from .report.report import format_number

if TYPE_CHECKING:
    from .gate import GateResult


def result_table(result: GateResult) -> list[str]:
    """A short fixed-width table, then one line per failure or error."""
    width = max([len(r.check.text) for r in result.results] + [5])
    mw = max([len(r.model) for r in result.results] + [5])
    lines = [f"{'MODEL':<{mw}}  {'CHECK':<{width}}  {'VALUE':>9}  {'BASELINE':>9}  RESULT"]
    for r in result.results:
        lines.append(f"{r.model:<{mw}}  {r.check.text:<{width}}  {_num(r.value):>9}  {_num(r.baseline):>9}  "
                     f"{r.status.upper()}")
    lines += [f"  {r.status.upper()} {r.model}: {r.check.text}: {r.message}" for r in result.results
              if r.status != "pass"]
    c = result.counts()
    lines.append(f"gate: {c['pass']} passed, {c['fail']} failed, {c['error']} error(s) -> exit {result.exit_code}")
    return lines


def junit_xml(result: GateResult) -> str:
    """JUnit XML: one testsuite per model, one testcase per check."""
    c = result.counts()
    root = ElementTree.Element("testsuites", name="robeval gate", tests=str(len(result.results)),
                               failures=str(c["fail"]), errors=str(c["error"]), time=f"{result.seconds:.3f}")
    for model in dict.fromkeys(r.model for r in result.results):
        rs = [r for r in result.results if r.model == model]
        suite = ElementTree.SubElement(
            root, "testsuite", name=f"robeval gate: {model}", tests=str(len(rs)),
            failures=str(sum(r.status == "fail" for r in rs)), errors=str(sum(r.status == "error" for r in rs)),
            time=f"{sum(r.seconds for r in rs):.3f}")
        for r in rs:
            case = ElementTree.SubElement(suite, "testcase", classname=f"robeval.gate.{model}",
                                          name=r.check.text, time=f"{r.seconds:.3f}")
            details = (f"measured: {_num(r.value)}\nthreshold: {r.check.op} {format_number(r.check.threshold)}\n"
                       f"baseline: {_num(r.baseline)} (tolerance {format_number(result.tolerance)})")
            if r.status == "fail":
                ElementTree.SubElement(case, "failure", message=r.message, type="ThresholdNotMet").text = details
            elif r.status == "error":
                ElementTree.SubElement(case, "error", message=r.message, type="EvaluationError").text = r.message
            ElementTree.SubElement(case, "system-out").text = details
    ElementTree.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ElementTree.tostring(root, encoding="unicode") + "\n"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"
