"""Turn raw image and label arrays into checked float32 NCHW images and int64 labels.

One place decides how raw data become model inputs, so every data source (built-in, IDX, user
``.npz``) gets the same scaling rule and the same error messages:

- ``uint8`` pixels 0..255 map linearly onto ``value_range`` (``x / 255`` for the default [0, 1]);
- float data must already lie in ``value_range`` and be finite (no silent rescaling or clipping);
- 3-D ``(N, H, W)`` data get a channel axis; 4-D data are NCHW or NHWC: given, decided by the
  model's input shape, or detected from the shape (:func:`detect_layout`), and refused with the fix
  when the shape could be either.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import DataRangeError, InputShapeError, InvalidParameterError

LAYOUTS = ("NCHW", "NHWC")


def check_layout(layout: Any, what: str = "layout") -> str:
    """Return ``layout`` if it is "NCHW" or "NHWC", else raise InvalidParameterError."""
    if layout not in LAYOUTS:
        raise InvalidParameterError(f"{what}={layout!r}; expected one of {', '.join(map(repr, LAYOUTS))}")
    return layout


def check_value_range(value_range: Any) -> tuple[float, float]:
    """Return ``value_range`` as ``(lo, hi)`` floats with ``lo < hi``, both finite."""
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise InvalidParameterError(
            f"value_range={value_range!r}; expected two numbers (lo, hi), e.g. (0.0, 1.0)"
        ) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise InvalidParameterError(
            f"value_range={value_range!r}; expected finite numbers with lo < hi, e.g. (0.0, 1.0)"
        )
    return lo, hi


def check_values(x: np.ndarray, value_range: tuple[float, float], source: str) -> None:
    """Raise DataRangeError if ``x`` has NaN/inf or values outside ``value_range``."""
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise DataRangeError(
            f"{source} has {bad} NaN/inf value(s) out of {x.size}; expected finite values in "
            f"[{value_range[0]}, {value_range[1]}]; remove those samples or replace the values "
            f"(e.g. np.nan_to_num(x))"
        )
    if x.size == 0:
        return
    lo, hi = float(x.min()), float(x.max())
    if lo < value_range[0] or hi > value_range[1]:
        wide = (min(lo, value_range[0]), max(hi, value_range[1]))  # a valid range that holds the data
        raise DataRangeError(
            f"{source} has values in [{lo:g}, {hi:g}]; expected [{value_range[0]:g}, {value_range[1]:g}]; "
            f"if these are 0..255 pixel values divide by 255 (or store them as uint8), or pass "
            f"value_range=({wide[0]:g}, {wide[1]:g}) if the model takes inputs in that range"
        )


#: Channel counts that mark an axis as the channel axis: grey and RGB.
CHANNELS = (1, 3)


def layout_candidates(shape: tuple[int, ...]) -> tuple[str, ...]:
    """The layouts a 4-D shape can plausibly have: the one whose channel axis holds 1 or 3 entries
    while the other's does not; failing that, the one whose two image axes are equal (square images)."""
    first, last = shape[1] in CHANNELS, shape[3] in CHANNELS
    if first != last:
        return ("NCHW",) if first else ("NHWC",)
    if first:  # both ends look like channels: (N, 3, 5, 3)
        return LAYOUTS
    square = tuple(layout for layout, (h, w) in (("NCHW", shape[2:]), ("NHWC", shape[1:3])) if h == w)
    return square if len(square) == 1 else LAYOUTS


def detect_layout(shape: tuple[int, ...], input_shape=None, source: str = "the images") -> str:
    """The layout of a 4-D shape; ``input_shape``, the model's per-sample (C, H, W), decides first
    (when it is clearly channels first and exactly one reading of ``shape`` matches it).

    Raises InputShapeError, naming both readings and the fix, when neither the model nor the shape
    decides (e.g. (5, 3, 8, 3): 3 channels of 8x3, or 3x8 images of 3 channels).

    >>> detect_layout((5, 28, 28, 1)), detect_layout((5, 1, 28, 28)), detect_layout((5, 8, 16, 16))
    ('NHWC', 'NCHW', 'NCHW')
    >>> detect_layout((5, 3, 8, 3), input_shape=(3, 3, 8))
    'NHWC'
    """
    shape = tuple(int(d) for d in shape)
    want = tuple(int(d) for d in input_shape)[-3:] if input_shape is not None else ()
    if len(want) == 3 and layout_candidates((1, *want)) == ("NCHW",):  # a model clearly taking (C, H, W)
        fits = [layout for layout, per in (("NCHW", shape[1:]), ("NHWC", (shape[3], shape[1], shape[2])))
                if per == want]
        if len(fits) == 1:
            return fits[0]
    found = layout_candidates(shape)
    if len(found) == 1:
        return found[0]
    _, a, b, c = shape
    raise InputShapeError(
        f"{source} has shape {shape}, which could be NCHW ({a} channel(s) of {b}x{c}) or NHWC ({c} channel(s) "
        f"of {a}x{b}); say which: layout='NCHW' or layout='NHWC' (load_dataset(..., layout=...)), or --layout "
        "NCHW|NHWC on the command line")


