"""A local process pool: shards on ``workers`` spawned processes of this machine.

The shared state is pickled once and handed to each worker as it starts (the pool's initializer),
so a task carries only its shard's samples. A worker that dies breaks the pool: the shards that were
running count one failed attempt each and the pool is rebuilt for the retries."""

from __future__ import annotations

import os
import pickle
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .base import Executor, ExecutorUnavailableError, Session, one_line

_SHARED: Any = None


def _init_worker(blob: bytes) -> None:
    global _SHARED
    _SHARED = pickle.loads(blob)


def _run(fn, payload):
    return fn(_SHARED, payload)


def portable(shared: Any, executor: str) -> bytes:
    """``shared`` pickled, or a one-line error naming what cannot be sent to another process."""
    try:
        return pickle.dumps(shared, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise ExecutorUnavailableError(
            f"the model cannot be sent to {executor} workers ({type(exc).__name__}: {one_line(str(exc))}); "
            "export it to ONNX or use --executor local") from None


class _ProcessSession(Session):
    def __init__(self, blob: bytes, workers: int):
        import multiprocessing

        self.blob, self.workers = blob, workers
        self.context = multiprocessing.get_context("spawn")  # no fork: BLAS and torch threads are not fork-safe
        self.pool = self._pool()
        self.futures: dict = {}

    def _pool(self):
        return ProcessPoolExecutor(self.workers, mp_context=self.context, initializer=_init_worker,
                                   initargs=(self.blob,))

    def submit(self, fn, shard, payload):
        self.futures[self.pool.submit(_run, fn, payload)] = shard

    def wait(self):
        done, _ = wait(list(self.futures), return_when=FIRST_COMPLETED)
        out, broken = [], False
        for fut in done:
            shard = self.futures.pop(fut)
            exc = fut.exception()
            if exc is None:
                out.append((shard, True, fut.result()))
            else:
                broken |= isinstance(exc, BrokenProcessPool)
                out.append((shard, False, "a worker process died" if isinstance(exc, BrokenProcessPool)
                            else one_line(exc)))
        if broken:  # every shard still on the dead pool fails this attempt; retries go to a fresh pool
            for fut, shard in list(self.futures.items()):
                out.append((shard, False, "a worker process died"))
                fut.cancel()
            self.futures.clear()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._pool()
        return out

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


class ProcessExecutor(Executor):
    """Shards on a pool of local processes (default: one per CPU core)."""

    name = "process"

    @property
    def capacity(self) -> int:
        if self.workers:
            return self.workers
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def session(self, shared):
        return _ProcessSession(portable(shared, "process"), self.capacity)
