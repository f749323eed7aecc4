"""Find, read and (optionally) download MNIST as raw uint8 arrays.

Two file formats are read: the Keras ``mnist.npz`` (arrays ``x_train`` 60000×28×28 uint8,
``y_train``, ``x_test``, ``y_test``) and the original IDX files (``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, each
optionally ``.gz``; the ``.idx3-ubyte`` spelling of some mirrors works too).

Search order, first hit wins:

1. ``path=`` (a file or a directory). When given it is the only place looked at, so that a typo
   fails loudly instead of silently picking up another copy.
2. ``$ROBEVAL_DATA`` (a file or a directory).
3. The cache directory: ``$ROBEVAL_CACHE``, else ``$XDG_CACHE_HOME/robeval``, else ``~/.cache/robeval``.
4. Only when ``download=True``: :data:`MNIST_URL` is downloaded into the cache directory and its
   SHA-256 checked before it is moved into place.

In every directory the files are looked for in the directory itself and in its ``mnist/`` and
``MNIST/raw/`` (torchvision's layout) subfolders.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
import tempfile
import urllib.request
import zipfile
from math import prod
from pathlib import Path

import numpy as np

from ..errors import DataNotFoundError, InputShapeError, RobevalError

log = logging.getLogger(__name__)

MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
# Accepted SHA-256 digests of mnist.npz. Keras pins 731c5ac6... for the file at MNIST_URL
# (keras/datasets/mnist.py, `file_hash=`). Our reference copy (shared/data/mnist.npz, also found on
# course mirrors) has the same arrays and shapes but different bytes, hence 06af5dfe...; either is
# accepted so that a mirror serving that copy also verifies.
MNIST_SHA256 = (
    "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
    "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64",
)
NPZ_NAME = "mnist.npz"
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SUBDIRS = (".", "mnist", "MNIST/raw")
# IDX type byte → big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def cache_dir() -> Path:
    """robeval's cache directory: $ROBEVAL_CACHE, else $XDG_CACHE_HOME/robeval, else ~/.cache/robeval."""
    if os.environ.get("ROBEVAL_CACHE"):
        return Path(os.environ["ROBEVAL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "robeval"


def load_mnist(
    split: str, path: str | os.PathLike | None = None, download: bool = True
) -> tuple[np.ndarray, np.ndarray, str]:
    """Find MNIST (see the module docstring for the search order) and read one split.

    Returns:
        images (N, 28, 28) uint8, labels (N,) integers, and the file(s) they came from.
    """
    places = [("path=", Path(path).expanduser())] if path is not None else _default_places()
    looked = []
    for label, place in places:
        if place is None:
            looked.append(f"{label.rstrip('=')}: not set")
            continue
        found = _find_in(place, split)
        if found is not None:
            return (*_read(found, split), " + ".join(map(str, found)))
        looked.append(f"{label}{place}" + ("" if place.exists() else " (does not exist)"))
    if path is not None or not download:
        why = "not tried (path= given)" if path is not None else "disabled (download=False)"
        looked.append(f"download: {why}")
        raise DataNotFoundError(_not_found_message(split, looked))
    try:
        target = download_mnist(cache_dir())
    except OSError as e:  # includes urllib.error.URLError
        looked.append(f"download: {MNIST_URL} failed: {e}")
        raise DataNotFoundError(_not_found_message(split, looked)) from e
    return (*_read((target,), split), str(target))


def _default_places() -> list[tuple[str, Path | None]]:
    env = os.environ.get("ROBEVAL_DATA")
    return [("$ROBEVAL_DATA=", Path(env).expanduser() if env else None), ("cache: ", cache_dir())]


def _find_in(place: Path, split: str) -> tuple[Path, ...] | None:
    """The mnist.npz or the (images, labels) IDX pair for ``split`` at ``place``, or None."""
    if place.is_file():
        if place.suffix == ".npz":
            return (place,)
        place = place.parent  # an IDX file: look for its partner next to it
    if not place.is_dir():
        return None
    for sub in SUBDIRS:
        d = place / sub
        if (d / NPZ_NAME).is_file():
            return (d / NPZ_NAME,)
        pair = tuple(_idx_file(d, stem) for stem in IDX_STEMS[split])
        if all(pair):
            return pair
    return None


def _idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem.replace("-idx", ".idx")):
        for suffix in ("", ".gz"):
            if (directory / (name + suffix)).is_file():
                return directory / (name + suffix)
    return None


def _not_found_message(split: str, looked: list[str]) -> str:
    images, labels = IDX_STEMS[split]
    return "\n".join(
        [
            f"MNIST ({split} split) not found; looked for {NPZ_NAME} or {images}[.gz] + {labels}[.gz] "
            f"(also in the subfolders {', '.join(SUBDIRS[1:])}) in:",
            *(f"  - {line}" for line in looked),
            "provide it in one of three ways:",
            "  - pass its location: load_dataset('mnist', path='DIR_OR_mnist.npz')",
            "  - set the environment variable ROBEVAL_DATA=DIR (a folder holding mnist.npz or the IDX files)",
            f"  - allow the download (download=True) of {MNIST_URL} into {cache_dir()}",
        ]
    )


def _read(found: tuple[Path, ...], split: str) -> tuple[np.ndarray, np.ndarray]:
    if len(found) == 1:
        x, y = _read_npz(found[0], split)
    else:
        x, y = read_idx(found[0]), read_idx(found[1])
    source = " + ".join(map(str, found))
    if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
        raise InputShapeError(f"MNIST images in {source} have shape {x.shape}, dtype {x.dtype}; "
                              f"expected (N, 28, 28) uint8; the file is not MNIST or is corrupt")
    if y.shape != (len(x),):
        raise InputShapeError(f"MNIST labels in {source} have shape {y.shape}; expected ({len(x)},)")
    return x, y


def _read_npz(file: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as f:
            keys = (f"x_{split}", f"y_{split}")
            if not all(k in f.files for k in keys):
                raise DataNotFoundError(f"{file} has arrays {sorted(f.files)}; expected {keys[0]} and "
                                        f"{keys[1]} as in Keras' mnist.npz")
            return f[keys[0]], f[keys[1]]
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise RobevalError(
            f"{file} is not a readable .npz file ({e}); delete it and download it again"
        ) from e


def read_idx(file: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a native-endian numpy array of its stored shape."""
    file = Path(file)
    try:
        with (gzip.open if file.name.endswith(".gz") else open)(file, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError) as e:
        raise RobevalError(f"{file} is not a readable gzip file ({e}); decompress or replace it") from e
    if len(data) < 4 or data[0] or data[1] or data[2] not in _IDX_DTYPES:
        raise RobevalError(
            f"{file} does not start with an IDX header (00 00 type ndim); it is not an IDX file"
        )
    ndim, dtype = data[3], np.dtype(_IDX_DTYPES[data[2]])
    start = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:start]) if len(data) >= start else ()
    if len(data) != start + prod(dims) * dtype.itemsize:
        raise RobevalError(f"{file} has {len(data)} bytes; its IDX header {dims} needs "
                           f"{start + prod(dims) * dtype.itemsize}; the file is truncated or corrupt")
    return np.frombuffer(data, dtype, offset=start).reshape(dims).astype(dtype.newbyteorder("="))


def download_mnist(directory: Path) -> Path:
    """Download :data:`MNIST_URL` to ``directory/mnist.npz``, verifying its SHA-256.

    The bytes go to a temporary file in ``directory`` first and are renamed into place only after the
    digest matches one of :data:`MNIST_SHA256`, so an interrupted or corrupted download never leaves
    a ``mnist.npz`` behind. Network errors propagate as ``urllib.error.URLError``/``OSError``.
    """
    url, accepted = MNIST_URL, MNIST_SHA256  # read at call time so tests can point them elsewhere
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / NPZ_NAME
    log.info("downloading %s to %s", url, target)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{NPZ_NAME}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() not in accepted:
            raise RobevalError(
                f"the file downloaded from {url} has SHA-256 {digest.hexdigest()}; expected "
                f"{' or '.join(accepted)}; it was corrupted in transit or changed upstream and has been "
                f"deleted; try again, or download it yourself and pass path= or set ROBEVAL_DATA"
            )
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
