"""The statistics of randomized smoothing (Cohen, Rosenfeld & Kolter 2019), on the host.

Kept apart from the sampling so that each formula can be checked on its own: the one-sided
Clopper-Pearson lower confidence bound on a binomial proportion, the certified L2 radius
sigma * Phi^-1(p_lower), and the two-sided binomial test behind the smoothed prediction."""

from __future__ import annotations

import numpy

from ..errors import InvalidParameterError


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError as exc:  # scipy is a core dependency; say so if someone removed it
        raise InvalidParameterError("randomized smoothing needs scipy (pip install scipy)") from exc
    return stats


def clopper_pearson_lower(successes, trials: int, alpha: float) -> numpy.ndarray:
    """One-sided lower bound p with P(true proportion >= p) >= 1 - alpha: the alpha quantile of
    Beta(k, n - k + 1), and 0 when k = 0 (vectorised over ``successes``)."""
    k = numpy.asarray(successes, dtype=numpy.float64)
    out = numpy.zeros_like(k)
    pos = k > 0
    out[pos] = _scipy_stats().beta.ppf(alpha, k[pos], trials - k[pos] + 1)
    return out


def certified_radius(p_lower, sigma: float) -> numpy.ndarray:
    """sigma * Phi^-1(p_lower) where p_lower > 1/2, else 0 (no certificate)."""
    p = numpy.asarray(p_lower, dtype=numpy.float64)
    r = sigma * _scipy_stats().norm.ppf(numpy.clip(p, 0.5, 1.0))
    return numpy.where(p > 0.5, r, 0.0)


def max_certified_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius ``n`` estimation draws can certify at ``alpha``: every draw on the top class
    gives p_lower = alpha ** (1 / n) (the alpha quantile of Beta(n, 1)), so sigma * Phi^-1(alpha ** (1 / n)).

    >>> round(max_certified_radius(0.25, 10_000, 0.001), 4)
    0.7996
    """
    return float(certified_radius(numpy.array([alpha ** (1.0 / n)]), sigma)[0])


def binomial_p_values(top: numpy.ndarray, second: numpy.ndarray) -> numpy.ndarray:
    """Two-sided p-values of the test that the top class's count ``top`` out of ``top + second``
    is drawn with probability 1/2 (Cohen et al.'s PREDICT), one per sample."""
    stats = _scipy_stats()
    n = top + second
    # two-sided test at p = 1/2 for top >= second: 2 * P(X >= top), capped at 1
    sf = stats.binom.sf(top - 1, n, 0.5)
    return numpy.minimum(1.0, 2.0 * sf)
