"""`robeval certify MODEL --data ... --eps ... --method ...`: certified accuracy per radius."""

from __future__ import annotations

import time

import click

from .common import load_data_arg, load_model_arg, reports_errors, write_json
from .options import check_eps_text, data_options, executor_options, parse_domain, parse_floats, run_options


def smoothing_options(smoothing: bool, norm, sigma, n0, n_draws, alpha, seed) -> dict:
    """Certifier options for --method smoothing; --sigma is required there and refused elsewhere."""
    if not smoothing:
        if sigma is not None:
            raise click.UsageError("--sigma applies to --method smoothing only")
        return {}
    if sigma is None:
        raise click.UsageError("--method smoothing needs --sigma (the noise level, e.g. --sigma 0.25)")
    if norm not in (None, "l2"):
        raise click.UsageError("--method smoothing certifies L2 radii only; drop --norm or pass --norm l2")
    return {"sigma": sigma, "n0": n0, "n": n_draws, "alpha": alpha, "seed": seed}


def normalised_adapter(adapter, label: str, mean_text, std_text):
    """With --mean/--std: the model with (x - mean) / std prepended, so radii are in pixel space."""
    if mean_text is None and std_text is None:
        return adapter, label
    if mean_text is None or std_text is None:
        raise click.UsageError("--mean and --std go together: pass both (one value per channel, or one for all)")
    from ..ir.normalize import NormalisedAdapter

    mean, std = parse_floats(mean_text, "--mean"), parse_floats(std_text, "--std")
    return NormalisedAdapter(adapter, mean, std), f"{label} (normalised: mean {mean}, std {std})"


def render_certification(result, label: str, data_name: str) -> list[str]:
    """The human-readable table for one CertificationResult."""
    lines = [f"model: {label}   data: {data_name} ({result.n} samples)",
             f"method: {result.method}   norm: {result.norm}   domain: {list(result.domain)}   "
             f"device: {result.device} ({result.dtype})"]
    lines += [f"note: {note}" for note in result.notes]
    if result.extra.get("shards"):
        lines.append(f"sharded: {result.extra['shards']} shard(s) of {result.extra['shard_size']} samples on the "
                     f"{result.extra['executor']} executor (times are summed over shards)")
    if result.lipschitz_bound is not None:
        lines.append(f"global L2 Lipschitz bound: {result.lipschitz_bound:.6g}")
    lines.append(f"clean accuracy: {100 * result.clean_accuracy:.2f}%")
    lines.append(f"  {'eps':>10}  {'certified':>9}  {'verified':>8}  {'falsified':>9}  {'unknown':>7}  {'time':>8}")
    for i, (e, acc) in enumerate(zip(result.eps, result.certified_accuracy)):
        c = result.counts(i)
        lines.append(f"  {e:>10.5g}  {100 * acc:>8.2f}%  {c['verified']:>8}  {c['falsified']:>9}  "
                     f"{c['unknown']:>7}  {result.seconds[i]:>7.2f}s")
    lines.append("verified: no input in the region changes the (correct) prediction; falsified: the clean "
                 "prediction is wrong; unknown: the method could not decide")
    return lines


def render_smoothing(result, label: str, data_name: str) -> list[str]:
    """The table for a SmoothingResult: probabilistic verdicts under their own names."""
    lines = [f"model: {label}   data: {data_name} ({result.n} samples)",
             f"method: smoothing (probabilistic)   sigma: {result.sigma:g}   n0: {result.n0}   n: {result.n_draws}   "
             f"alpha: {result.alpha:g}   seed: {result.seed}   device: {result.device} ({result.dtype})",
             f"note: {result.note()}"]
    lines += [f"note: {note}" for note in result.notes]
    lines.append(f"smoothed accuracy: {100 * result.clean_accuracy:.2f}%   abstained: {100 * result.abstain_rate:.2f}%")
    lines.append(f"  {'L2 radius':>10}  {'certified(p)':>12}  {'certified':>9}  {'abstain':>7}  {'incorrect':>9}  "
                 f"{'not_cert':>8}  {'time':>8}")
    for i, (e, acc) in enumerate(zip(result.eps, result.certified_accuracy)):
        c = result.counts(i)
        lines.append(f"  {e:>10.5g}  {100 * acc:>11.2f}%  {c['certified']:>9}  {c['abstain']:>7}  "
                     f"{c['incorrect']:>9}  {c['not_certified']:>8}  {result.seconds[i]:>7.2f}s")
    lines.append(f"certified(p): smoothed prediction right and certified radius >= the radius, with probability "
                 f">= {result.confidence:g}; abstain: the draws did not single out a class")
    return lines


