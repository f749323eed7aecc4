"""CIFAR-10 and CIFAR-100 from the official python tarball (read safely) or a .npz.

Looked for, in this order (first hit wins): ``path=`` (the tarball, its extracted folder, a folder
holding either, or a .npz with x_train/y_train/x_test/y_test); ``$ROBEVAL_DATA``; the cache
directory (:func:`robeval.data.mnist.cache_dir`); and, with ``download=True``, a download of the
official tarball into the cache, its MD5 (the checksum the CIFAR page publishes) verified by pooch.

Batch files are unpickled with :mod:`robeval.data.safe_pickle` only: no code in a data file runs.
The tarball is read member by member in memory, never extracted."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np

from ..errors import DataNotFoundError, RobevalError
from .mnist import cache_dir
from .safe_pickle import safe_loads

#: name -> (tarball file, folder inside it, train members, test members, label key, classes, url, md5);
#: the MD5s are the "python version" rows of https://www.cs.toronto.edu/~kriz/cifar.html (checked against it).
SOURCES = {
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels", 10,
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ("train",), ("test",), b"fine_labels", 100,
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}


def load_cifar(name: str, split: str, path=None, download: bool = True) -> tuple[np.ndarray, np.ndarray, str]:
    """(images (N, 3, 32, 32) uint8, labels (N,) int64, where they came from) for one split."""
    tarball, folder = SOURCES[name][0], SOURCES[name][1]
    places = [("path=", Path(path).expanduser())] if path is not None else _default_places()
    looked = []
    for label, place in places:
        if place is None:
            looked.append(f"{label.rstrip('=')}: not set")
            continue
        found = _find(place, tarball, folder)
        if found is not None:
            return (*read_cifar(found, name, split), str(found))
        looked.append(f"{label}{place}" + ("" if place.exists() else " (does not exist)"))
    if path is None and download:
        target = _download(name, looked)
        return (*read_cifar(target, name, split), str(target))
    looked.append("download: " + ("not tried (path= given)" if path is not None else "disabled (download=False)"))
    raise DataNotFoundError(f"{name} ({split}) not found; looked at: {'; '.join(looked)}; pass --data-path to "
                            f"{tarball} or its extracted {folder}/ folder, or set $ROBEVAL_DATA")


def _default_places():
    env = os.environ.get("ROBEVAL_DATA")
    return [("$ROBEVAL_DATA=", Path(env).expanduser() if env else None), ("cache: ", cache_dir())]


def _find(place: Path, tarball: str, folder: str) -> Path | None:
    """The tarball, extracted folder or .npz at ``place`` (a file, or a directory holding one)."""
    if place.is_file():
        return place if place.suffix == ".npz" or place.name.endswith((".tar.gz", ".tgz", ".tar")) else None
    if not place.is_dir():
        return None
    if place.name == folder:
        return place
    for candidate in (place / folder, place / tarball, place / "cifar" / folder, place / "cifar" / tarball):
        if candidate.exists():
            return candidate
    return None


def read_cifar(source: Path, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one split from a tarball, an extracted folder or a .npz."""
    if source.suffix == ".npz":
        return _read_npz(source, split)
    _, folder, train, test, label_key, classes = SOURCES[name][:6]
    members = train if split == "train" else test
    blobs = _read_members(source, folder, members)
    parts = [_batch(safe_loads(blob, f"{source}:{member}"), f"{source}:{member}", label_key, classes)
             for member, blob in zip(members, blobs)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read_members(source: Path, folder: str, members) -> list[bytes]:
    if source.is_dir():
        missing = [m for m in members if not (source / m).is_file()]
        if missing:
            raise DataNotFoundError(f"{source} lacks {missing}; it is not a complete {folder}/ folder")
        return [(source / m).read_bytes() for m in members]
    try:
        with tarfile.open(source) as tar:
            out = []
            for m in members:
                try:
                    info = tar.getmember(f"{folder}/{m}")
                except KeyError:
                    raise DataNotFoundError(f"{source} has no {folder}/{m}; it is not the official tarball") from None
                if not info.isfile():
                    raise RobevalError(f"{source}: {folder}/{m} is not a regular file")
                out.append(tar.extractfile(info).read())
            return out
    except tarfile.TarError as exc:
        raise RobevalError(f"{source} is not a readable tar archive ({exc}); download it again") from None


def _batch(d, source: str, label_key: bytes, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Check a batch dict's data (N, 3072) uint8 and labels 0..classes-1; images as (N, 3, 32, 32)."""
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise RobevalError(f"{source} holds {keys}; expected a dict with b'data' and {label_key!r}")
    x, y = d[b"data"], np.asarray(d[label_key])
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise RobevalError(f"{source}: data are {getattr(x, 'dtype', type(x))}{getattr(x, 'shape', '')}; "
                           "expected uint8 of shape (N, 3072)")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (y.size and (y.min() < 0 or
                                                                                       y.max() >= classes)):
        raise RobevalError(f"{source}: labels have shape {y.shape}; expected {len(x)} integers in 0..{classes - 1}")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _read_npz(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(source, allow_pickle=False) as f:
        keys = (f"x_{split}", f"y_{split}")
        if not all(k in f.files for k in keys):
            raise DataNotFoundError(f"{source} has arrays {sorted(f.files)}; expected {keys[0]} and {keys[1]}")
        return f[keys[0]], f[keys[1]]


def _download(name: str, looked: list[str]) -> Path:
    tarball, _, _, _, _, _, url, md5 = SOURCES[name]
    try:
        import pooch
    except ImportError:
        looked.append("download: needs pooch (pip install pooch, or robeval[data])")
        raise DataNotFoundError(f"{name} not found; looked at: {'; '.join(looked)}") from None
    try:
        return Path(pooch.retrieve(url, known_hash=f"md5:{md5}", fname=tarball, path=cache_dir(), progressbar=False))
    except Exception as exc:  # network errors and checksum mismatches alike
        looked.append(f"download: {url} failed: {type(exc).__name__}: {exc}")
        raise DataNotFoundError(f"{name} not found; looked at: {'; '.join(looked)}") from None
