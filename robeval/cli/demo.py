"""`robeval demo [--out DIR] [--quick]`: train a plain and a robust model offline, audit both, compare."""

from __future__ import annotations

import click

from .common import reports_errors


@click.command("demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="robeval-demo", show_default=True,
              help="folder for the models, both reports and summary.md")
@click.option("--quick", is_flag=True, help="tiny training and audit (seconds; for smoke tests)")
@click.option("--data", type=click.Choice(["auto", "digits", "mnist"]), default="auto", show_default=True,
              help="auto: MNIST when already on disk ($ROBEVAL_DATA or the cache) and not --quick, else digits")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--progress/--no-progress", default=False, help="progress bars on stderr")
@reports_errors
def demo(out_dir, quick, data, seed, progress):
    """Train a plain and an IBP-trained classifier (scikit-learn's 8x8 digits, offline; MNIST when
    found locally), audit both and print how they compare: clean, PGD and certified accuracy."""
    from ..demo import run_demo

    result = run_demo(out_dir, quick=quick, data=data, seed=seed, progress=progress,
                      log=lambda line: click.echo(line, err=True))
    for line in result.summary():
        click.echo(line)
