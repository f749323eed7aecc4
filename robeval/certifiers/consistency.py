"""Cross-checks between attacks, certificates and random noise.

- A sample that an attack breaks inside a ball that a certificate covers is a contradiction: one of
  the certifier, the attack's re-check or the model conversion is wrong. That raises
  ``ConsistencyError`` naming the samples.
- Signs of gradient masking (Athalye et al. 2018; Carlini et al. 2019, "On evaluating adversarial
  robustness") only warn, with ``GradientMaskingWarning`` and a line in the report: random noise
  beats the attack at the same eps; accuracy does not fall towards 0 at an eps that spans the whole
  domain; gradients are zero or NaN for many samples; a sample broken at a small eps survives a
  larger one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy

from ..backend import asnumpy, get_xp
from ..errors import InvalidParameterError, RobevalError
from ..report.empirical import AttackReport, AttackResult
from ..report.results import VERIFIED, CertificationResult
from .attacks import Attack, project, random_in_ball
from .noise import predict_classes

#: Warn when more than this fraction of samples has an all-zero or non-finite input gradient.
ZERO_GRADIENT_FRACTION = 0.1
#: Warn when robust accuracy at an eps spanning the whole domain stays above this.
LARGE_EPS_ACCURACY = 0.05
#: Samples used by the (costly) large-eps and gradient checks.
CHECK_SAMPLES = 200


class ConsistencyError(RobevalError):
    """An attack broke a sample that a certificate claims is robust: proof of a bug somewhere."""


class GradientMaskingWarning(UserWarning):
    """The attack's result looks unreliable: gradients may be masked, so robust accuracy is overstated."""


def _results(results: Any) -> list[AttackResult]:
    if isinstance(results, AttackResult):
        return [results]
    if isinstance(results, AttackReport):
        return list(results.results)
    return list(results)


def _in_cert_norm(r: AttackResult, cert_norm: str):
    """Per-sample upper bound of ||x_adv - x|| in the certificate's norm."""
    if r.norm == cert_norm or (r.norm == "l2" and cert_norm == "linf"):
        return r.perturbation_norms  # ||d||_inf <= ||d||_2
    return r.perturbation_norms * math.sqrt(int(numpy.prod(r.x_adv.shape[1:])))  # ||d||_2 <= sqrt(D) ||d||_inf


def check_certified(results: Any, certification: CertificationResult) -> None:
    """Raise ConsistencyError if an attack broke a sample inside a ball the certificate verified.

    A certificate at radius c covers an attack point when the attack domain lies in the certified
    domain and the perturbation, measured in the certificate's norm, is at most c (with 1e-6
    relative slack for rounding of the stored perturbations)."""
    for r in _results(results):
        labels = numpy.asarray(certification.labels)
        if labels.shape != r.labels.shape or (labels != r.labels).any():
            raise InvalidParameterError(f"the certification ({labels.shape[0]} samples) and the {r.attack} attack "
                                        f"({r.n} samples) are not on the same data; pass results for the same x, y")
        (clo, chi), (alo, ahi) = certification.domain, r.domain
        if alo < clo or ahi > chi:
            continue  # attack points may leave the certified region
        pert = _in_cert_norm(r, certification.norm)
        broken = ~r.robust & (r.clean_predictions == r.labels)  # misclassified, whatever the target
        for j, c in enumerate(certification.eps):
            bad = numpy.flatnonzero(broken & (certification.verdicts[:, j] == VERIFIED)
                                    & (pert <= c * (1 + 1e-6) + 1e-12))
            if bad.size:
                first = bad[:5]
                raise ConsistencyError(
                    f"{bad.size} sample(s) {bad[:20].tolist()}{' ...' if bad.size > 20 else ''} were broken by "
                    f"{r.attack} at eps={r.eps:g} ({r.norm}; perturbation norms "
                    f"{numpy.round(r.perturbation_norms[first], 6).tolist()}, adversarial predictions "
                    f"{r.adv_predictions[first].tolist()}, labels {r.labels[first].tolist()}) but "
                    f"{certification.method} certified them at eps={c:g} ({certification.norm}; bound "
                    f"{numpy.round(certification.bound[first, j], 6).tolist()}). This proves a bug in the "
                    "certifier, the attack's re-check, or the model conversion (the certificate is for the converted "
                    "network, the attack uses the model's own predict); please report it with these sample indices")


def _warn(found: list, eps: float | None, message: str) -> None:
    warnings.warn(message, GradientMaskingWarning, stacklevel=3)
    found.append((eps, message))


def masking_checks(model: Any, attack: Attack, x: Any, y: Any, results: Sequence[AttackResult], seed: int = 0,
                   draws: int = 8) -> list[tuple[float | None, str]]:
    """Run every masking check; returns (eps or None, message) for each warning (also warned)."""
    found: list = []
    y = numpy.asarray(asnumpy(y), dtype=numpy.int64)
    results = _results(results)
    for r in results:
        if r.eps > 0:
            check_noise_baseline(model, x, y, r, draws=draws, seed=seed, found=found)
        if r.params.get("nonfinite_gradient_rows"):
            _warn(found, r.eps, f"{r.attack} at eps={r.eps:g}: {r.params['nonfinite_gradient_rows']} gradient row(s) "
                                "were NaN/inf; the model's gradients are unreliable (gradient masking)")
    check_monotone(results, found)
    check_gradients(model, x, y, attack.loss, found)
    check_large_eps(model, attack, x, y, found)
    return found


