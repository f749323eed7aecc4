"""The executor interface and the shard driver shared by every executor.

Work is cut into shards of consecutive samples (``plan_shards``); a shard is computed by a plain
module-level function ``fn(shared, shard, payload)`` from the heavy state every shard needs (the network or
model, shipped once per worker) and its own small payload (its samples). ``run_shards`` keeps at most
``executor.capacity`` shards in flight, retries a failed shard a bounded number of times, writes each
finished shard to the store, shows progress, and returns the results in shard order or raises
``ShardFailedError`` naming every shard that kept failing — never a partial result."""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidParameterError, RobevalError
from ..util import progress_bar

#: Samples per shard when none is given: small enough to spread 10,000 images over a cluster,
#: large enough that the per-shard overhead (a task, a file) stays well under the work.
DEFAULT_SHARD_SIZE = 1000
#: Further attempts for a shard whose task failed or whose worker died.
DEFAULT_RETRIES = 2


class ShardFailedError(RobevalError):
    """A shard failed on every attempt; the run has no whole result (finished shards are kept)."""


class ExecutorUnavailableError(RobevalError):
    """The executor asked for cannot run here (Ray not installed, cluster unreachable)."""


@dataclass(frozen=True)
class Shard:
    """Samples [start, stop) of a job; ``index`` names the shard in files and messages."""

    index: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"shard {self.index} (samples {self.start}-{self.stop - 1})"


def check_shard_size(shard_size: Any) -> int:
    if shard_size is None:
        return DEFAULT_SHARD_SIZE
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise InvalidParameterError(f"shard_size={shard_size!r}; expected a positive integer (samples per shard)")
    return int(shard_size)


def plan_shards(n: int, shard_size: int, align: int = 1) -> list[Shard]:
    """Consecutive shards of ``shard_size`` samples (rounded up to a multiple of ``align``, the batch
    size, so shard boundaries are batch boundaries and every batch holds the same samples as an
    unsharded run)."""
    size = -(-int(shard_size) // align) * align if align > 1 else int(shard_size)
    return [Shard(i, s, min(s + size, n)) for i, s in enumerate(range(0, n, size))]


class Session(abc.ABC):
    """One run of an executor with its shared state shipped: submit shards, collect outcomes."""

    @abc.abstractmethod
    def submit(self, fn: Callable, shard: Shard, payload: Any) -> None:
        """Start computing ``fn(shared, shard, payload)``."""

    @abc.abstractmethod
    def wait(self) -> list[tuple[Shard, bool, Any]]:
        """Block until at least one submitted shard is finished; (shard, ok, result or error text)."""

    def close(self) -> None:
        """Release workers (and a cluster this session started)."""
        return None


class Executor(abc.ABC):
    """Runs already-batched work shard by shard. ``capacity`` shards run at once."""

    name = "executor"

    def __init__(self, workers: int | None = None):
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise InvalidParameterError(f"workers={workers!r}; expected a positive integer")
        self.workers = workers

    @property
    def capacity(self) -> int:
        return self.workers or 1

    @abc.abstractmethod
    def session(self, shared: Any) -> Session:
        """Ship ``shared`` (once per worker) and return a session that runs shards against it."""

    def describe(self) -> str:
        return f"{self.name} ({self.capacity} worker{'s' if self.capacity != 1 else ''})"


def one_line(exc: BaseException | str) -> str:
    """The first line of an error, with its type: what a failed shard reports."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(exc, str) else f"{type(exc).__name__}: {first}"


def run_shards(executor: Executor, fn: Callable, shared: Any, shards: list[Shard], payload: Callable[[Shard], Any],
               store: Any = None, retries: int = DEFAULT_RETRIES, desc: str = "shards",
               progress: bool = False, failures: dict | None = None) -> list[Any]:
    """Every shard's result in shard order. Shards already in ``store`` (a JobStore) are loaded, not
    run; every new one is saved as soon as it is finished. A shard that fails ``retries + 1`` times
    is named in the ShardFailedError raised once every other shard has finished — or, when a
    ``failures`` dict is given, recorded there (index -> error) with None as its result."""
    results: dict[int, Any] = {}
    if store is not None:
        for shard in shards:
            if store.has(shard.index):
                results[shard.index] = store.load(shard.index)
    todo = [s for s in shards if s.index not in results]
    if not todo:
        return [results[s.index] for s in shards]
    failed: dict[int, str] = {}
    attempts = dict.fromkeys((s.index for s in todo), 0)
    t0 = time.perf_counter()
    samples = 0

    def finished() -> Iterator[Shard]:
        nonlocal samples
        queue = list(todo)
        running = 0
        session = executor.session(shared)
        try:
            while queue or running:
                while queue and running < executor.capacity:
                    shard = queue.pop(0)
                    attempts[shard.index] += 1
                    session.submit(fn, shard, payload(shard))
                    running += 1
                for shard, ok, value in session.wait():
                    running -= 1
                    if ok:
                        if store is not None:
                            store.save(shard.index, value)
                        results[shard.index] = value
                        samples += shard.size
                        yield shard
                    elif attempts[shard.index] <= retries:
                        queue.insert(0, shard)  # retried before the rest
                    else:
                        failed[shard.index] = value
                        yield shard
        finally:
            session.close()

    bar = progress_bar(finished(), total=len(todo), desc=f"{desc} [{executor.name}]", enabled=progress)
    for _ in bar:
        if hasattr(bar, "set_postfix_str"):
            rate = samples / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{len(results)}/{len(shards)} shards, {rate:.0f} samples/s", refresh=False)
    if hasattr(bar, "close"):
        bar.close()
    if failed and failures is not None:
        failures.update(failed)
        return [results.get(s.index) for s in shards]
    if failed:
        names = ", ".join(next(s.name for s in shards if s.index == i) for i in sorted(failed))
        first = failed[min(failed)]
        kept = f"; the {len(results)} finished shard(s) are kept in {store.root}, rerun with --resume " \
               f"{store.folder}" if store is not None else ""
        raise ShardFailedError(f"{desc}: {names} failed {retries + 1} time(s) ({first}); no result is reported "
                               f"for an incomplete run{kept}")
    return [results[s.index] for s in shards]


@dataclass
class Sharding:
    """How a run is sharded: the executor, samples per shard, where finished shards go, retries."""

    executor: Executor
    shard_size: int = DEFAULT_SHARD_SIZE
    store: Any = None  # a ShardStore, or None to keep shards in memory only
    retries: int = DEFAULT_RETRIES
    progress: bool = False

    def __post_init__(self):
        self.shard_size = check_shard_size(self.shard_size)
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise InvalidParameterError(f"retries={self.retries!r}; expected an integer >= 0")

    def run(self, job: str, spec: dict, fn: Callable, shared: Any, n: int, payload: Callable[[Shard], Any],
            align: int = 1, desc: str | None = None) -> tuple[list[Shard], list[Any]]:
        """Plan the shards of an ``n``-sample job and run them; (shards, results in shard order)."""
        shards = plan_shards(n, self.shard_size, align)
        store = None
        if self.store is not None:
            store = self.store.job(job, dict(spec, n=n, shard_size=self.shard_size, align=align), len(shards))
        results = run_shards(self.executor, fn, shared, shards, payload, store=store, retries=self.retries,
                             desc=desc or job, progress=self.progress)
        return shards, results
