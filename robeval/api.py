"""The Python entry points that mirror the CLI: ``certify`` a model on data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy

from .errors import InvalidParameterError
from .report.results import CertificationResult


def as_arrays(data: Any, limit: int | None = None) -> tuple[numpy.ndarray, numpy.ndarray]:
    """(x, y) from a robeval Dataset, an (x, y) pair, or a dict with 'x' and 'y'."""
    if hasattr(data, "x") and hasattr(data, "y"):
        x, y = data.x, data.y
    elif isinstance(data, dict):
        x, y = data["x"], data["y"]
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        raise InvalidParameterError(f"data of type {type(data).__name__} is not understood; pass a robeval "
                                    "Dataset, an (x, y) pair of arrays, or robeval.data.load_dataset('mnist')")
    from .data.arrays import check_samples

    check_samples(len(x) if numpy.ndim(x) else 0, len(y) if numpy.ndim(y) else 0, "the data")
    if limit is not None:
        if not isinstance(limit, int) or limit < 1:
            raise InvalidParameterError(f"limit={limit!r}; expected a positive integer")
        x, y = x[:limit], y[:limit]
    return x, y


def certify(model: Any, data: Any, method: str = "ibp", eps: float | Sequence[float] = 0.1, norm: str = "linf",
            device: str = "cpu", batch_size: int | None = None, domain=(0.0, 1.0), limit: int | None = None,
            progress: bool = False, check: bool = True, input_shape: tuple[int, ...] | None = None,
            executor: Any = None, workers: int | None = None, shard_size: int | None = None, shards: Any = None,
            resume: bool = False, ray_address: str | None = None, gpus_per_worker: float | None = None,
            sharding: Any = None, **options) -> CertificationResult:
    """Certify ``model`` (any adapter input: path, torch/keras model, ONNX, Network) on ``data``.

    Before certifying, the converted network's outputs are compared with the native model's on the
    first samples (``check=False`` skips this); a disagreement raises FidelityError.

    Sharding (see ``robeval.executors``): ``executor`` 'local', 'process', 'ray' or an Executor
    runs the samples in shards of ``shard_size`` (default 1000) on ``workers``; ``shards`` is a
    folder that keeps every finished shard, ``resume=True`` continues the run kept there. The merged
    result equals the local run's exactly. None of these given: one pass in this process.
    ``sharding``: a ready ``robeval.executors.base.Sharding`` instead of those options.

    >>> # result = robeval.certify("model.onnx", robeval.data.load_dataset("mnist"), eps=[0.01, 0.1])
    >>> # result.certified_accuracy
    """
    from .adapters.base import load_model
    from .adapters.fidelity import FIDELITY_SAMPLES, check_fidelity
    from .certifiers import get_certifier

    adapter = load_model(model, input_shape=input_shape)
    net = adapter.to_network()
    x, y = as_arrays(data, limit)
    x = _to_model_layout(adapter, x)
    if check:  # refuse to certify a converted network that does not compute what the model computes
        check_fidelity(adapter, x[:FIDELITY_SAMPLES], network=net)
    if sharding is None:
        sharding = _sharding("certify", net, x, y, executor, workers, shard_size, shards, resume, ray_address,
                             gpus_per_worker, progress, method=method,
                             eps=list(eps) if not numpy.isscalar(eps) else [eps], norm=norm, device=device,
                             batch_size=batch_size, domain=domain, options=options)
    certifier = get_certifier(method, norm=norm, device=device, batch_size=batch_size, domain=domain,
                              progress=progress, sharding=sharding, **options)
    return certifier.certify(net, x, numpy.asarray(y), eps)


def _sharding(command, net, x, y, executor, workers, shard_size, shards, resume, address, gpus, progress,
              **settings):
    """The Sharding of a run (None when no sharding option is given), its folder tied to this run."""
    from .executors import make_sharding, run_identity

    identity = run_identity(command, net, x, y, shard_size=shard_size, **settings) if shards is not None else None
    return make_sharding(executor, workers, shard_size, shards, resume, identity, address, gpus, progress=progress)


def _to_model_layout(adapter: Any, x):
    """Data arrive NCHW and the representation is NCHW; transpose only when the shapes say the data
    are channels-last for an NCHW model, or NCHW for a model whose network takes NHWC input."""
    shape = tuple(x.shape[1:])
    want = tuple(adapter.input_shape)
    if shape == want or len(shape) != 3 or len(want) != 3:
        return x
    if shape == (want[1], want[2], want[0]):
        return numpy.ascontiguousarray(numpy.asarray(x).transpose(0, 3, 1, 2))
    if shape == (want[2], want[0], want[1]):
        return numpy.ascontiguousarray(numpy.asarray(x).transpose(0, 2, 3, 1))
    return x