def to_images(
    x: Any,
    source: str,
    value_range: tuple[float, float] = (0.0, 1.0),
    layout: str | None = None,
    max_value: int = 255,
    input_shape=None,
) -> np.ndarray:
    """Scale and reshape raw images into a float32 NCHW array with values in ``value_range``.

    Args:
        x: (N, H, W), (N, C, H, W) or (N, H, W, C) array; uint8 (0..``max_value``) or float.
        source: what ``x`` is, for error messages (e.g. "x_test in data.npz").
        value_range: (lo, hi) the model's input domain; uint8 data are mapped onto it.
        layout: layout of 4-D ``x``; None detects it with :func:`detect_layout`.
        max_value: the integer value that maps to ``hi`` (255 for pixels, 16 for sklearn digits).
        input_shape: the model's per-sample input shape (C, H, W), used to decide the layout of 4-D
            ``x`` when ``layout`` is None.
    Returns:
        (N, C, H, W) float32 array.
    """
    x = np.asarray(x)
    if x.ndim == 4:  # the layout first: an ambiguous shape is refused before any scaling work
        layout = detect_layout(x.shape, input_shape, source) if layout is None else check_layout(layout)
    x = _scale(x, source, value_range, max_value)
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim == 4:
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if layout == "NHWC" else x
    hint = ""
    if x.ndim == 2 and math.isqrt(x.shape[1]) ** 2 == x.shape[1]:
        side = math.isqrt(x.shape[1])
        hint = f"; if these are flattened square images reshape them: x.reshape(-1, {side}, {side})"
    raise InputShapeError(
        f"{source} has shape {tuple(x.shape)}; expected (N, H, W), (N, C, H, W) or (N, H, W, C){hint}"
    )


def _scale(x: np.ndarray, source: str, value_range: tuple[float, float], max_value: int) -> np.ndarray:
    """uint8 → float32 mapped onto value_range; float → checked and cast to float32."""
    lo, hi = value_range
    if x.dtype == np.uint8:
        top = int(x.max()) if x.size else 0
        if top > max_value:
            raise DataRangeError(f"{source} has integer values up to {top}; expected 0..{max_value}")
        out = x.astype(np.float32)
        out /= np.float32(max_value)
        if (lo, hi) != (0.0, 1.0):  # clip: lo + 1.0 * (hi - lo) may round one ulp past hi
            out = np.clip(lo + out * np.float32(hi - lo), lo, hi).astype(np.float32)
        return out
    if np.issubdtype(x.dtype, np.floating):
        check_values(x, value_range, source)
        return x.astype(np.float32, copy=False)
    raise DataRangeError(
        f"{source} has dtype {x.dtype}; expected uint8 pixels (0..255, scaled by 1/255) or floats in "
        f"[{lo:g}, {hi:g}]; convert with x.astype(np.uint8) or x.astype(np.float32) / 255"
    )


def check_samples(n_x: int, n_y: int, source: str) -> None:
    """The one data check every command and API entry point passes through: at least one sample,
    and exactly one label per input (checked on the whole file, before any --limit is applied)."""
    if n_x != n_y:
        raise InputShapeError(f"{source} has {n_x} inputs but {n_y} labels; expected one label per input: "
                              "fix the file so that x and y have the same length")
    if n_x == 0:
        raise InputShapeError(f"{source} holds no samples (0 inputs); pass a data set with at least one sample")


def to_labels(y: Any, n: int, source: str) -> np.ndarray:
    """Check class labels and return them as a 1-D int64 array of length ``n``."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n:
        fix = "; for one-hot labels use y.argmax(axis=1)" if y.ndim == 2 else ""
        raise InputShapeError(
            f"{source} has shape {tuple(y.shape)}; expected ({n},), one label per image{fix}"
        )
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise DataRangeError(f"{source} has non-integer labels; expected class indices 0, 1, 2, ...")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataRangeError(f"{source} has dtype {y.dtype}; expected integer class indices")
    if n and y.min() < 0:
        raise DataRangeError(
            f"{source} has a negative label ({y.min()}); expected class indices 0, 1, 2, ..."
        )
    return y.astype(np.int64)
