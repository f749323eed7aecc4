"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): predict and certify the Gaussian-smoothed
classifier g(x) = argmax_c P(f(x + delta) = c), delta ~ N(0, sigma^2 I).

CERTIFY draws ``n0`` selection samples to guess the top class c_A, then ``n`` fresh estimation
samples to count how often f returns c_A; the one-sided Clopper-Pearson bound p_lower on that
probability at confidence 1 - alpha gives the certified L2 radius sigma * Phi^-1(p_lower), and
p_lower <= 1/2 is an abstention. The guarantee is probabilistic (over the draws), so the result is
a :class:`~robeval.report.smoothing.SmoothingResult`, never a deterministic CertificationResult.

The base classifier f is any batched scorer: the network representation's forward on ``xp``
(NumPy or CuPy, one code path) or an adapter's ``predict``. Draws are batched: a group of samples
and a chunk of draws form one (samples x draws) batch per forward call, never a Python loop over
draws. The noise comes from ``xp.random.default_rng(seed)`` in a fixed order (per sample group:
selection draws, then estimation draws), so a run is reproducible for a given seed and batch size."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy

from ..backend import asnumpy, get_xp, to_device
from ..errors import InvalidParameterError
from ..ir.graph import Network
from ..report.smoothing import ABSTAIN, CERTIFIED_WHP, INCORRECT, NOT_CERTIFIED, SmoothingResult
from ..util import progress_bar
from .base import Certifier, auto_batch_size, check_data, check_eps, prepare_network
from .smoothing_stats import binomial_p_values, certified_radius, clopper_pearson_lower

#: Largest number of noisy inputs sent through the classifier in one call when not set.
MAX_ROWS = 4096


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < 1:
        raise InvalidParameterError(f"{name}={value!r}; expected a positive integer number of noise draws")
    return int(value)


def check_smoothing_params(sigma: Any, n0: Any, n: Any, alpha: Any) -> tuple[float, int, int, float]:
    """sigma > 0 finite, n0 and n positive integers, 0 < alpha < 1; else InvalidParameterError."""
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not math.isfinite(sigma) or sigma <= 0:
        raise InvalidParameterError(f"sigma={sigma!r}; expected the noise level as a number > 0, e.g. 0.25")
    if not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise InvalidParameterError(f"alpha={alpha!r}; expected a failure probability in (0, 1), e.g. 0.001")
    return float(sigma), _check_positive_int(n0, "n0"), _check_positive_int(n, "n"), float(alpha)


