"""Accuracy under random corruptions: uniform noise U[-level, level], Gaussian noise of standard
deviation level, or a proportion level of pixels replaced by random grey values, all clipped to the
domain, with several seeded draws per image and a confidence interval per level.

Draws of one image are not independent trials (an image near the decision boundary fails often, a
clear one never), so the interval is a Wilson interval on an *effective* sample size: draws x images
divided by the Kish design effect 1 + (m - 1) * rho, estimated from the spread of the per-image
accuracies and kept within [1, m] (at 1 it is the plain Wilson interval over draws x images, at m the
Wilson interval over images). Noise uses common random numbers: draw d of every level scales the
same base noise (nested pixel sets for "replace"), so curves are smooth and levels comparable.

>>> # result = sweep(model, robeval.load_dataset("mnist", limit=500), kind="uniform", draws=10)
>>> # result.accuracy, result.ci_low, result.ci_high
"""

from __future__ import annotations

import math
import time
from statistics import NormalDist
from typing import Any

import numpy

from ..backend import asnumpy, get_xp
from ..errors import InvalidParameterError
from ..report.empirical import NoiseResult
from ..util import progress_bar
from .attacks import DEFAULT_BATCH, check_inputs, check_int
from .base import check_domain

KINDS = ("uniform", "gaussian", "replace")
DEFAULT_LEVELS = {
    "uniform": tuple(v / 255 for v in (0, 8, 16, 32, 64, 100, 128, 160, 200)),
    "gaussian": (0.0, 0.05, 0.1, 0.2, 0.3, 0.5),
    "replace": (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5),
}


