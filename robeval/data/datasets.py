"""The :class:`Dataset` container and :func:`load_dataset`: a built-in data set by name, or a user ``.npz``.

Built-in data sets (:data:`DATASETS`):

- ``"mnist"``: 28×28 handwritten digits, 60,000 train / 10,000 test, found or downloaded as
  described in :mod:`robeval.data.mnist`.
- ``"digits"``: scikit-learn's 8×8 digits (1,797 images, shipped with scikit-learn, no download).
  The split is deterministic and not stratified: ``"train"`` is the first 1,347 samples and
  ``"test"`` the last 450, the same 75/25 proportion as ``train_test_split``'s default.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataNotFoundError, DataRangeError, InputShapeError, InvalidParameterError, RobevalError
from .arrays import check_layout, check_samples, check_value_range, check_values, to_images, to_labels
from .mnist import load_mnist

DATASETS = ("mnist", "digits", "cifar10", "cifar100")
SPLITS = ("train", "test")
SAMPLE_SHAPES = {"mnist": (1, 28, 28), "digits": (1, 8, 8),  # per sample, NCHW
                 "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}  # per sample, NCHW
DIGITS_TRAIN = 1347  # sklearn digits: samples [0, 1347) are "train", [1347, 1797) "test"


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images and their labels, checked once so that certifiers and attacks can trust them.

    Attributes:
        x: (N, C, H, W) float32 images (N, H, W, C when ``layout="NHWC"``), finite, in ``value_range``.
        y: (N,) int64 class indices.
        name: a short name for reports, e.g. "mnist:test".
        layout: "NCHW" or "NHWC", the axis order of ``x``.
        value_range: (lo, hi) the input domain; attacks clip to it.

    >>> ds = Dataset(np.zeros((2, 1, 8, 8), np.float32), np.array([3, 5]), "zeros")
    >>> len(ds), ds.to_layout("NHWC").x.shape
    (2, (2, 8, 8, 1))
    """

    x: np.ndarray
    y: np.ndarray
    name: str
    layout: str = "NCHW"
    value_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        check_layout(self.layout)
        value_range = check_value_range(self.value_range)
        x = np.asarray(self.x)
        if x.ndim != 4:
            raise InputShapeError(
                f"Dataset {self.name!r}: x has shape {tuple(x.shape)}; expected 4-D {self.layout}; "
                f"load raw (N, H, W) arrays with robeval.data.to_images(x, source)"
            )
        if not np.issubdtype(x.dtype, np.floating):
            raise DataRangeError(
                f"Dataset {self.name!r}: x has dtype {x.dtype}; expected float32 in {value_range}; "
                f"for uint8 pixels use x.astype(np.float32) / 255"
            )
        check_samples(len(x), len(self.y) if np.ndim(self.y) else 0, f"Dataset {self.name!r}")
        check_values(x, value_range, f"Dataset {self.name!r}: x")
        object.__setattr__(self, "x", x.astype(np.float32, copy=False))
        object.__setattr__(self, "y", to_labels(self.y, len(x), f"Dataset {self.name!r}: y"))
        object.__setattr__(self, "value_range", value_range)

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:  # shapes, not a screenful of pixel values
        return (
            f"Dataset(name={self.name!r}, x={self.x.dtype}{self.x.shape}, y={self.y.dtype}{self.y.shape}, "
            f"layout={self.layout!r}, value_range={self.value_range})"
        )

    def subset(self, limit: int) -> Dataset:
        """The first ``limit`` samples (all of them when there are fewer)."""
        limit = check_limit(limit)
        return replace(self, x=self.x[:limit], y=self.y[:limit])

    def to_layout(self, layout: str) -> Dataset:
        """The same data with ``x`` in ``layout`` ("NCHW" or "NHWC"); ``self`` if already there."""
        if check_layout(layout) == self.layout:
            return self
        axes = (0, 2, 3, 1) if layout == "NHWC" else (0, 3, 1, 2)
        return replace(self, x=np.ascontiguousarray(self.x.transpose(axes)), layout=layout)


def check_split(split: Any) -> str:
    """Return ``split`` if it is "train" or "test", else raise InvalidParameterError."""
    if split not in SPLITS:
        raise InvalidParameterError(f"split={split!r}; expected one of {', '.join(map(repr, SPLITS))}")
    return split


def check_limit(limit: Any) -> int:
    """Return ``limit`` if it is a positive int, else raise InvalidParameterError."""
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise InvalidParameterError(
            f"limit={limit!r}; expected a positive integer (the number of samples to use), or None for all"
        )
    return int(limit)


