"""`robeval gate --config robeval.toml`: robustness thresholds for CI.

Exit codes: 0 every check passes, 1 a check fails, 2 usage error (bad config or expression, and
click's own), 3 any evaluation error. The code comes from ``GateResult.exit_code`` only."""

from __future__ import annotations

from pathlib import Path

import click

from .common import reports_errors
from .options import executor_options


@click.command("gate")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default="robeval.toml", show_default=True,
              help="the TOML file with [[models]] and their checks (see docs/gate.md)")
@click.option("--baseline", type=click.Path(dir_okay=False), default=None,
              help="a report.json from `robeval audit`: every checked metric that regresses beyond --tolerance fails")
@click.option("--tolerance", type=click.FloatRange(min=0), default=None,
              help="allowed regression against the baseline (accuracy: absolute, 0.01 = one point; Lipschitz "
                   "bound: relative) [default: the config's, else 0.01]")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), default=None,
              help="write JUnit XML (one testcase per check) to this file")
@click.option("--progress/--no-progress", default=False, help="progress bars on stderr")
@executor_options(store=False)
@click.pass_context
@reports_errors
def gate(ctx, config_path, baseline, tolerance, junit_path, progress, scale):
    """Evaluate the checks in --config and exit 0 (all pass), 1 (a check fails), 2 (usage error)
    or 3 (evaluation error: missing model or data, unsupported op, NaN output). With --executor
    process or ray the models are evaluated in parallel; a model lost on every attempt is an error."""
    from ..executors import get_executor
    from ..gate import GateUsageError, load_config, run_gate

    try:
        config = load_config(config_path, baseline=baseline, tolerance=tolerance)
        executor = None if scale["executor"] is None and scale["workers"] is None else get_executor(
            scale["executor"] or "local", scale["workers"], scale["ray_address"], scale["gpus_per_worker"])
        result = run_gate(config, progress=progress, executor=executor)
    except GateUsageError as exc:
        raise click.UsageError(str(exc), ctx=ctx) from None
    for line in result.table():
        click.echo(line)
    if junit_path:
        Path(junit_path).write_text(result.to_junit(), encoding="utf-8")
        click.echo(f"wrote {junit_path}", err=True)
    ctx.exit(result.exit_code)