def class_counts(predict: Callable, x, draws: int, k: int, sigma: float, rng, rows: int) -> numpy.ndarray:
    """(b, k) counts of f's class on ``draws`` noisy copies of each of the b inputs in ``x``, at most
    ``rows`` noisy inputs per call of ``predict`` (draws chunked, samples x draws batched)."""
    xp = get_xp(x)
    b, shape = int(x.shape[0]), tuple(x.shape[1:])
    per = max(1, rows // b)
    counts = xp.zeros(b * k, dtype=xp.int64)
    offsets = (xp.arange(b, dtype=xp.int64) * k)[:, None]
    done = 0
    while done < draws:
        m = min(per, draws - done)
        noise = rng.standard_normal((b, m) + shape, dtype=x.dtype)
        noise *= x.dtype.type(sigma)
        noisy = (x[:, None] + noise).reshape((b * m,) + shape)
        scores = to_device(predict(noisy), xp)
        if scores.ndim != 2 or scores.shape[0] != b * m or scores.shape[1] != k:
            raise InvalidParameterError(f"the classifier returned shape {tuple(scores.shape)} for {b * m} inputs; "
                                        f"expected ({b * m}, {k}) class scores")
        top = scores.argmax(axis=1).reshape(b, m).astype(xp.int64)
        counts += xp.bincount((top + offsets).ravel(), minlength=b * k)
        done += m
    return asnumpy(counts.reshape(b, k))


class Smoothing(Certifier):
    """Certify the Gaussian-smoothed classifier at L2 radii ``eps`` (probabilistic: see the module).

    Args:
        sigma: noise standard deviation, in the model's input units (pixels in [0, 1]).
        n0: selection draws per sample; n: estimation draws per sample; alpha: failure probability.
        seed: seed of the noise generator. batch_size: noisy inputs per classifier call (default:
            from the model's size and $ROBEVAL_MEMORY_MB, at most 4096).
        dtype: float32 (default) or float64, the dtype of inputs and noise.
    """

    name = "smoothing"
    rule = None
    norms = ("l2",)
    probabilistic = True

    def __init__(self, sigma: float = 0.25, n0: int = 100, n: int = 10_000, alpha: float = 0.001, seed: int = 0,
                 norm: str = "l2", domain=(0.0, 1.0), device: str = "cpu", batch_size: int | None = None,
                 dtype: Any = numpy.float32, progress: bool = False, sharding: Any = None):
        super().__init__(norm=norm, domain=domain, device=device, batch_size=batch_size, dtype=dtype,
                         progress=progress)
        if sharding is not None:  # the noise stream runs over the samples in order; shards would change it
            raise InvalidParameterError("--method smoothing runs in one process; drop --executor/--workers/"
                                        "--shards (sharded smoothing is not supported)")
        self.sigma, self.n0, self.n, self.alpha = check_smoothing_params(sigma, n0, n, alpha)
        if isinstance(seed, bool) or not isinstance(seed, (int, numpy.integer)):
            raise InvalidParameterError(f"seed={seed!r}; expected an integer")
        self.seed = int(seed)

    def _rows(self, net: Network | None) -> int:
        if self.batch_size is not None:
            return self.batch_size
        if net is None:
            return 1024
        return auto_batch_size(self.bytes_per_sample(net), MAX_ROWS)

    def certify(self, network: Network, x, y, eps) -> SmoothingResult:
        """Smoothed predictions and certified radii of the network representation, on ``xp``."""
        net, notes = prepare_network(network, None)
        net = net.to(self.device, dtype=self.dtype)
        net.check_input(x)
        k = int(net.shapes()[net.output_name][-1])
        return self._run(net.forward, x, y, eps, k, self._rows(net), notes, self.xp)

    def certify_fn(self, predict: Callable, x, y, eps, num_classes: int) -> SmoothingResult:
        """The same for any batched scorer ``predict(x) -> (B, num_classes)`` on host arrays (e.g. an
        adapter's ``predict`` running torch or Keras); the noise is drawn with NumPy."""
        if self.device != "cpu":
            raise InvalidParameterError("certify_fn draws its noise on the host; use device='cpu', or certify the "
                                        "network representation to run on CuPy")
        return self._run(predict, numpy.asarray(x), y, eps, int(num_classes), self._rows(None), [], numpy)

    def predict(self, network: Network, x, n: int | None = None) -> numpy.ndarray:
        """Cohen et al.'s PREDICT: the top class of ``n`` draws (default self.n) where the binomial
        test of top vs runner-up counts rejects a tie at level alpha, else -1 (abstain)."""
        net, _ = prepare_network(network, None)
        net = net.to(self.device, dtype=self.dtype)
        net.check_input(x)
        k = int(net.shapes()[net.output_name][-1])
        draws = self.n if n is None else _check_positive_int(n, "n")
        xb = to_device(numpy.asarray(asnumpy(x)), self.xp).astype(self.dtype)
        rng = self.xp.random.default_rng(self.seed)
        counts = class_counts(net.forward, xb, draws, k, self.sigma, rng, self._rows(net))
        order = numpy.argsort(-counts, axis=1, kind="stable")
        top = numpy.take_along_axis(counts, order[:, :1], 1)[:, 0]
        second = numpy.take_along_axis(counts, order[:, 1:2], 1)[:, 0] if k > 1 else numpy.zeros_like(top)
        return numpy.where(binomial_p_values(top, second) <= self.alpha, order[:, 0], -1)

    def _run(self, predict, x, y, eps, k: int, rows: int, notes: list, xp) -> SmoothingResult:
        radii = check_eps(eps)
        check_data(x, y, self.domain, k)
        n_samples = int(x.shape[0])
        group = max(1, rows // max(self.n0, min(self.n, rows)))  # samples whose draws share a batch
        rng = xp.random.default_rng(self.seed)
        selected = numpy.empty(n_samples, dtype=numpy.int64)
        hits = numpy.empty(n_samples, dtype=numpy.int64)
        t0 = time.perf_counter()
        starts = range(0, n_samples, group)
        for s in progress_bar(starts, total=len(starts), desc="smoothing", enabled=self.progress):
            xb = to_device(numpy.asarray(asnumpy(x[s:s + group])), xp).astype(self.dtype)
            c0 = class_counts(predict, xb, self.n0, k, self.sigma, rng, rows)
            sel = c0.argmax(axis=1)
            c1 = class_counts(predict, xb, self.n, k, self.sigma, rng, rows)
            selected[s:s + group] = sel
            hits[s:s + group] = c1[numpy.arange(len(sel)), sel]
        seconds = time.perf_counter() - t0
        p_lower = clopper_pearson_lower(hits, self.n, self.alpha)
        abstain = p_lower <= 0.5
        radius = numpy.where(abstain, 0.0, certified_radius(p_lower, self.sigma))
        preds = numpy.where(abstain, -1, selected)
        labels = numpy.asarray(asnumpy(y), dtype=numpy.int64)
        verdicts = numpy.empty((n_samples, len(radii)), dtype=object)
        for i, r in enumerate(radii):
            verdicts[:, i] = numpy.where(abstain, ABSTAIN, numpy.where(
                preds != labels, INCORRECT, numpy.where(radius >= r, CERTIFIED_WHP, NOT_CERTIFIED)))
        if any(r > 0 for r in radii) and self.domain != (-math.inf, math.inf):
            notes = [*notes, "noise is not clipped to the input domain: the smoothed classifier is defined on all "
                             "of R^d (as in Cohen et al.)"]
        return SmoothingResult(
            sigma=self.sigma, alpha=self.alpha, n0=self.n0, n_draws=self.n, seed=self.seed, eps=radii,
            labels=labels, predictions=preds, p_lower=p_lower, radius=radius, verdicts=verdicts.astype(str),
            seconds=tuple(seconds / len(radii) for _ in radii), domain=self.domain, notes=tuple(notes),
            device=self.device, dtype=str(self.dtype),
            extra={"draws_per_second": n_samples * (self.n0 + self.n) / max(seconds, 1e-12),
                   "batch_rows": rows, "samples_per_group": group})


def _register() -> None:
    from . import register_certifier

    register_certifier(Smoothing)


_register()
