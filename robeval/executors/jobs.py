"""The sharded jobs: what one shard of a certification, an attack or a noise sweep computes (plain
module-level functions, so any executor can ship them) and how the shards merge back, in sample
order, into the result the unsharded run returns. Each shard returns named NumPy arrays only, so it
can be stored as an .npz file and resumed."""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Any

import numpy

from ..backend import asnumpy
from .base import Sharding


def _worker_copy(obj: Any) -> Any:
    """A copy of a certifier / attack that runs one shard in place: no sharding, no progress bar."""
    twin = copy.copy(obj)
    if hasattr(twin, "sharding"):
        twin.sharding = None
    twin.progress = False
    return twin


@contextlib.contextmanager
def one_thread():
    """Every shard runs with BLAS (and torch, when loaded) on one thread, on every executor: the
    thread count changes how a BLAS call splits its sums, hence the last bits, and a Ray worker starts
    with one thread where this process has one per core. Workers are the parallelism."""
    import sys

    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        if torch is not None:
            torch.set_num_threads(before)


def _host(a: Any) -> numpy.ndarray:
    return numpy.ascontiguousarray(numpy.asarray(asnumpy(a)))


# ----------------------------------------------------------------------------- certification
def certify_shard(shared, shard, payload) -> dict[str, numpy.ndarray]:
    """One shard of ``Certifier.certify``: the certifier's own template on the shard's samples, with
    the driver's thread count ($ROBEVAL_THREADS), which sets how CROWN splits a shard into batches,
    and BLAS on one thread: so a worker on a machine with other cores computes the very same floats."""
    import os

    certifier, network, eps, threads = shared
    x, y = payload
    before = os.environ.get("ROBEVAL_THREADS")
    os.environ["ROBEVAL_THREADS"] = str(threads)
    try:
        with one_thread():
            r = certifier.certify(network, x, y, eps)
    finally:
        if before is None:
            os.environ.pop("ROBEVAL_THREADS", None)
        else:
            os.environ["ROBEVAL_THREADS"] = before
    return {"predictions": r.predictions, "verdicts": numpy.asarray(r.verdicts, dtype=str), "bound": r.bound,
            "seconds": numpy.asarray(r.seconds, dtype=numpy.float64), "notes": numpy.asarray(r.notes, dtype=str),
            "lipschitz_bound": numpy.asarray(numpy.nan if r.lipschitz_bound is None else r.lipschitz_bound)}


def certify_sharded(certifier, network, x, y, eps_values, notes, sharding: Sharding):
    """``certifier.certify`` over shards; returns the CertificationResult the local run returns."""
    from ..certifiers.crown import thread_count
    from ..report.results import CertificationResult

    n = int(x.shape[0])
    threads = thread_count(certifier.xp)
    spec = {"method": certifier.name, "norm": certifier.norm, "eps": list(eps_values),
            "domain": list(certifier.domain), "dtype": str(certifier.dtype), "device": certifier.device,
            "batch_size": certifier.batch_size, "threads": threads}
    shared = (_worker_copy(certifier), network, eps_values, threads)
    shards, parts = sharding.run(f"certify-{certifier.name}", spec, globals()["certify_shard"], shared, n,
                                 lambda s: (_host(x[s.start:s.stop]), _host(y[s.start:s.stop])),
                                 align=certifier.batch_size or 1, desc=certifier.name)
    labels = numpy.asarray(asnumpy(y), dtype=numpy.int64)
    e = len(eps_values)

    def cat(key, empty):  # no parts only for an empty data set
        return numpy.concatenate([p[key] for p in parts]) if parts else empty

    preds = cat("predictions", numpy.empty(0, numpy.int64))
    verdicts = cat("verdicts", numpy.empty((0, e), str))
    bound = cat("bound", numpy.empty((0, e)))
    seconds = tuple(float(v) for v in numpy.sum([p["seconds"] for p in parts] or [numpy.zeros(e)], axis=0))
    # notes and the Lipschitz bound are facts of the network, the same in every shard
    shard_notes = tuple(str(v) for v in parts[0]["notes"]) if parts else tuple(notes)
    lip = float(parts[0]["lipschitz_bound"]) if parts else numpy.nan
    return CertificationResult(
        method=certifier.name, norm=certifier.norm, eps=tuple(eps_values), domain=certifier.domain, labels=labels,
        predictions=preds.astype(numpy.int64), verdicts=verdicts, bound=bound.astype(numpy.float64),
        seconds=seconds, notes=shard_notes,
        bound_kind="radius_minus_eps" if certifier.name == "lipschitz" else "margin_lower",
        lipschitz_bound=None if numpy.isnan(lip) else lip, device=certifier.device, dtype=str(certifier.dtype),
        extra={"executor": sharding.executor.name, "shards": len(shards), "shard_size": sharding.shard_size})


