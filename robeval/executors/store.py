"""Finished shards on disk, so a run can resume: one ``<job>.<index>.npz`` per shard and a
``manifest.json`` recording what the folder belongs to (the run's identity: model hash, data hash,
command and options) and each job in it (method, options, shard size, shard count). Every file is
written to a temporary name and moved into place with ``os.replace``, so a crash leaves either the
whole file or none of it. Resuming a folder of a different run is refused, naming what differs."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy

from ..errors import InvalidParameterError, RobevalError

FORMAT = 1


class ResumeMismatchError(RobevalError):
    """--resume was given a folder that holds shards of another job."""


def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _canonical(value: Any) -> Any:
    """JSON-stable form of an identity (tuples as lists, numbers as they are)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} here, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]


def array_hash(*arrays: Any) -> str:
    """sha256 of arrays' dtypes, shapes and bytes (first 16 hex digits)."""
    h = hashlib.sha256()
    for a in arrays:
        a = numpy.ascontiguousarray(numpy.asarray(a))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def network_hash(net: Any) -> str:
    """sha256 of a Network's structure and weights (first 16 hex digits): the model's identity."""
    h = hashlib.sha256()
    h.update(json.dumps([net.input_name, net.output_name, list(net.input_shape)]).encode())
    for node in net.nodes:
        h.update(json.dumps([node.name, node.op, list(node.inputs), sorted(node.params), node.attrs],
                            sort_keys=True, default=str).encode())
        for key in sorted(node.params):
            h.update(array_hash(numpy.asarray(node.params[key])).encode())
    return h.hexdigest()[:16]


class ShardStore:
    """A folder of finished shards of one run. ``resume=False`` needs a folder without a manifest
    (it is created); ``resume=True`` needs this run's manifest there."""

    def __init__(self, folder: str | os.PathLike, identity: dict, resume: bool = False):
        self.folder = str(folder)
        self.root = Path(folder)
        self.identity = _canonical(identity)
        self.manifest_path = self.root / "manifest.json"
        if self.root.exists() and not self.root.is_dir():
            raise InvalidParameterError(f"{self.root} is a file; the shard folder must be a directory")
        if resume:
            if not self.manifest_path.exists():
                raise ResumeMismatchError(f"--resume {self.folder}: no manifest.json there, so nothing to resume; "
                                          f"start the run with --shards {self.folder}")
            try:
                self.manifest = json.loads(self.manifest_path.read_text())
            except (OSError, ValueError) as exc:
                raise ResumeMismatchError(f"--resume {self.folder}: manifest.json cannot be read ({exc})") from None
            old = self.manifest.get("identity", {})
            if old != self.identity:
                diff = "; ".join(_differences(old, self.identity))
                raise ResumeMismatchError(f"--resume {self.folder} holds shards of a different run ({diff}); "
                                          "resume with the same model, data and options, or use a new folder")
        else:
            if self.manifest_path.exists():
                raise ResumeMismatchError(f"{self.folder} already holds shards of a run; pass --resume {self.folder} "
                                          "to continue it, or choose an empty folder")
            self.root.mkdir(parents=True, exist_ok=True)
            self.manifest = {"format": FORMAT, "identity": self.identity, "jobs": {}}
            self._write_manifest()

    def _write_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=2, sort_keys=True).encode()
        atomic_write(self.manifest_path, lambda fh: fh.write(text))

    def job(self, name: str, spec: dict, shards: int) -> JobStore:
        """The store of one job (e.g. one certifier, one attack at one radius) of this run."""
        spec = _canonical(dict(spec, shards=shards))
        jobs = self.manifest.setdefault("jobs", {})
        if name in jobs and jobs[name] != spec:
            diff = "; ".join(_differences(jobs[name], spec))
            raise ResumeMismatchError(f"--resume {self.folder}: job {name!r} was run with other settings ({diff}); "
                                      "use the same options or a new folder")
        if name not in jobs:
            jobs[name] = spec
            self._write_manifest()
        return JobStore(self, name)


class JobStore:
    """The shards of one job: ``<name>.<index>.npz`` files of named arrays."""

    def __init__(self, store: ShardStore, name: str):
        self.store, self.name = store, name
        self.root, self.folder = store.root, store.folder
        self._safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)

    def path(self, index: int) -> Path:
        return self.root / f"{self._safe}.{index:05d}.npz"

    def has(self, index: int) -> bool:
        return self.path(index).exists()

    def save(self, index: int, arrays: dict[str, numpy.ndarray]) -> None:
        atomic_write(self.path(index), lambda fh: numpy.savez(fh, **arrays))

    def load(self, index: int) -> dict[str, numpy.ndarray]:
        try:
            with numpy.load(self.path(index), allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise ResumeMismatchError(f"{self.path(index)} cannot be read ({exc}); delete it to recompute the "
                                      "shard") from None