def check_noise_baseline(model, x, y, r: AttackResult, draws: int = 8, seed: int = 0, found=None) -> list:
    """Warn when random points of the same ball (uniform in the L-inf box, on the L2 sphere) break
    samples the attack left standing, and louder when noise beats the attack overall."""
    found = [] if found is None else found
    xp = get_xp(x)
    rng = numpy.random.default_rng([seed, 7])
    robust = r.robust.copy()
    noise_robust = r.clean_predictions == r.labels
    for _ in range(draws):
        xn = project(xp, random_in_ball(xp, rng, x, r.eps, r.norm, surface=r.norm == "l2"), x, r.eps, r.norm, r.domain)
        noise_robust &= predict_classes(model, xn, 1000) == y
    missed = numpy.flatnonzero(robust & ~noise_robust)
    if missed.size:
        worse = noise_robust.mean() < robust.mean()
        _warn(found, r.eps, f"{r.attack} at eps={r.eps:g} ({r.norm}): random noise broke {missed.size} sample(s) the "
              f"attack did not (e.g. {missed[:5].tolist()}){'; noise robust accuracy ' if worse else ''}"
              f"{f'{noise_robust.mean():.3f} < attack robust accuracy {robust.mean():.3f}' if worse else ''}: "
              "the gradients mislead the attack (gradient masking) or the attack is too weak; try more steps, "
              "restarts, loss='margin', or apgd")
    return found


def check_monotone(results: Sequence[AttackResult], found=None) -> list:
    """Warn when a sample broken at some eps survives a larger eps of the same attack."""
    found = [] if found is None else found
    ordered = sorted(_results(results), key=lambda r: r.eps)
    for small, large in zip(ordered, ordered[1:]):
        lost = numpy.flatnonzero(~small.robust & large.robust)
        if lost.size and large.eps > small.eps:
            _warn(found, large.eps, f"{large.attack}: {lost.size} sample(s) broken at eps={small.eps:g} survive "
                  f"eps={large.eps:g} (e.g. {lost[:5].tolist()}); the attack is unreliable at the larger radius")
    return found


def check_gradients(model, x, y, loss: str = "ce", found=None, limit: int = CHECK_SAMPLES) -> list:
    """Warn when many correctly classified samples have an all-zero or non-finite loss gradient."""
    found = [] if found is None else found
    idx = numpy.flatnonzero(predict_classes(model, x[:limit * 2], 1000) == y[:limit * 2])[:limit]
    if idx.size == 0:
        return found
    grad = numpy.asarray(asnumpy(model.input_gradient(x[idx], y[idx], loss))).reshape(idx.size, -1)
    bad = ~numpy.isfinite(grad).all(axis=1) | ~(grad != 0).any(axis=1)
    if bad.mean() > ZERO_GRADIENT_FRACTION:
        _warn(found, None, f"{bad.sum()} of {idx.size} correctly classified samples have an all-zero or NaN input "
              f"gradient ({loss} loss): gradient-based attacks cannot move them (gradient masking, e.g. saturated "
              "softmax or quantisation); robust accuracy from attacks is not trustworthy here")
    return found


def check_large_eps(model, attack: Attack, x, y, found=None, limit: int = CHECK_SAMPLES,
                    threshold: float = LARGE_EPS_ACCURACY) -> list:
    """Warn when the attack cannot bring accuracy towards 0 at an eps spanning the whole domain
    (L-inf: its width; L2: width * sqrt(D)); skipped on an unbounded domain."""
    found = [] if found is None else found
    lo, hi = attack.domain
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return found
    dim = int(numpy.prod(x.shape[1:]))
    big = (hi - lo) * (1.0 if attack.norm == "linf" else math.sqrt(dim))
    probe = quiet_copy(attack)
    r = probe(model, x[:limit], y[:limit], big)
    if r.robust_accuracy > threshold and len(set(r.clean_predictions.tolist())) > 1:
        _warn(found, None, f"{attack.name} at eps={big:g} ({attack.norm}, the whole domain) leaves robust accuracy "
              f"{r.robust_accuracy:.3f} on {r.n} samples; it should be ~0: gradients are masked or the attack is "
              "too weak, so robust accuracy at small eps is overstated")
    return found


def quiet_copy(attack: Attack) -> Attack:
    """A shallow copy of ``attack`` without a progress bar (for quiet internal runs)."""
    import copy

    probe = copy.copy(attack)
    probe.progress = False
    return probe


__all__ = ["ConsistencyError", "GradientMaskingWarning", "check_certified", "masking_checks", "check_noise_baseline",
           "check_monotone", "check_gradients", "check_large_eps"]
