"""Match a data set's sample shape to a model's input shape, transposing NCHW↔NHWC when that is enough."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputShapeError
from .datasets import SAMPLE_SHAPES, Dataset


def check_against_input_shape(
    ds: Dataset, input_shape: Sequence[int | None], channels_last: bool = False
) -> np.ndarray:
    """Return ``ds.x`` laid out as the model expects, or raise InputShapeError saying what to use instead.

    The layout named by ``channels_last`` is tried first, then the other one, so a model whose
    layout was guessed wrong still gets matching data. A 1-D input shape gets flattened samples
    (in the ``channels_last`` order) and a 2-D one (H, W) single-channel images without the channel axis.

    Args:
        ds: the data set.
        input_shape: the model's input shape per sample, e.g. (1, 28, 28) or (28, 28, 1); a 4-entry
            shape has its leading batch axis dropped; None or -1 entries match any size.
        channels_last: whether the model is believed to take NHWC input.
    Returns:
        (N, *input_shape) float32 array.

    >>> ds = Dataset(np.zeros((2, 1, 8, 8), np.float32), np.array([0, 1]), "tiny")
    >>> check_against_input_shape(ds, (None, 8, 8, 1)).shape
    (2, 8, 8, 1)
    """
    expected = tuple(input_shape)
    if len(expected) == 4:
        expected = expected[1:]
    preferred = "NHWC" if channels_last else "NCHW"
    for layout in (preferred, "NCHW" if channels_last else "NHWC"):
        x = ds.to_layout(layout).x
        if _matches(x.shape[1:], expected):
            return x
    x = ds.to_layout(preferred).x
    if len(expected) == 1 and _matches((x[0].size,), expected):
        return x.reshape(len(x), -1)
    nchw = ds.to_layout("NCHW").x
    if len(expected) == 2 and nchw.shape[1] == 1 and _matches(nchw.shape[2:], expected):
        return nchw[:, 0]
    raise InputShapeError(
        f"data {ds.name!r} have shape {tuple(ds.x.shape)}, per sample {tuple(ds.x.shape[1:])} "
        f"({ds.layout}); the model expects {_fmt(expected)} per sample; {_hint(expected)}"
    )


def _matches(shape: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    return len(shape) == len(expected) and all(e in (None, -1) or e == s for s, e in zip(shape, expected))


def _fmt(shape: tuple[int | None, ...]) -> str:
    inner = ", ".join("?" if s in (None, -1) else str(s) for s in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


def _hint(expected: tuple[int | None, ...]) -> str:
    """Name a built-in data set whose samples fit, if there is one."""
    for name, (c, h, w) in SAMPLE_SHAPES.items():
        candidates = [(c, h, w), (h, w, c), (c * h * w,)] + ([(h, w)] if c == 1 else [])
        if any(_matches(s, expected) for s in candidates):
            return f"use --data {name} (samples of shape {(c, h, w)}) or a data set of the right size"
    return "use a data set of the right size, or resize the images to fit the model"
