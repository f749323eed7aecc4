"""`robeval audit MODEL --data ... [--quick | --full] --out DIR`: the full robustness report."""

from __future__ import annotations

import click

from ..report.html import smoothing_lines
from .common import load_data_arg, load_model_arg, reports_errors, write_json
from .options import check_eps_text, data_options, executor_options, parse_domain, parse_floats, run_options


def render_summary(report) -> list[str]:
    """The report's headline and per-eps table as plain text for the terminal."""
    d = report.data
    lines = [f"model: {report.model['label']}   data: {d['name']} ({d['n']} samples)   profile: {report.profile}",
             f"clean accuracy: {100 * report.clean_accuracy:.2f}%"]
    if report.lipschitz_bound is not None:
        lines.append(f"global L2 Lipschitz bound: {report.lipschitz_bound:.6g}")
    header, rows = report.eps_table()
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)] if rows else []
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines += [f"CONSISTENCY VIOLATION: {v.splitlines()[0]}" for v in report.violations]
    lines += [f"warning: {w}" for w in report.warnings]
    lines += [f"skipped {s.method}: {s.reason.splitlines()[0]}" for s in report.skipped]
    if report.smoothing:
        header, rows = report.smoothing_table()
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        lines.append("randomized smoothing (probabilistic: 'certified' holds with probability >= 1 - alpha, for the "
                     "smoothed classifier):")
        lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        lines += smoothing_lines(report)
    return lines


@click.command("audit")
@click.argument("model", required=False)
@click.option("--quick", "profile", flag_value="quick", default=True,
              help="CI profile (default): 200 samples, PGD-10/APGD-10, 2 noise draws; minutes on a CPU")
@click.option("--full", "profile", flag_value="full", help="every sample, PGD-40, APGD-100, 10 noise draws")
@click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True)
@click.option("--eps", "eps_text", default=None,
              help="comma-separated radii for attacks and certificates (default: the profile's, e.g. 0.01,...,0.3)")
@click.option("--domain", "domain_text", default="0,1", show_default=True,
              help="valid input range LOW,HIGH, or 'none'")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="robeval-report", show_default=True,
              help="folder for report.json, report.html and report.md")
@click.option("--model-class", "class_path", default=None, help="package.module:Class for a PyTorch state_dict")
@click.option("--trust-pickle", is_flag=True, help="allow unpickling a full PyTorch model file (runs its code)")
@click.option("--input-shape", default=None, help="per-sample input shape C,H,W when the model does not say")
@click.option("--sigma", "sigma_text", default=None,
              help="randomized smoothing at these Gaussian noise levels (e.g. 0.25 or 0.12,0.25); off by default")
@click.option("--draws", "n_draws", type=click.IntRange(min=1), default=None,
              help="smoothing: estimation draws per sample (default: 1,000 --quick, 10,000 --full)")
@click.option("--n0", type=click.IntRange(min=1), default=None, help="smoothing: selection draws (default 100)")
@click.option("--alpha", type=float, default=None,
              help="smoothing: failure probability (default 0.001; certified with probability >= 1 - alpha)")
@click.option("--radii", "radii_text", default=None,
              help="smoothing: L2 radii (default: 0 and --eps with --norm l2, else 0 and the profile's L2 radii)")
@data_options
@run_options
@executor_options
@reports_errors
def audit(model, profile, norm, eps_text, domain_text, out_dir, class_path, trust_pickle, input_shape, sigma_text,
          n_draws, n0, alpha, radii_text, data, data_path, split, limit, layout, device, batch_size, seed, json_path,
          progress, scale):
    """Audit MODEL (the built-in digits model when omitted): clean accuracy, random noise,
    FGSM/PGD/APGD, IBP/CROWN/Lipschitz certificates where the model allows, consistency and
    gradient-masking checks; with --sigma, randomized-smoothing certificates (probabilistic, shown
    apart). Writes report.json, report.html (one self-contained page), report.md (for pull-request
    comments) and the adversarial examples as PNG files (examples/) into --out."""
    from ..auditor import audit as audit_api
    from ..auditor import get_profile

    eps_values = check_eps_text(parse_floats(eps_text)) if eps_text else None
    sigma = parse_floats(sigma_text, "--sigma") if sigma_text else None
    radii = parse_floats(radii_text, "--radii") if radii_text else None
    prof = get_profile(profile)
    adapter, label = load_model_arg(model, class_path, trust_pickle, input_shape)
    x, y, data_name = load_data_arg(adapter, data, data_path, split, limit or prof.limit, model is None, layout)
    report = audit_api(adapter, (x, y), profile=prof, eps=eps_values, norm=norm, seed=seed, device=device,
                       batch_size=batch_size, domain=parse_domain(domain_text), progress=progress, label=label,
                       data_name=data_name, sigma=sigma, smoothing_n=n_draws, smoothing_n0=n0,
                       smoothing_alpha=alpha, smoothing_radii=radii, **scale)
    for line in render_summary(report):
        click.echo(line)
    paths = report.save(out_dir)
    click.echo(f"wrote {paths['json']}, {paths['html'].name}, {paths['markdown'].name} "
               f"({report.seconds.get('total', 0):.1f}s)")
    write_json(report.to_dict(), json_path)
