"""Ray: shards as Ray tasks on a cluster (``address``) or on a Ray started for the run on this machine
(loopback only, no dashboard). The shared state goes into the object store once (``ray.put``); each
worker process fetches and unpickles it once and keeps it for every later shard of the run. Ray's own
retries are off: the driver retries a shard whose task raised or whose worker died, a bounded number
of times, like every executor."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .base import Executor, ExecutorUnavailableError, Session, one_line
from .process import portable

INSTALL_HINT = "--executor ray needs Ray, which is not installed; pip install 'robeval[ray]' (or pip install ray)"

_CACHE: dict[str, Any] = {}  # per worker process: the object-store id -> the unpickled shared state
_REMOTE = None


#: With this off, Ray takes the loopback address as the node's and binds its servers there only.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def import_ray(local: bool = False):
    """The ray module (one-line install hint when missing). ``local``: a Ray started here is to
    listen on loopback only, which Ray decides from an environment variable read at import."""
    import sys

    if local and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")
    try:
        import ray
    except ImportError:
        raise ExecutorUnavailableError(INSTALL_HINT) from None
    if local:
        from ray._private import ray_constants  # imported already: the same switch, set on the module

        ray_constants.ENABLE_RAY_CLUSTER = False
    return ray


def start_local_ray(num_cpus: int):
    """A Ray for this run on this machine: loopback only, no dashboard, workers importing this robeval.
    Refuses (and stops it) should it come up on a non-loopback address."""
    ray = import_ray(local=True)
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=local_runtime_env(), logging_level="ERROR",
             log_to_driver=False)
    address = ray.util.get_node_ip_address()
    if not address.startswith("127.") and address not in ("::1", "localhost"):
        ray.shutdown()
        raise ExecutorUnavailableError(f"the local Ray came up on {address}, not loopback; start a cluster yourself "
                                       "(ray start --head) and pass --ray-address")
    return ray


def _task(fn, boxed_ref, shard, payload):
    """Runs on a Ray worker: the shared state from this worker's cache (fetched on first use)."""
    import ray

    ref = boxed_ref[0]  # boxed so that Ray does not resolve (and unpickle) it for every task
    key = ref.hex()
    if key not in _CACHE:
        _CACHE.clear()  # one run's state at a time
        _CACHE[key] = ray.get(ref)
    return fn(_CACHE[key], shard, payload)


def _remote():
    global _REMOTE
    if _REMOTE is None:
        ray = import_ray()
        _REMOTE = ray.remote(max_retries=0)(_task)
    return _REMOTE


def local_runtime_env() -> dict:
    """Workers of a Ray started here import this very robeval (the checkout the driver runs)."""
    root = str(Path(__file__).resolve().parents[2])
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}


class _RaySession(Session):
    def __init__(self, executor: RayExecutor, shared: Any):
        ray = self.ray = import_ray(local=not executor.address)
        self.started = False
        self.running: dict = {}
        if not ray.is_initialized():
            try:
                if executor.address:
                    ray.init(address=executor.address, logging_level="ERROR", log_to_driver=False)
                else:
                    start_local_ray(executor.capacity)
            except ExecutorUnavailableError:
                raise
            except Exception as exc:
                where = executor.address or "a local Ray"
                raise ExecutorUnavailableError(f"could not start or reach {where}: {one_line(exc)}") from None
            self.started = True
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if executor.gpus_per_worker and gpus < executor.gpus_per_worker:
            self.close()
            raise ExecutorUnavailableError(f"--gpus-per-worker {executor.gpus_per_worker:g} but the Ray cluster has "
                                           f"{gpus:g} GPU(s), so no task could be placed; drop the option or add "
                                           "GPU nodes")
        portable(shared, "Ray")  # a clear error before anything is shipped
        self.ref = ray.put(shared)
        self.options: dict = {"num_cpus": 1}
        if executor.gpus_per_worker:
            self.options["num_gpus"] = executor.gpus_per_worker

    def submit(self, fn, shard, payload):
        ref = _remote().options(**self.options).remote(fn, [self.ref], shard, payload)
        self.running[ref] = shard

    def wait(self):
        ray = self.ray
        ready, _ = ray.wait(list(self.running), num_returns=1)
        out = []
        for ref in ready:
            shard = self.running.pop(ref)
            try:
                out.append((shard, True, ray.get(ref)))
            except ray.exceptions.RayTaskError as exc:  # the shard's own error, raised on the worker
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                out.append((shard, False, one_line(cause)))
            except ray.exceptions.RayError as exc:  # the worker died, a node was lost, ...
                out.append((shard, False, f"{type(exc).__name__}: the Ray worker or its node was lost"))
        return out

    def close(self):
        for ref in self.running:
            self.ray.cancel(ref, force=True)
        self.running.clear()
        if self.started:
            self.ray.shutdown()


class RayExecutor(Executor):
    """Shards as Ray tasks. ``address``: an existing cluster (e.g. 'ray://head:10001' or 'auto'), else
    a Ray started for the run; ``workers``: shards at once (default: the cluster's CPUs);
    ``gpus_per_worker``: GPUs each task asks for, so CuPy work lands on GPU nodes."""

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None, gpus_per_worker: float | None = None):
        super().__init__(workers)
        if gpus_per_worker is not None and (not isinstance(gpus_per_worker, (int, float)) or gpus_per_worker < 0):
            from ..errors import InvalidParameterError

            raise InvalidParameterError(f"gpus_per_worker={gpus_per_worker!r}; expected a number >= 0")
        self.address = address or None
        self.gpus_per_worker = gpus_per_worker
        import_ray(local=not self.address)  # fail now, with the install hint, not when the first shard is due

    @property
    def capacity(self) -> int:
        if self.workers:
            return self.workers
        ray = import_ray()
        if ray.is_initialized():
            return max(1, int(ray.cluster_resources().get("CPU", 1)))
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def session(self, shared):
        return _RaySession(self, shared)
