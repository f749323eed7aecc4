"""The `robeval` command line (click). Commands are thin: parse, call the library, render."""

from __future__ import annotations

import click

from .. import __version__
from .certify import certify
from .info import info


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="robeval")
def main():
    """robeval: robustness evaluation and verification for image classifiers."""


main.add_command(info)
main.add_command(certify)

__all__ = ["main"]
