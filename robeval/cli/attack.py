"""`robeval attack MODEL ...` (FGSM / PGD / APGD) and `robeval sweep MODEL ...` (random noise)."""

from __future__ import annotations

import click

from .common import load_data_arg, load_model_arg, reports_errors, write_json
from .options import check_eps_text, data_options, executor_options, parse_domain, parse_floats, run_options


def model_options(fn):
    """--model-class, --trust-pickle, --input-shape, --domain (shared by attack and sweep)."""
    fn = click.option("--domain", "domain_text", default="0,1", show_default=True,
                      help="valid input range LOW,HIGH that perturbed inputs are clipped to")(fn)
    fn = click.option("--input-shape", default=None, help="per-sample input shape C,H,W if the model does not say")(fn)
    fn = click.option("--trust-pickle", is_flag=True, help="allow unpickling a full PyTorch model file")(fn)
    fn = click.option("--model-class", "class_path", default=None, help="package.module:Class for a state_dict")(fn)
    return fn


@click.command("attack")
@click.argument("model", required=False)
@click.option("--attack", "name", type=click.Choice(["fgsm", "pgd", "apgd"]), default="apgd", show_default=True)
@click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True)
@click.option("--eps", "eps_text", default="0.1,0.2,0.3", show_default=True, help="comma-separated radii")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="iterations (default 40 for pgd, 100 apgd)")
@click.option("--restarts", type=click.IntRange(min=1), default=None, help="random restarts (default 1)")
@click.option("--step-size", type=float, default=None, help="PGD step (default 2.5 * eps / steps)")
@click.option("--loss", type=click.Choice(["ce", "margin"]), default="ce", show_default=True)
@model_options
@data_options
@run_options
@executor_options
@reports_errors
def attack(model, name, norm, eps_text, steps, restarts, step_size, loss, domain_text, input_shape, trust_pickle,
           class_path, data, data_path, split, limit, layout, device, batch_size, seed, json_path, progress, scale):
    """Attack MODEL at every radius in --eps and print robust accuracy (an upper bound on the true
    robust accuracy; certificates give the lower bound)."""
    from ..certifiers.attacks import attack as run_attack

    eps_values = check_eps_text(parse_floats(eps_text))
    adapter, label = load_model_arg(model, class_path, trust_pickle, input_shape)
    x, y, data_name = load_data_arg(adapter, data, data_path, split, limit, model is None, layout)
    report = run_attack(adapter, (x, y), attack=name, eps=eps_values, norm=norm, steps=steps, restarts=restarts,
                        step_size=step_size, loss=loss, seed=seed, domain=parse_domain(domain_text),
                        batch_size=batch_size, progress=progress, **scale)
    click.echo(f"model: {label}   data: {data_name} ({len(y)} samples)   attack: {name} ({norm}, loss {loss})")
    click.echo(f"clean accuracy: {100 * report.clean_accuracy:.2f}%")
    click.echo(f"  {'eps':>10}  {'robust acc':>10}  {'success':>8}  {'max |delta|':>11}  {'time':>8}")
    for r in report.results:
        click.echo(f"  {r.eps:>10.5g}  {100 * r.robust_accuracy:>9.2f}%  {100 * r.success_rate:>7.2f}%  "
                   f"{float(r.perturbation_norms.max()) if r.n else 0.0:>11.4g}  {r.seconds:>7.2f}s")
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    for note in report.notes:
        click.echo(f"note: {note}")
    write_json({"model": label, "data": data_name, **report.to_dict(samples=True)}, json_path)


@click.command("sweep")
@click.argument("model", required=False)
@click.option("--noise", "kind", type=click.Choice(["uniform", "gaussian", "pixels", "replace"]), default="uniform",
              show_default=True, help="uniform U[-l, l], gaussian N(0, l^2), or pixels: a proportion l of pixels "
              "replaced by random grey values ('replace' is the same)")
@click.option("--levels", "levels_text", default=None,
              help="comma-separated noise levels (default: uniform 0..200/255, gaussian 0..0.8, pixels 0..0.5)")
@click.option("--draws", type=click.IntRange(min=1), default=10, show_default=True, help="noise draws per image")
@model_options
@data_options
@run_options
@executor_options
@reports_errors
def sweep(model, kind, levels_text, draws, domain_text, input_shape, trust_pickle, class_path, data, data_path,
          split, limit, layout, device, batch_size, seed, json_path, progress, scale):
    """Accuracy of MODEL under random noise at several levels, with 95% confidence intervals."""
    from ..certifiers.noise import sweep as run_sweep

    levels = parse_floats(levels_text, "--levels") if levels_text else None
    kind = "replace" if kind == "pixels" else kind
    adapter, label = load_model_arg(model, class_path, trust_pickle, input_shape)
    x, y, data_name = load_data_arg(adapter, data, data_path, split, limit, model is None, layout)
    from ..api import _sharding

    net = adapter.to_network() if scale["shards"] else None
    sharding = _sharding("sweep", net, x, y, scale["executor"], scale["workers"], scale["shard_size"], scale["shards"],
                         scale["resume"], scale["ray_address"], scale["gpus_per_worker"], progress, kind=kind,
                         levels=levels, draws=draws, seed=seed, domain=domain_text, batch_size=batch_size)
    result = run_sweep(adapter, (x, y), kind=kind, levels=levels, draws=draws, seed=seed,
                       domain=parse_domain(domain_text), batch_size=batch_size, progress=progress, sharding=sharding)
    click.echo(f"model: {label}   data: {data_name} ({len(y)} samples)   noise: {kind}, {draws} draws per image")
    click.echo(f"  {'level':>10}  {'accuracy':>9}  {'95% interval':>17}")
    for level, acc, lo, hi in zip(result.levels, result.accuracy, result.ci_low, result.ci_high):
        click.echo(f"  {level:>10.4g}  {100 * acc:>8.2f}%  [{100 * lo:6.2f}%, {100 * hi:6.2f}%]")
    click.echo(f"interval: {result.interval}")
    write_json({"model": label, "data": data_name, **result.to_dict(samples=False)}, json_path)