@click.command("certify")
@click.argument("model", required=False)
@click.option("--method", default="ibp", show_default=True,
              help="ibp, lipschitz, smoothing (probabilistic; and crown, crown-ibp, best where installed)")
@click.option("--norm", type=click.Choice(["linf", "l2"]), default=None,
              help="linf (default) or l2; smoothing certifies l2 only")
@click.option("--sigma", type=float, default=None, help="smoothing: Gaussian noise level (e.g. 0.25)")
@click.option("--n0", type=click.IntRange(min=1), default=100, show_default=True,
              help="smoothing: selection draws per sample")
@click.option("--draws", "n_draws", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="smoothing: estimation draws per sample")
@click.option("--alpha", type=float, default=0.001, show_default=True,
              help="smoothing: failure probability (certificates hold with probability >= 1 - alpha)")
@click.option("--mean", "mean_text", default=None,
              help="per-channel normalisation mean (e.g. 0.4914,0.4822,0.4465): prepended to the model")
@click.option("--std", "std_text", default=None, help="per-channel normalisation std, with --mean")
@click.option("--eps", "eps_text", default="0.01,0.05,0.1", show_default=True,
              help="comma-separated radii; fractions such as 8/255 are fine")
@click.option("--domain", "domain_text", default="0,1", show_default=True,
              help="valid input range LOW,HIGH that the region is clipped to, or 'none'")
@click.option("--model-class", "class_path", default=None, help="package.module:Class for a PyTorch state_dict")
@click.option("--trust-pickle", is_flag=True, help="allow unpickling a full PyTorch model file (runs its code)")
@click.option("--input-shape", default=None, help="per-sample input shape C,H,W when the model does not say")
@data_options
@run_options
@executor_options
@reports_errors
def certify(model, method, norm, sigma, n0, n_draws, alpha, mean_text, std_text, eps_text, domain_text, class_path,
            trust_pickle, input_shape, data, data_path, split, limit, layout, device, batch_size, seed, json_path,
            progress, scale):
    """Certify MODEL (.onnx, .pt, .pt2, .keras, .h5; the built-in digits model when omitted) on a
    data set at every radius in --eps, and print clean and certified accuracy with per-sample
    verdict counts (verified / falsified / unknown) and the time taken."""
    from ..api import certify as certify_api

    eps_values = check_eps_text(parse_floats(eps_text))
    domain = parse_domain(domain_text)
    smoothing = method.lower() == "smoothing"
    options = smoothing_options(smoothing, norm, sigma, n0, n_draws, alpha, seed)
    norm = norm or ("l2" if smoothing else "linf")
    adapter, label = load_model_arg(model, class_path, trust_pickle, input_shape)
    adapter, label = normalised_adapter(adapter, label, mean_text, std_text)
    x, y, data_name = load_data_arg(adapter, data, data_path, split, limit, model is None, layout)
    start = time.perf_counter()
    result = certify_api(adapter, (x, y), method=method, eps=eps_values, norm=norm, device=device,
                         batch_size=batch_size, domain=domain, progress=progress, executor=scale["executor"],
                         workers=scale["workers"], shard_size=scale["shard_size"], shards=scale["shards"],
                         resume=scale["resume"], ray_address=scale["ray_address"],
                         gpus_per_worker=scale["gpus_per_worker"], **options)
    render = render_smoothing if smoothing else render_certification
    for line in render(result, label, data_name):
        click.echo(line)
    click.echo(f"total time: {time.perf_counter() - start:.2f}s")
    write_json({"model": label, "data": data_name, **result.to_dict()}, json_path)
