"""What the commands share beyond options: loading the model and data, writing JSON, error exits."""

from __future__ import annotations

import functools
import json
import sys
from importlib import resources
from pathlib import Path

import click

from ..errors import RobevalError

#: Exit code for any evaluation error (a model that won't load, an unsupported op, NaN data).
EXIT_ERROR = 3


def builtin_model_path() -> Path:
    """The small digits classifier shipped with robeval (trained by scripts/train_builtin_model.py)."""
    return Path(str(resources.files("robeval") / "models" / "digits_mlp.onnx"))


def reports_errors(fn):
    """Turn a RobevalError into a one-line message and exit code 3; anything else prints its
    traceback and also exits 3, so no error path can exit 0."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except (click.ClickException, click.Abort):
            raise
        except RobevalError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_ERROR)
        except Exception:  # a bug: show it, but never exit 0
            import traceback

            traceback.print_exc()
            sys.exit(EXIT_ERROR)

    return wrapper


def load_model_arg(model: str | None, class_path: str | None = None, trust_pickle: bool = False,
                   input_shape: str | None = None):
    """The adapter for MODEL, or the built-in model when MODEL is omitted; returns (adapter, label)."""
    from ..adapters.base import load_model

    options = {}
    if class_path:
        options["model_class"] = class_path
    if trust_pickle:
        options["trust_pickle"] = True
    shape = tuple(int(d) for d in input_shape.split(",")) if input_shape else None
    if model is None:
        path = builtin_model_path()
        click.echo(f"no MODEL given: using the built-in digits classifier ({path.name})", err=True)
        return load_model(path), "builtin:digits_mlp"
    return load_model(model, input_shape=shape, **options), model


def load_data_arg(adapter, data: str | None, data_path: str | None, split: str, limit: int | None,
                  builtin: bool, layout: str | None = None):
    """The data set named by --data (a user .npz in --layout, or the layout the model's input shape
    or the array's shape decides), checked against the model's input shape; returns (x, y, name)."""
    from ..data import check_against_input_shape, load_dataset

    spec = data or ("digits" if builtin else "mnist")
    ds = load_dataset(spec, split=split, limit=limit, path=data_path, layout=layout,
                      input_shape=tuple(adapter.input_shape))
    x = check_against_input_shape(ds, adapter.input_shape, channels_last=False)
    return x, ds.y, ds.name


def write_json(payload: dict, path: str | None) -> None:
    if not path:
        return
    text = json.dumps(payload, indent=2, default=_jsonable)
    if path == "-":
        click.echo(text)
    else:
        Path(path).write_text(text + "\n")
        click.echo(f"wrote {path}", err=True)


def _jsonable(value):
    import numpy

    if isinstance(value, numpy.generic):
        return value.item()
    if isinstance(value, numpy.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