def load_dataset(
    spec: str | os.PathLike,
    split: str = "test",
    limit: int | None = None,
    path: str | os.PathLike | None = None,
    layout: str | None = None,
    download: bool = True,
    value_range: tuple[float, float] = (0.0, 1.0),
    input_shape=None,
) -> Dataset:
    """Load a built-in data set by name, or a user ``.npz`` file, as an NCHW :class:`Dataset`.

    Args:
        spec: "mnist", "digits", or the path of a ``.npz`` with arrays ``x`` and ``y`` (or
            ``x_test``/``y_test`` and ``x_train``/``y_train``, used in preference for that split).
            Built-in names win over files of the same name; write "./mnist" for such a file.
        split: "train" or "test".
        limit: keep only the first ``limit`` samples (None: all).
        path: where to find a built-in data set (a file or directory); see :mod:`robeval.data.mnist`.
        layout: axis order of 4-D arrays in a user ``.npz`` ("NCHW" or "NHWC"); None decides it from
            ``input_shape``, else from the shape (channel axis of 1 or 3, else square images), and
            raises InputShapeError when the shape could be either (e.g. (N, 3, 8, 3)).
            The result is always NCHW; use ``.to_layout("NHWC")`` for channels-last models.
        download: for "mnist", download it into the cache when it is found nowhere else.
        value_range: the model's input domain; uint8 pixels are mapped onto it, float data must
            already lie in it.
        input_shape: the model's per-sample input shape (C, H, W); it decides the layout of a user
            ``.npz`` whose shape fits the model in one reading only.
    Returns:
        A Dataset with x (N, C, H, W) float32 and y (N,) int64.

    >>> ds = load_dataset("digits", split="test", limit=100)
    >>> ds.x.shape, float(ds.x.max()) <= 1.0, ds.name
    ((100, 1, 8, 8), True, 'digits:test')
    """
    check_split(split)
    stop = None if limit is None else check_limit(limit)
    value_range = check_value_range(value_range)
    if layout is not None:
        check_layout(layout)
    name = spec.lower() if isinstance(spec, str) else None
    if name in DATASETS:
        if layout is not None:
            raise InvalidParameterError(
                f"layout={layout!r} describes the arrays of a user .npz file; {name!r} has a known layout; "
                f"for channels-last data use load_dataset({name!r}).to_layout('NHWC')"
            )
        if name == "mnist":
            x, y, _ = load_mnist(split, path=path, download=download)
            max_value = 255
        elif name.startswith("cifar"):
            from .cifar import load_cifar

            x, y, _ = load_cifar(name, split, path=path, download=download)
            max_value = 255
        else:
            x, y = _load_digits(split)
            max_value = 16
        x = to_images(x[:stop], f"{name} ({split})", value_range, max_value=max_value)
        y = to_labels(y[:stop], len(x), f"{name} labels")
        return Dataset(x, y, f"{name}:{split}", "NCHW", value_range)
    if path is not None:
        raise InvalidParameterError(
            f"path={path!r} tells robeval where to find a built-in data set ({', '.join(DATASETS)}); "
            f"for your own file pass it as the data set itself: load_dataset('data.npz')"
        )
    if Path(spec).is_dir():
        from .folders import load_folder

        x, y, _, folder_name = load_folder(Path(spec), split)
        images = to_images(x[:stop], f"images under {spec}", value_range, layout="NHWC")
        return Dataset(images, to_labels(y[:stop], len(images), f"labels of {spec}"), folder_name, "NCHW", value_range)
    return _load_npz(Path(spec), split, stop, layout, value_range, input_shape)


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataNotFoundError(
            "the 'digits' data set comes with scikit-learn, which is not installed; "
            "pip install scikit-learn (or robeval[demo]), or use 'mnist'"
        ) from e
    digits = load_digits()
    part = slice(None, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
    return digits.images[part].astype(np.uint8), digits.target[part]  # images hold integers 0..16


def _load_npz(file: Path, split: str, stop: int | None, layout: str | None, value_range,
              input_shape=None) -> Dataset:
    if file.suffix != ".npz" and not file.exists():
        raise InvalidParameterError(
            f"unknown data set {str(file)!r}; expected one of {', '.join(map(repr, DATASETS))} "
            f"or the path of a .npz file with arrays x and y"
        )
    if not file.is_file():
        raise DataNotFoundError(f"no file at {file} (resolved: {file.resolve()}); check the path")
    try:
        with np.load(file, allow_pickle=False) as f:
            keys = _pick_keys(f.files, file, split)
            x, y = f[keys[0]], f[keys[1]]
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise RobevalError(
            f"{file} is not a readable .npz file ({e}); save your arrays with np.savez(path, x=x, y=y)"
        ) from e
    check_samples(len(x) if x.ndim else 0, len(y) if y.ndim else 0, f"{file} ({keys[0]}, {keys[1]})")
    x, y = x[:stop], y[:stop]
    images = to_images(x, f"{keys[0]} in {file}", value_range, layout=layout, input_shape=input_shape)
    labels = to_labels(y, len(images), f"{keys[1]} in {file}")
    name = file.stem + (f":{split}" if keys[0] != "x" else "")
    return Dataset(images, labels, name, "NCHW", value_range)


def _pick_keys(files: list[str], file: Path, split: str) -> tuple[str, str]:
    for keys in ((f"x_{split}", f"y_{split}"), ("x", "y")):
        if all(k in files for k in keys):
            return keys
    other = SPLITS[1 - SPLITS.index(split)]
    hint = f"; it holds the {other} split: pass split={other!r}" if f"x_{other}" in files else ""
    raise DataNotFoundError(
        f"{file} has arrays {sorted(files)}; expected x and y, or x_{split} and y_{split} for "
        f"split={split!r}{hint}"
    )
