"""The result of a randomized-smoothing run: probabilistic certificates, kept apart from the
deterministic :class:`~robeval.report.results.CertificationResult` in name, verdicts and JSON.

A smoothing certificate holds with probability at least 1 - alpha over the noise draws; it is not
a proof. Its verdicts are therefore their own words: ``certified`` (probabilistic), ``abstain``
(the noise votes did not single out a class), ``incorrect`` (the smoothed prediction is not the
label) and ``not_certified`` (right, but the certified radius is below the asked radius)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy

CERTIFIED_WHP = "certified"
ABSTAIN = "abstain"
INCORRECT = "incorrect"
NOT_CERTIFIED = "not_certified"
SMOOTHING_VERDICTS = (CERTIFIED_WHP, ABSTAIN, INCORRECT, NOT_CERTIFIED)
#: The sentence every rendering of a smoothing result carries.
PROBABILISTIC_NOTE = ("randomized smoothing: 'certified' holds with probability >= {conf:g} over the noise draws "
                      "(not a deterministic certificate); radii are L2 in input space")


@dataclass(frozen=True)
class SmoothingResult:
    """Per-sample smoothed predictions and certified L2 radii of one smoothing run.

    predictions: (N,) the smoothed class, -1 where the certifier abstained; radius: (N,) certified
    L2 radius (0 when abstaining); p_lower: (N,) Clopper-Pearson lower bound on the top class's
    probability; verdicts: (N, E) strings from SMOOTHING_VERDICTS, one column per radius in eps."""

    sigma: float
    alpha: float
    n0: int
    n_draws: int
    seed: int
    eps: tuple[float, ...]
    labels: numpy.ndarray
    predictions: numpy.ndarray
    p_lower: numpy.ndarray
    radius: numpy.ndarray
    verdicts: numpy.ndarray
    seconds: tuple[float, ...]
    domain: tuple[float, float] = (0.0, 1.0)
    notes: tuple[str, ...] = ()
    device: str = "cpu"
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)
    method: str = "smoothing"
    norm: str = "l2"
    probabilistic: bool = True

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def confidence(self) -> float:
        return 1.0 - self.alpha

    @property
    def clean_accuracy(self) -> float:
        """Accuracy of the smoothed classifier (abstentions count as errors)."""
        return float((self.predictions == self.labels).mean()) if self.n else float("nan")

    @property
    def abstain_rate(self) -> float:
        return float((self.predictions < 0).mean()) if self.n else float("nan")

    @property
    def certified_accuracy(self) -> tuple[float, ...]:
        """Fraction certified (with probability >= 1 - alpha) at each radius."""
        return tuple(float((self.verdicts[:, i] == CERTIFIED_WHP).mean()) if self.n else float("nan")
                     for i in range(len(self.eps)))

    @property
    def max_radius(self) -> float:
        """The largest L2 radius these n draws can certify at alpha: sigma * Phi^-1(alpha ** (1 / n))."""
        from ..certifiers.smoothing_stats import max_certified_radius

        return max_certified_radius(self.sigma, self.n_draws, self.alpha)

    def counts(self, i: int) -> dict[str, int]:
        col = self.verdicts[:, i]
        return {v: int((col == v).sum()) for v in SMOOTHING_VERDICTS}

    def note(self) -> str:
        return PROBABILISTIC_NOTE.format(conf=self.confidence)

    def to_dict(self, samples: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method, "kind": "probabilistic", "norm": self.norm, "sigma": self.sigma,
            "alpha": self.alpha, "confidence": self.confidence, "n0": self.n0, "n": self.n_draws, "seed": self.seed,
            "samples_count": self.n, "domain": list(self.domain), "device": self.device, "dtype": self.dtype,
            "smoothed_accuracy": self.clean_accuracy, "abstain_rate": self.abstain_rate,
            "max_certifiable_radius": self.max_radius,
            "notes": [self.note(), *self.notes],
            "results": [
                {"radius": e, "smoothed_certified_accuracy": acc, "counts": self.counts(i), "seconds": self.seconds[i]}
                for i, (e, acc) in enumerate(zip(self.eps, self.certified_accuracy))
            ],
        }
        if samples:
            out["samples"] = {
                "label": self.labels.tolist(), "prediction": self.predictions.tolist(),
                "p_lower": self.p_lower.tolist(), "radius": self.radius.tolist(), "verdict": self.verdicts.T.tolist(),
            }
        return out
