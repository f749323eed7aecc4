"""Fault injection for the executor tests: shard functions that kill their worker process or raise,
then hand over to the real shard function. Module-level, so every executor ships them by name."""

from __future__ import annotations

import os
import uuid

from robeval.executors import jobs

REAL_CERTIFY = jobs.certify_shard
REAL_GATE = jobs.gate_shard


def _log(folder: str, shard) -> None:
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, f"{shard.index}.{uuid.uuid4().hex}"), "w").close()


def ran(folder: str) -> list[int]:
    """Shard indices logged in ``folder``, one entry per attempt, sorted."""
    return sorted(int(n.split(".")[0]) for n in os.listdir(folder)) if os.path.isdir(folder) else []


def exit_once(marker: str, shared, shard, payload):
    """The first task anywhere kills its worker process (no cleanup, like a crash); later ones work."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return REAL_CERTIFY(shared, shard, payload)
    os.close(fd)
    os._exit(17)


def fail_shard(index: int, log: str, shared, shard, payload):
    """Shard ``index`` raises on every attempt; every attempt of every shard is logged."""
    _log(log, shard)
    if shard.index == index:
        raise RuntimeError(f"injected failure in shard {index}")
    return REAL_CERTIFY(shared, shard, payload)


def logged(log: str, shared, shard, payload):
    _log(log, shard)
    return REAL_CERTIFY(shared, shard, payload)


def exit_for_model(name: str, shared, shard, payload):
    """A gate model whose worker dies on every attempt."""
    if payload.name == name:
        os._exit(17)
    return REAL_GATE(shared, shard, payload)
