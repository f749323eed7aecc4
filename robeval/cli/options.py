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
    """--data, --data-path, --split, --limit, --layout."""

    @click.option("--data", "data", default=None,
                  help="mnist, digits, cifar10, cifar100, an image folder (one sub-folder per class), "
                  "or a .npz with arrays x and y "
                  "(default: digits for the built-in model, else mnist)")
    @click.option("--data-path", type=click.Path(), default=None,
                  help="where the data set lives (file or directory); default: $ROBEVAL_DATA, then the cache")
    @click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
    @click.option("--limit", type=click.IntRange(min=1), default=None, help="use only the first N samples")
    @click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default=None,
                  help="axis order of 4-D images in a .npz (default: decided by the model's input shape or the "
                  "array's shape; an ambiguous shape such as (N, 3, 8, 3) is refused)")
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


def executor_options(fn=None, *, store: bool = True):
    """--executor, --workers, --ray-address, --gpus-per-worker and (with ``store``) --shard-size,
    --shards DIR, --resume DIR; packed into one ``scale`` dict argument (see robeval.executors)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            scale = {key: kwargs.pop(key) for key in ("executor", "workers", "ray_address", "gpus_per_worker")}
            if store:
                shards, resume = kwargs.pop("shards_dir"), kwargs.pop("resume_dir")
                if shards and resume and os.path.abspath(shards) != os.path.abspath(resume):
                    raise click.UsageError(f"--shards {shards} and --resume {resume} name different folders; "
                                           "pass only --resume DIR to continue a run")
                scale.update(shard_size=kwargs.pop("shard_size"), shards=resume or shards, resume=bool(resume))
            if scale["ray_address"] and scale["executor"] not in (None, "ray"):
                raise click.UsageError(f"--ray-address needs --executor ray (got --executor {scale['executor']})")
            if scale["ray_address"] and scale["executor"] is None:
                scale["executor"] = "ray"
            return fn(*args, scale=scale, **kwargs)

        opts = [
            click.option("--executor", type=click.Choice(["local", "process", "ray"]), default=None,
                         help="run the work in shards: local (this process), process (a local process pool) or "
                              "ray (a local Ray, or --ray-address); default: one pass in this process"),
            click.option("--workers", type=click.IntRange(min=1), default=None,
                         help="shards at once (default: one per CPU core / the cluster's CPUs)"),
            click.option("--ray-address", default=None,
                         help="an existing Ray cluster, e.g. ray://head:10001 or auto (implies --executor ray)"),
            click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
                         help="GPUs each Ray task asks for, so CuPy work (--device cuda) lands on GPU nodes"),
        ]
        if store:
            opts += [
                click.option("--shard-size", type=click.IntRange(min=1), default=None,
                             help="samples per shard (default 1000; rounded up to a multiple of --batch-size)"),
                click.option("--shards", "shards_dir", type=click.Path(file_okay=False), default=None,
                             help="write every finished shard and a manifest to this new folder (resumable)"),
                click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
                             help="continue the run kept in this folder: only the missing shards run"),
            ]
        for opt in reversed(opts):
            wrapper = opt(wrapper)
        return wrapper

    return decorate(fn) if fn is not None else decorate