def wilson_interval(p_hat: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion p_hat observed over n trials (n may be fractional)."""
    if n <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    denom = 1 + z * z / n
    centre = (p_hat + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p_hat * (1 - p_hat), 0.0) / n + z * z / (4 * n * n)) / denom
    return max(0.0, min(centre - half, p_hat)), min(1.0, max(centre + half, p_hat))  # rounding at p = 0, 1


def clustered_interval(fractions: Any, draws: int, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(accuracy, low, high, design effect) from per-image fractions correct over ``draws`` draws.

    The design effect m * s^2 / (p (1 - p)) compares the observed variance of the per-image
    fractions with what independent draws would give; clipped to [1, m], and m (images are the units)
    when it cannot be estimated (one image, or accuracy exactly 0 or 1)."""
    f = numpy.asarray(fractions, dtype=numpy.float64)
    n, m = f.shape[0], int(draws)
    if n == 0:
        return float("nan"), 0.0, 1.0, float(m)
    p = float(f.mean())
    if n < 2 or p <= 0.0 or p >= 1.0:
        deff = float(m)
    else:
        deff = float(min(max(m * f.var(ddof=1) / (p * (1 - p)), 1.0), m))
    lo, hi = wilson_interval(p, n * m / deff, confidence)
    return p, lo, hi, deff


def base_noise(rng: numpy.random.Generator, shape: tuple[int, ...], kind: str) -> dict[str, numpy.ndarray]:
    """The random numbers of one draw, shared by every level (common random numbers)."""
    if kind == "uniform":
        return {"u": rng.uniform(-1.0, 1.0, size=shape)}
    if kind == "gaussian":
        return {"u": rng.standard_normal(size=shape)}
    pix = (shape[0], 1) + tuple(shape[2:]) if len(shape) == 4 else tuple(shape)  # images: one grey per pixel
    keys = rng.random(size=(shape[0], int(numpy.prod(pix[1:]))))
    return {"rank": keys.argsort(axis=1).argsort(axis=1).reshape(pix), "grey": rng.random(size=pix)}


def apply_noise(xp, x, noise: dict, kind: str, level: float, domain: tuple[float, float]):
    """x corrupted at ``level`` with one draw's base noise, clipped to the domain, in x's dtype."""
    lo, hi = domain
    if kind in ("uniform", "gaussian"):
        out = x + xp.asarray(level * noise["u"], dtype=x.dtype)
    else:
        rank = xp.asarray(noise["rank"])
        k = int(round(level * int(numpy.prod(rank.shape[1:]))))  # exactly round(p * pixels) per image
        g_lo, g_hi = (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else (0.0, 1.0)
        grey = xp.asarray(g_lo + (g_hi - g_lo) * noise["grey"], dtype=x.dtype)
        out = xp.where(rank < k, grey, x)
    if math.isfinite(lo) or math.isfinite(hi):
        out = xp.clip(out, lo, hi)
    return out.astype(x.dtype, copy=False)


def check_levels(kind: str, levels: Any) -> tuple[float, ...]:
    values = DEFAULT_LEVELS[kind] if levels is None else (
        (levels,) if isinstance(levels, (int, float)) else tuple(levels))
    if not values:
        raise InvalidParameterError("levels=(); give at least one noise level")
    top = 1.0 if kind == "replace" else math.inf
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= top:
            what = "a proportion in [0, 1]" if kind == "replace" else "a finite number >= 0"
            raise InvalidParameterError(f"level {v!r} for kind={kind!r}; every level must be {what}")
    return tuple(float(v) for v in values)


class NoiseSweep:
    """Accuracy at each noise level over ``draws`` seeded draws per image.

    Args:
        kind: "uniform" (U[-level, level] per value), "gaussian" (sigma = level) or "replace" (a
            proportion level of pixels set to a grey value U[domain]; all channels of a pixel alike).
        levels: noise levels (None: the kind's defaults, e.g. 0 ... 200/255 for uniform).
        draws: noisy copies per image and level.
        seed: results depend on it only (not on the batch size).
        domain: (low, high) clip box, or None; confidence: of the intervals (0.95).
    """

    def __init__(self, kind: str = "uniform", levels: Any = None, draws: int = 10, seed: int = 0,
                 domain=(0.0, 1.0), batch_size: int | None = None, confidence: float = 0.95,
                 progress: bool = False):
        if kind not in KINDS:
            raise InvalidParameterError(f"kind={kind!r} is not known; expected one of {KINDS}")
        self.kind = kind
        self.levels = check_levels(kind, levels)
        self.draws = check_int("draws", draws, 1)
        self.seed = check_int("seed", seed, 0)
        self.domain = check_domain(domain)
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size, 1)
        if not isinstance(confidence, float) or not 0 < confidence < 1:
            raise InvalidParameterError(f"confidence={confidence!r}; expected a number in (0, 1), e.g. 0.95")
        self.confidence = confidence
        self.progress = progress
        #: a ``robeval.executors.base.Sharding``: sweep shard by shard on its executor (None: in one pass)
        self.sharding = None

    def __call__(self, model: Any, x: Any, y: Any) -> NoiseResult:
        x, y = check_inputs(model, x, y, self.domain)
        if self.sharding is not None:
            from ..executors.jobs import noise_sharded

            return noise_sharded(self, model, x, y, self.sharding)
        t0 = time.perf_counter()
        clean, correct = self.counts(model, x, y)
        return self.finish(y, clean, correct, time.perf_counter() - t0)

    def counts(self, model: Any, x: Any, y: Any, start: int = 0) -> tuple[numpy.ndarray, numpy.ndarray]:
        """Clean predictions (N,) and correct draws (N, levels) of checked inputs. ``start`` is x[0]'s
        index in the whole data set: a shard starting at s > 0 draws its noise with key (seed, kind,
        draw, s), so its noise depends on the shard only, never on how many workers run it."""
        xp = get_xp(x)
        n = int(x.shape[0])
        batch = min(self.batch_size or DEFAULT_BATCH, max(n, 1))
        clean = predict_classes(model, x, batch)
        correct = numpy.zeros((n, len(self.levels)), dtype=numpy.int64)
        kind_id = KINDS.index(self.kind)
        for d in progress_bar(range(self.draws), total=self.draws, desc=f"noise:{self.kind}", enabled=self.progress):
            key = [self.seed, kind_id, d] + ([int(start)] if start else [])
            noise = base_noise(numpy.random.default_rng(key), tuple(x.shape), self.kind)
            for j, level in enumerate(self.levels):
                if level == 0:
                    correct[:, j] += clean == y
                    continue
                noisy = apply_noise(xp, x, noise, self.kind, level, self.domain)
                correct[:, j] += predict_classes(model, noisy, batch) == y
        return clean, correct

    def finish(self, y: numpy.ndarray, clean: numpy.ndarray, correct: numpy.ndarray, seconds: float) -> NoiseResult:
        """The NoiseResult (accuracy and clustered intervals per level) from the counts."""
        fractions = correct / self.draws
        stats = [clustered_interval(fractions[:, j], self.draws, self.confidence) for j in range(len(self.levels))]
        acc, lo, hi, deff = (tuple(float(s[i]) for s in stats) for i in range(4))
        return NoiseResult(kind=self.kind, levels=self.levels, draws=self.draws, seed=self.seed, domain=self.domain,
                           labels=y, clean_predictions=clean, per_image=fractions, accuracy=acc, ci_low=lo,
                           ci_high=hi, design_effect=deff, confidence=self.confidence, seconds=seconds)


def predict_classes(model: Any, x: Any, batch: int) -> numpy.ndarray:
    """(N,) int64 argmax of model.predict, in batches."""
    out = numpy.empty(int(x.shape[0]), dtype=numpy.int64)
    for s in range(0, int(x.shape[0]), batch):
        out[s:s + batch] = asnumpy(model.predict(x[s:s + batch])).argmax(axis=1)
    return out


def sweep(model: Any, data: Any, kind: str = "uniform", levels: Any = None, draws: int = 10, seed: int = 0,
          domain=(0.0, 1.0), batch_size: int | None = None, limit: int | None = None, confidence: float = 0.95,
          progress: bool = False, input_shape: tuple[int, ...] | None = None, sharding: Any = None) -> NoiseResult:
    """Accuracy of ``model`` on ``data`` under random noise of one ``kind`` at several levels.

    ``model`` is anything ``robeval.load_model`` takes; ``data`` a Dataset, an (x, y) pair or a dict.
    ``input_shape`` is needed for models that do not record it (a torch nn.Module). See ``NoiseSweep``
    for the other arguments and the module docstring for the interval. ``sharding`` (a
    ``robeval.executors.base.Sharding``) runs the images in shards; the shard starting at sample s > 0
    draws its own noise (see ``NoiseSweep.counts``), so the result equals the local sharded run's.

    >>> # r = sweep("model.onnx", robeval.load_dataset("mnist", limit=500), kind="gaussian", levels=[0, .1, .3])
    """
    from ..adapters.base import load_model
    from ..api import _to_model_layout, as_arrays

    runner = NoiseSweep(kind=kind, levels=levels, draws=draws, seed=seed, domain=domain, batch_size=batch_size,
                        confidence=confidence, progress=progress)
    runner.sharding = sharding
    adapter = load_model(model, input_shape=input_shape)
    x, y = as_arrays(data, limit)
    return runner(adapter, _to_model_layout(adapter, x), y)
