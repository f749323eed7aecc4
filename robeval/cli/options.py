"""Options shared by every command, defined once, and the parsing helpers behind them."""

from __future__ import annotations

import functools
import os

import click

from ..errors import InvalidParameterError


def parse_floats(text: str, name: str = "--eps") -> list[float]:
    """'0.01,0.05, 1/255' -> [0.01, 0.05, 0.00392...]; fractions a/b are allowed."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "/" in part:
                num, den = part.split("/", 1)
                values.append(float(num) / float(den))
            else:
                values.append(float(part))
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a number (use e.g. 0.01,0.05 or 8/255)",
                                     param_hint=name) from None
    if not values:
        raise click.BadParameter("give at least one value", param_hint=name) from None
    return values


def parse_domain(text: str | None):
    if text is None or text.lower() == "none":
        return None
    lo, _, hi = text.partition(",")
    try:
        return (float(lo), float(hi))
    except ValueError:
        raise click.BadParameter(f"{text!r}; expected LOW,HIGH such as 0,1 or 'none'", param_hint="--domain") from None


def data_options(fn):
    """--data, --data-path, --split, --limit."""

    @click.option("--data", "data", default=None,
                  help="mnist, digits, cifar10, cifar100, an image folder (one sub-folder per class), "
                  "or a .npz with arrays x and y "
                  "(default: digits for the built-in model, else mnist)")
    @click.option("--data-path", type=click.Path(), default=None,
                  help="where the data set lives (file or directory); default: $ROBEVAL_DATA, then the cache")
    @click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
    @click.option("--limit", type=click.IntRange(min=1), default=None, help="use only the first N samples")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def run_options(fn):
    """--device, --batch-size, --seed, --json, --progress/--no-progress."""

    @click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                  help="cuda runs the certifiers on CuPy")
    @click.option("--batch-size", type=click.IntRange(min=1), default=None,
                  help="samples per batch (default: chosen from the model size and $ROBEVAL_MEMORY_MB)")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
                  help="also write the full results (per-sample verdicts) as JSON to this file ('-' for stdout)")
    @click.option("--progress/--no-progress", default=None, help="progress bars (default: on a terminal)")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if kwargs.get("progress") is None:
            kwargs["progress"] = os.isatty(2)
        return fn(*args, **kwargs)

    return wrapper


def check_eps_text(eps_values: list[float]) -> list[float]:
    for e in eps_values:
        if e < 0:
            raise InvalidParameterError(f"--eps {e} is negative; every radius must be >= 0")
    return eps_values
