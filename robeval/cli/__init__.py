"""The `robeval` command line (click). Commands are thin: parse, call the library, render."""

from __future__ import annotations

import click

from .. import __version__
from .attack import attack, sweep
from .audit import audit
from .certify import certify
from .demo import demo
from .gate import gate
from .info import info
from .verify import verify, vnncomp


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="robeval")
def main():
    """robeval: robustness evaluation and verification for image classifiers."""


main.add_command(info)
main.add_command(certify)
main.add_command(attack)
main.add_command(sweep)
main.add_command(audit)
main.add_command(gate)
main.add_command(demo)
main.add_command(verify)
main.add_command(vnncomp)

__all__ = ["main"]
