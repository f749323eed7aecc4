"""Executors: the same already-batched work (certifier batches, attack batches, noise draws, gate
models) run in this process (``local``, the default), on a local process pool (``process``) or on
Ray (``ray``), cut into shards of samples that are merged in sample order into one result that
equals the local run's exactly. Finished shards can be kept on disk (``ShardStore``) to resume.

>>> # robeval.certify(model, data, method="crown", executor="ray", shards="out/")
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidParameterError
from .base import (
    DEFAULT_RETRIES,
    DEFAULT_SHARD_SIZE,
    Executor,
    ExecutorUnavailableError,
    Shard,
    ShardFailedError,
    plan_shards,
    run_shards,
)
from .local import LocalExecutor
from .store import ResumeMismatchError, ShardStore

EXECUTORS = ("local", "process", "ray")


def get_executor(executor: Any = "local", workers: int | None = None, address: str | None = None,
                 gpus_per_worker: float | None = None) -> Executor:
    """An Executor from a name ('local', 'process', 'ray') or an Executor itself (returned as is)."""
    if isinstance(executor, Executor):
        return executor
    name = str(executor).lower()
    if name != "ray" and (address or gpus_per_worker):
        raise InvalidParameterError(f"--ray-address and --gpus-per-worker need --executor ray (got {name!r})")
    if name == "local":
        if workers not in (None, 1):
            raise InvalidParameterError(f"workers={workers} with the local executor; it runs one shard at a time "
                                        "(use --executor process or ray for more)")
        return LocalExecutor()
    if name == "process":
        from .process import ProcessExecutor

        return ProcessExecutor(workers)
    if name == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(workers, address=address, gpus_per_worker=gpus_per_worker)
    raise InvalidParameterError(f"executor={executor!r} is not known; expected one of {EXECUTORS} or an Executor")


def open_store(shards: Any, identity: dict, resume: bool = False) -> ShardStore | None:
    """The ShardStore for a folder (None without one); ``resume`` needs the same run's manifest there."""
    if shards is None:
        if resume:
            raise InvalidParameterError("resume=True needs the folder of the run (shards='DIR' / --resume DIR)")
        return None
    if isinstance(shards, ShardStore):
        return shards
    return ShardStore(shards, identity, resume=resume)


__all__ = ["Executor", "LocalExecutor", "Shard", "ShardStore", "ShardFailedError", "ExecutorUnavailableError",
           "ResumeMismatchError", "get_executor", "open_store", "plan_shards", "run_shards", "EXECUTORS",
           "DEFAULT_SHARD_SIZE", "DEFAULT_RETRIES"]


def make_sharding(executor: Any = None, workers: int | None = None, shard_size: int | None = None,
                  shards: Any = None, resume: bool = False, identity: dict | None = None,
                  address: str | None = None, gpus_per_worker: float | None = None, retries: int = DEFAULT_RETRIES,
                  progress: bool = False):
    """A Sharding from the user-facing options, or None when none asks for one (the unsharded path).
    A shard folder or a shard size alone shards on the local executor."""
    asked = (executor is not None or workers is not None or shard_size is not None or shards is not None or resume
             or address is not None or gpus_per_worker is not None)
    if not asked:
        return None
    from .base import Sharding

    ex = get_executor("local" if executor is None else executor, workers, address, gpus_per_worker)
    store = open_store(shards, identity or {}, resume)
    return Sharding(ex, shard_size=shard_size, store=store, retries=retries, progress=progress)


def run_identity(command: str, network: Any, x: Any, y: Any, **options) -> dict:
    """What a shard folder belongs to: the command, the model's and data's hashes, the options."""
    from ..backend import asnumpy
    from .store import array_hash, network_hash

    return {"command": command, "model_hash": network_hash(network),
            "data_hash": array_hash(asnumpy(x), asnumpy(y)), "n": int(x.shape[0]), **options}


__all__ += ["make_sharding", "run_identity"]
