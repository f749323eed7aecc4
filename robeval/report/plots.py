"""The report's figures as base64 PNG strings, to embed in one self-contained HTML page.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot, so no global state
and no display is touched. Without matplotlib every function returns None and the page says so."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy

#: Line styles: attacks solid (upper bounds), certificates dashed (lower bounds), noise dotted.
ATTACK_COLOURS = {"fgsm": "#f4a261", "pgd": "#e76f51", "apgd": "#9b2226"}
CERT_COLOURS = {"ibp": "#2a9d8f", "crown": "#264653", "crown-ibp": "#287271", "best": "#0b3d91", "lipschitz": "#6a4c93"}
NOISE_COLOURS = {"uniform": "#8d99ae", "gaussian": "#5c677d", "replace": "#adb5bd", "pixels": "#adb5bd"}
VERDICT_COLOURS = {"verified": "#2a9d8f", "unknown": "#e9c46a", "falsified": "#e76f51"}


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def to_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def accuracy_plot(report: Any) -> str | None:
    """Accuracy vs eps for every attack (solid), certificate (dashed), smoothing certificate under L2
    (dash-dotted, probabilistic) and additive noise (dotted, with its confidence band); pixel
    replacement, whose level is a fraction, on a second panel."""
    if not available():
        return None
    pixel_noise = [r for r in report.noise if r.kind in ("replace", "pixels")]
    fig = _figure(11 if pixel_noise else 7, 4.2)
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]}) if pixel_noise else [fig.subplots()]
    ax = axes[0]
    norm = report.settings.get("norm", "linf")
    for rep in report.attacks:
        if rep.results:
            name = rep.results[0].attack
            ax.plot(rep.eps, rep.robust_accuracy, "-o", color=ATTACK_COLOURS.get(name),
                    label=f"{name.upper()} (attack)")
    for c in report.certificates:
        ax.plot(c.eps, c.certified_accuracy, "--s", color=CERT_COLOURS.get(c.method), label=f"{c.method} (certified)")
    if norm == "l2":  # smoothing radii are L2: same axis, dash-dotted, named probabilistic
        for sm in report.smoothing:
            ax.plot(sm.eps, sm.certified_accuracy, "-.D", color="#3d5a80",
                    label=f"smoothing sigma={sm.sigma:g} (p>={1 - sm.alpha:g})")
    for r in report.noise:
        if r.kind in ("replace", "pixels"):
            continue
        colour = NOISE_COLOURS.get(r.kind)
        ax.plot(r.levels, r.accuracy, ":^", color=colour, label=f"{r.kind} noise (level)")
        ax.fill_between(r.levels, r.ci_low, r.ci_high, color=colour, alpha=0.15, linewidth=0)
    ax.axhline(report.clean_accuracy, color="#333333", linewidth=0.8, alpha=0.6, label="clean")
    ax.set(xlabel=f"eps ({norm}) / noise level", ylabel="accuracy", ylim=(-0.02, 1.02),
           title="accuracy vs perturbation size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    if pixel_noise:
        ax2 = axes[1]
        for r in pixel_noise:
            ax2.plot(r.levels, r.accuracy, ":^", color="#6c757d", label="pixels replaced")
            ax2.fill_between(r.levels, r.ci_low, r.ci_high, color="#6c757d", alpha=0.15, linewidth=0)
        ax2.set(xlabel="fraction of pixels replaced", ylim=(-0.02, 1.02), title="random pixel replacement")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return to_base64(fig)


def verdict_plot(verdicts: list[dict]) -> str | None:
    """Stacked bars per eps: verified / unknown / falsified sample counts."""
    if not available() or not verdicts:
        return None
    fig = _figure(7, 0.45 * len(verdicts) + 1.3)
    ax = fig.subplots()
    labels = [f"{v['eps']:.4g}" for v in verdicts]
    left = numpy.zeros(len(verdicts))
    for key in ("verified", "unknown", "falsified"):
        counts = numpy.array([v[key] for v in verdicts], dtype=float)
        ax.barh(labels, counts, left=left, color=VERDICT_COLOURS[key], label=key)
        left += counts
    ax.invert_yaxis()
    ax.set(xlabel="samples", ylabel="eps", title="per-sample verdicts")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(verdicts) < 4 else -0.18),
              frameon=False)
    fig.tight_layout()
    return to_base64(fig)


__all__ = ["accuracy_plot", "verdict_plot", "available", "to_base64"]
