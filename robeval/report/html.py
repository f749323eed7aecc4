"""``report.html``: one self-contained page (inline CSS, base64 PNG figures, no external links or
scripts), readable offline and attachable to a CI run as a single artifact."""

from __future__ import annotations

import html
import math
from typing import Any

from . import images, plots
from .report import format_number, headline_eps

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;color:#222;
padding:0 1rem;line-height:1.45}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd;
padding-bottom:.2rem}.meta{color:#666;font-size:.9rem}
.cards{display:flex;flex-wrap:wrap;gap:.8rem;margin:1rem 0}.card{border:1px solid #ddd;border-radius:6px;
padding:.6rem 1rem;min-width:170px}.card .v{font-size:1.5rem;font-weight:600}.card .k{color:#666;font-size:.8rem}
table{border-collapse:collapse;font-size:.88rem;margin:.5rem 0}th,td{border:1px solid #ddd;padding:.25rem .6rem;
text-align:right}th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
.box{border-radius:6px;padding:.5rem 1rem;margin:.5rem 0;font-size:.9rem}.bad{background:#fde2e1;
border:1px solid #e76f51}.warn{background:#fff4d6;border:1px solid #e9c46a}.ok{background:#e3f4f1;
border:1px solid #2a9d8f}.skip{background:#f1f1f1;border:1px solid #bbb}
img{max-width:100%;height:auto}pre{white-space:pre-wrap;font-size:.8rem;margin:.2rem 0}
.small{color:#666;font-size:.8rem}
.examples{display:flex;flex-wrap:wrap;gap:1rem}.ex{border:1px solid #ddd;border-radius:6px;padding:.4rem}
.ex figure{display:inline-block;margin:0 .2rem;text-align:center;font-size:.75rem}
.ex img{image-rendering:pixelated;image-rendering:crisp-edges}.ex .cap{font-size:.8rem;margin-top:.2rem}
.prob{background:#eef2fb;border:1px solid #6a7fbf}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(b64: str | None, alt: str) -> str:
    if b64 is None:
        return f'<p class="small">({_e(alt)}: install matplotlib for figures)</p>'
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def headline(report) -> dict[str, Any]:
    """The figures the page and the Markdown lead with, at the headline eps."""
    e = headline_eps(report.eps)
    attack = [(r.robust_accuracy[i], r.results[0].attack) for r in report.attacks if r.results
              for i, x in enumerate(r.eps) if e is not None and abs(x - e) < 1e-12]
    certs = [(c.certified_accuracy[i], c.method) for c in report.certificates
             for i, x in enumerate(c.eps) if e is not None and abs(x - e) < 1e-12]
    return {"eps": e, "attack": min(attack) if attack else None, "certified": max(certs) if certs else None}


def _cards(report) -> str:
    h = headline(report)
    norm = report.settings.get("norm", "linf")
    cards = [(_pct(report.clean_accuracy), "clean accuracy")]
    if h["attack"]:
        cards.append((_pct(h["attack"][0]), f"robust accuracy under {h['attack'][1].upper()}, eps={h['eps']:g} "
                                              f"({norm}; an upper bound)"))
    if h["certified"]:
        cards.append((_pct(h["certified"][0]), f"certified accuracy ({h['certified'][1]}), eps={h['eps']:g} "
                                                "(a lower bound)"))
    if report.lipschitz_bound is not None:
        cards.append((f"{report.lipschitz_bound:.4g}", "global L2 Lipschitz bound of the logits"))
    s = smoothing_headline(report)
    if s is not None:
        cards.append((_pct(s["value"]), f"smoothed certified accuracy, sigma={s['sigma']:g}, L2 r={s['radius']:g} "
                                        f"(probabilistic: holds with probability >= {1 - s['alpha']:g})"))
    items = "".join(f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
                    for v, k in cards)
    return f'<div class="cards">{items}</div>'


def smoothing_headline(report) -> dict[str, Any] | None:
    """The first smoothing run's result at its middle radius, or None without smoothing."""
    if not report.smoothing or not report.smoothing[0].eps:
        return None
    sm = report.smoothing[0]
    i = len(sm.eps) // 2
    return {"sigma": sm.sigma, "radius": sm.eps[i], "alpha": sm.alpha, "value": sm.certified_accuracy[i]}


#: What every rendering of smoothing results says about them.
SMOOTHING_NOTE = ("Randomized smoothing certificates are probabilistic: each 'certified' holds with probability at "
                  "least 1 - alpha over the noise draws (alpha is the failure probability in the table), and it is "
                  "a statement about the smoothed classifier g(x) = argmax_c P(f(x + d) = c), d ~ N(0, sigma^2 I), "
                  "not about the network f. They are not counted as verified above and not checked against the "
                  "attacks, which attack f.")


def smoothing_lines(report) -> list[str]:
    """One sentence per smoothing run: smoothed accuracy, abstentions and the largest radius its
    draws can certify (radii above it come out uncertified whatever the model)."""
    return [f"sigma={sm.sigma:g}: smoothed accuracy {_pct(sm.clean_accuracy)}, abstained {_pct(sm.abstain_rate)} "
            f"({sm.n} samples, seed {sm.seed}); the largest radius n={sm.n_draws} draws can certify at "
            f"alpha={sm.alpha:g} is sigma * Phi^-1(alpha^(1/n)) = {sm.max_radius:.4g}" for sm in report.smoothing]


def _smoothing(report) -> str:
    if not report.smoothing:
        return ""
    header, rows = report.smoothing_table()
    extra = "".join(f'<p class="small">{_e(line)}</p>' for line in smoothing_lines(report))
    return ("<h2>Randomized smoothing (probabilistic)</h2>"
            f'<div class="box prob">{_e(SMOOTHING_NOTE)}</div>' + _table(header, rows) + extra
            + '<p class="small">abstain: the noise votes did not single out a class (counted as not certified); '
            "incorrect: the smoothed prediction is not the label; not certified: right, but the certified radius "
            "is below the radius.</p>")


def _examples(report) -> str:
    """One panel per adversarial example: original, adversarial input and perturbation as exact PNGs."""
    if not report.examples:
        return "<p>No adversarial examples were found.</p>"
    domain = report.data.get("domain", (0, 1))
    panels = []
    for ex in report.examples:
        im = images.example_images(ex, domain)
        figs = "".join(
            f'<figure><img alt="{_e(kind)} (sample {ex.index})" src="data:image/png;base64,{images.b64(im[kind])}">'
            f"<figcaption>{_e(cap)}</figcaption></figure>"
            for kind, cap in (("original", f"original: pred {ex.clean_prediction}"),
                              ("adversarial", f"{ex.attack} eps={ex.eps:.3g}: pred {ex.adv_prediction}"),
                              ("perturbation", f"perturbation x{im['magnification']:.3g}")))
        cap = (f"sample {ex.index}, label {ex.label}; L-inf {im['linf']:.4g}, L2 {im['l2']:.4g}; "
               f"{'colour' if im['colour'] else 'grey'}")
        panels.append(f'<div class="ex">{figs}<div class="cap">{_e(cap)}</div></div>')
    scale = (f"inputs in [{float(domain[0]):g}, {float(domain[1]):g}] shown as 0..255" if _finite_domain(domain)
             else "unbounded inputs: each example scaled to its own range")
    return (f'<div class="examples">{"".join(panels)}</div>'
            f'<p class="small">Pixels are the model\'s inputs ({_e(scale)}), each enlarged to a square block; '
            "the perturbation is shown around mid grey (no change), scaled so that its largest change is "
            "black or white.</p>")


def _finite_domain(domain) -> bool:
    try:
        return all(math.isfinite(float(d)) for d in domain)
    except (TypeError, ValueError):
        return False


def _checks(report) -> str:
    parts = []
    if report.violations:
        parts += [f'<div class="box bad"><b>Certificate contradicted by an attack</b> (a bug in a certifier, the '
                  f'attack re-check or the model conversion):<pre>{_e(v)}</pre></div>' for v in report.violations]
    elif report.pairs_checked:
        parts.append(f'<div class="box ok">Consistency: no attack broke a certified sample '
                     f'({report.pairs_checked} certificate/attack pairs checked).</div>')
    parts += [f'<div class="box warn"><b>Possible gradient masking:</b> {_e(w)}</div>' for w in report.warnings]
    parts += [f'<div class="box skip"><b>{_e(s.method)} skipped:</b> <pre>{_e(s.reason)}</pre></div>'
              for s in report.skipped]
    return "".join(parts)


def _noise_table(report) -> str:
    rows = []
    for r in report.noise:
        rows += [[r.kind, format_number(lv), _pct(a), f"[{100 * lo:.1f}%, {100 * hi:.1f}%]", f"{d:.2f}"]
                 for lv, a, lo, hi, d in zip(r.levels, r.accuracy, r.ci_low, r.ci_high, r.design_effect)]
    if not rows:
        return "<p>No noise sweeps were run.</p>"
    draws = report.noise[0].draws
    conf = report.noise[0].confidence
    return (_table(["kind", "level", "accuracy", f"{conf:.0%} interval", "design effect"], rows)
            + f'<p class="small">{draws} draw(s) per image and level; intervals are Wilson intervals on an effective '
            "sample size (draws of one image are correlated).</p>")


def _settings(report) -> str:
    s = report.settings
    rows = [["profile", report.profile], ["norm", s.get("norm")], ["eps", ", ".join(map(format_number, report.eps))],
            ["attacks", ", ".join(f"{a['attack']}" + (f" ({a['steps']} steps)" if a.get("steps") else "")
                                  for a in s.get("attacks", []))],
            ["noise", f"{', '.join(s.get('noise', {}).get('kinds', []))}; {s.get('noise', {}).get('draws')} draws"],
            ["certifiers", ", ".join(s.get("certifiers", []))], ["seed", s.get("seed")], ["device", s.get("device")],
            ["domain", report.data.get("domain")], ["robeval", report.version], ["created", report.created]]
    sm = s.get("smoothing")
    if sm:
        rows.append(["smoothing (probabilistic)", f"sigma {', '.join(map(format_number, sm['sigma']))}; n0={sm['n0']}, "
                     f"n={sm['n']}, alpha={format_number(sm['alpha'])}; L2 radii "
                     f"{', '.join(map(format_number, sm['radii']))}"])
    rows += [[f"time: {k}", f"{v:.2f}s"] for k, v in report.seconds.items()]
    return _table(["setting", "value"], [[str(a), str(b)] for a, b in rows])


def render_html(report) -> str:
    """The whole page as a string."""
    m, d = report.model, report.data
    header, rows = report.eps_table()
    verdicts = report.verdicts()
    title = f"robeval audit: {m.get('label')}"
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">data {_e(d.get("name"))} ({d.get("n")} samples) &middot; input {_e(m.get("input_shape"))}, '
        f'{m.get("num_classes")} classes &middot; profile {_e(report.profile)} &middot; {_e(report.created)}</p>',
        _cards(report),
        "<h2>Checks</h2>", _checks(report) or '<p class="small">Nothing to report.</p>',
        "<h2>Accuracy vs perturbation</h2>", _img(plots.accuracy_plot(report), "accuracy plot"),
        '<p class="small">Attacks give upper bounds on robust accuracy, certificates lower bounds; the truth lies '
        "between them. Noise curves show accuracy under random (not adversarial) corruption.</p>",
        _table(header, rows),
        "<h2>Per-sample verdicts</h2>", _img(plots.verdict_plot(verdicts), "verdict plot"),
        '<p class="small">verified: some certificate proves no input in the ball changes the correct prediction; '
        "falsified: the clean prediction is wrong or an attack found an adversarial input; unknown: neither.</p>",
        _smoothing(report),
        "<h2>Adversarial examples</h2>", _examples(report),
        "<h2>Random noise</h2>", _noise_table(report),
        "<h2>Settings</h2>", _settings(report),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


__all__ = ["render_html", "headline", "smoothing_headline", "smoothing_lines", "SMOOTHING_NOTE"]
