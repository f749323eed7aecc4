"""The in-process executor: shards one after another in this process (the default; imports nothing)."""

from __future__ import annotations

from typing import Any

from .base import Executor, Session, one_line


class _LocalSession(Session):
    def __init__(self, shared: Any):
        self.shared = shared
        self.pending: list = []

    def submit(self, fn, shard, payload):
        self.pending.append((fn, shard, payload))

    def wait(self):
        fn, shard, payload = self.pending.pop(0)
        try:
            return [(shard, True, fn(self.shared, shard, payload))]
        except Exception as exc:  # a failing shard is reported by the driver, with its name
            return [(shard, False, one_line(exc))]


class LocalExecutor(Executor):
    """Shards in order in this process: today's behaviour, with the same shards as every other executor."""

    name = "local"

    def session(self, shared):
        return _LocalSession(shared)