# ----------------------------------------------------------------------------- attacks
def attack_shard(shared, shard, payload) -> dict[str, numpy.ndarray]:
    """One shard of an attack at one radius; its batches are seeded by their global sample index."""
    atk, model = shared
    x, y, eps, targets = payload
    with one_thread():
        r = atk(model, x, y, eps, targets=targets, offset=shard.start)
    out = {"clean_predictions": r.clean_predictions, "adv_predictions": r.adv_predictions, "success": r.success,
           "x_adv": r.x_adv, "perturbation_norms": r.perturbation_norms, "notes": numpy.asarray(r.notes, dtype=str)}
    for key in COUNTERS:
        out[key] = numpy.asarray(int(r.params.get(key, 0)))
    return out


COUNTERS = ("gradient_calls", "gradient_rows", "zero_gradient_rows", "nonfinite_gradient_rows")


def attack_sharded(atk, model, x, y, eps: float, targets, sharding: Sharding):
    """``atk(model, x, y, eps, targets)`` over shards, merged in sample order."""
    from ..report.empirical import AttackResult
    from .process import portable

    t0 = time.perf_counter()
    n = int(x.shape[0])
    spec = {"attack": atk.name, "norm": atk.norm, "eps": float(eps), "domain": list(atk.domain),
            "batch_size": atk.batch_size, "targets": None if targets is None else "given",
            **atk.params()}
    shared_model = shippable_model(model) if not _is_local(sharding) else model
    if not _is_local(sharding):
        portable(shared_model, sharding.executor.name)
    tg = None if targets is None else numpy.asarray(targets)
    # batches never straddle shards: with the default batch (1000) and shard size (1000) the batches
    # are the unsharded run's; a smaller shard size makes the batch the shard size
    batch = atk.batch_size or min(_default_batch(), sharding.shard_size)
    worker = _worker_copy(atk)
    worker.batch_size = batch
    _, parts = sharding.run(
        f"attack-{atk.name}-eps={eps!r}", spec, globals()["attack_shard"], (worker, shared_model), n,
        lambda s: (_host(x[s.start:s.stop]), _host(y[s.start:s.stop]), eps,
                   None if tg is None else tg[s.start:s.stop]),
        align=batch, desc=f"{atk.name} eps={eps:g}")

    def cat(key):
        return numpy.concatenate([p[key] for p in parts])

    params = dict(atk.params(), **{k: int(sum(int(p[k]) for p in parts)) for k in COUNTERS})
    return AttackResult(
        attack=atk.name, norm=atk.norm, eps=float(eps), domain=atk.domain,
        labels=numpy.asarray(asnumpy(y), dtype=numpy.int64), clean_predictions=cat("clean_predictions"),
        adv_predictions=cat("adv_predictions"), success=cat("success"), x_adv=cat("x_adv"),
        perturbation_norms=cat("perturbation_norms"), seconds=time.perf_counter() - t0, targets=tg, params=params,
        notes=tuple(str(v) for p in parts for v in p["notes"]))


def _default_batch() -> int:
    from ..certifiers.attacks import DEFAULT_BATCH

    return DEFAULT_BATCH


def _is_local(sharding: Sharding) -> bool:
    return sharding.executor.name == "local"


def shippable_model(model: Any) -> Any:
    """The adapter as it can travel to another process: an ONNX adapter without its onnxruntime
    session (each worker opens its own on first use)."""
    if hasattr(model, "_session") and getattr(model, "_session", None) is not None:
        twin = copy.copy(model)
        twin._session = None
        if hasattr(twin, "_logits_nets"):
            twin._logits_nets = {}
        return twin
    return model


# ----------------------------------------------------------------------------- noise
def noise_shard(shared, shard, payload) -> dict[str, numpy.ndarray]:
    """One shard of a noise sweep: clean predictions and per-level counts of correct draws."""
    from ..certifiers.attacks import check_inputs

    runner, model = shared
    x, y = payload
    x, y = check_inputs(model, x, y, runner.domain)
    with one_thread():
        clean, correct = runner.counts(model, x, y, start=shard.start)
    return {"clean": clean, "correct": correct}


def noise_sharded(runner, model, x, y, sharding: Sharding):
    """``runner(model, x, y)`` (a NoiseSweep) over shards, merged in sample order."""
    from .process import portable

    t0 = time.perf_counter()
    spec = {"kind": runner.kind, "levels": list(runner.levels), "draws": runner.draws, "seed": runner.seed,
            "domain": list(runner.domain), "batch_size": runner.batch_size}
    shared_model = shippable_model(model) if not _is_local(sharding) else model
    if not _is_local(sharding):
        portable(shared_model, sharding.executor.name)
    shared = (_worker_copy(runner), shared_model)
    _, parts = sharding.run(f"noise-{runner.kind}", spec, globals()["noise_shard"], shared, int(x.shape[0]),
                            lambda s: (_host(x[s.start:s.stop]), _host(y[s.start:s.stop])),
                            desc=f"noise:{runner.kind}")
    clean = numpy.concatenate([p["clean"] for p in parts])
    correct = numpy.concatenate([p["correct"] for p in parts])
    return runner.finish(numpy.asarray(asnumpy(y), dtype=numpy.int64), clean, correct, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- gate models
def gate_shard(shared, shard, payload):
    """One model of a gate: every check's CheckResult (evaluation errors are results already)."""
    from ..gate import evaluate_model

    config, = shared
    return evaluate_model(payload, config, progress=False)
