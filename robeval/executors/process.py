"""A local process pool: shards on ``workers`` spawned processes of this machine.

The shared state is pickled once and handed to each worker as it starts (the pool's initializer),
so a task carries only its shard's samples. A worker that dies breaks the pool: it is rebuilt, and
the shards that were running are rerun one at a time so that only the one that kills its worker is
charged a failed attempt."""

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


def _run(fn, shard, payload):
    return fn(_SHARED, shard, payload)


def portable(shared: Any, executor: str) -> bytes:
    """``shared`` pickled, or a one-line error naming what cannot be sent to another process."""
    try:
        return pickle.dumps(shared, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise ExecutorUnavailableError(
            f"the model cannot be sent to {executor} workers ({type(exc).__name__}: {one_line(str(exc))}); "
            "export it to ONNX or use --executor local") from None


class _ProcessSession(Session):
    """A worker death breaks the whole pool, so it cannot say which shard killed it: the shards that
    were running are rerun one at a time on a fresh pool (uncharged), and only a shard that kills
    its worker while running alone counts a failed attempt."""

    def __init__(self, blob: bytes, workers: int):
        import multiprocessing

        self.blob, self.workers = blob, workers
        self.context = multiprocessing.get_context("spawn")  # no fork: BLAS and torch threads are not fork-safe
        self.pool = self._pool()
        self.futures: dict = {}  # future -> (fn, shard, payload, pool)
        self.suspects: list = []  # (fn, shard, payload) to rerun alone after a pool broke
        self.held: list = []  # submitted while suspects run alone

    def _pool(self):
        return ProcessPoolExecutor(self.workers, mp_context=self.context, initializer=_init_worker,
                                   initargs=(self.blob,))

    def _start(self, fn, shard, payload):
        try:
            fut = self.pool.submit(_run, fn, shard, payload)
        except BrokenProcessPool:  # a worker died since the last wait; its shards fail there
            self._replace(self.pool)
            fut = self.pool.submit(_run, fn, shard, payload)
        self.futures[fut] = (fn, shard, payload, self.pool)

    def _replace(self, pool) -> None:
        if pool is self.pool:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._pool()

    def submit(self, fn, shard, payload):
        if self.suspects:
            self.held.append((fn, shard, payload))
        else:
            self._start(fn, shard, payload)

    def wait(self):
        while True:
            if not self.futures:
                if self.suspects:
                    self._start(*self.suspects.pop(0))
                else:
                    for item in self.held:
                        self._start(*item)
                    self.held.clear()
            out = []
            done, _ = wait(list(self.futures), return_when=FIRST_COMPLETED)
            for fut in done:
                if fut not in self.futures:
                    continue  # already handled with its broken pool
                fn, shard, payload, pool = self.futures.pop(fut)
                exc = fut.exception()
                if exc is None:
                    out.append((shard, True, fut.result()))
                elif not isinstance(exc, BrokenProcessPool):
                    out.append((shard, False, one_line(exc)))
                else:
                    victims = [(fn, shard, payload)]
                    for other, (f2, s2, p2, owner) in list(self.futures.items()):
                        if owner is pool:
                            victims.append((f2, s2, p2))
                            other.cancel()
                            del self.futures[other]
                    self._replace(pool)
                    if len(victims) == 1:
                        out.append((shard, False, "its worker process died"))
                    else:
                        self.suspects.extend(victims)
            if out:
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
