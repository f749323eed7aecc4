"""Frozen results of empirical evaluations: attacks (upper bounds on robust accuracy) and noise sweeps.

Unlike a certificate, an attack result is only as strong as the attack: it says "at most this many
samples are robust". Every figure here was re-checked with the model's own ``predict``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy


@dataclass(frozen=True)
class AttackResult:
    """One attack at one radius.

    Attributes:
        attack, norm, eps, domain: what was run ("pgd", "linf", 0.1, (0.0, 1.0)).
        labels, clean_predictions, adv_predictions: (N,) int64.
        success: (N,) bool, the re-checked outcome: the adversarial input is misclassified
            (untargeted) or classified as its target (targeted). Wrongly classified clean samples
            count as successes with x_adv = x.
        x_adv: (N, *input_shape) the adversarial inputs, inside the eps-ball and the domain.
        perturbation_norms: (N,) ||x_adv - x|| in ``norm``.
        seconds: wall time of the attack (re-check included).
        targets: (N,) target classes of a targeted attack, else None.
        params: the settings (steps, restarts, step size, loss, seed, ...).
        notes: facts worth a line in a report (e.g. claims the re-check refuted).
        warnings: gradient-masking and consistency warnings raised alongside this result.
    """

    attack: str
    norm: str
    eps: float
    domain: tuple[float, float]
    labels: numpy.ndarray
    clean_predictions: numpy.ndarray
    adv_predictions: numpy.ndarray
    success: numpy.ndarray
    x_adv: numpy.ndarray
    perturbation_norms: numpy.ndarray
    seconds: float
    targets: numpy.ndarray | None = None
    params: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def clean_accuracy(self) -> float:
        return float((self.clean_predictions == self.labels).mean()) if self.n else float("nan")

    @property
    def robust(self) -> numpy.ndarray:
        """(N,) bool: right on the clean input and on the adversarial one."""
        return (self.clean_predictions == self.labels) & (self.adv_predictions == self.labels)

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.mean()) if self.n else float("nan")

    @property
    def success_rate(self) -> float:
        return float(self.success.mean()) if self.n else float("nan")

    def to_dict(self, samples: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "attack": self.attack, "norm": self.norm, "eps": self.eps, "domain": _domain(self.domain),
            "n": self.n, "clean_accuracy": self.clean_accuracy, "robust_accuracy": self.robust_accuracy,
            "success_rate": self.success_rate, "seconds": self.seconds, "params": _plain(self.params),
            "max_perturbation": float(self.perturbation_norms.max()) if self.n else 0.0,
            "notes": list(self.notes), "warnings": list(self.warnings),
        }
        if samples:
            out["samples"] = {
                "label": self.labels.tolist(), "clean_prediction": self.clean_predictions.tolist(),
                "adv_prediction": self.adv_predictions.tolist(), "success": self.success.tolist(),
                "perturbation_norm": self.perturbation_norms.tolist(),
                "target": None if self.targets is None else self.targets.tolist(),
            }
        return out


@dataclass(frozen=True)
class AttackReport:
    """One attack at several radii, with the warnings of the consistency and masking checks."""

    results: tuple[AttackResult, ...]
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def eps(self) -> tuple[float, ...]:
        return tuple(r.eps for r in self.results)

    @property
    def robust_accuracy(self) -> tuple[float, ...]:
        return tuple(r.robust_accuracy for r in self.results)

    @property
    def clean_accuracy(self) -> float:
        return self.results[0].clean_accuracy if self.results else float("nan")

    def __getitem__(self, i: int) -> AttackResult:
        return self.results[i]

    def __len__(self) -> int:
        return len(self.results)

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        first = self.results[0] if self.results else None
        return {
            "attack": first.attack if first else None, "norm": first.norm if first else None,
            "n": first.n if first else 0, "clean_accuracy": self.clean_accuracy,
            "results": [r.to_dict(samples=samples) for r in self.results],
            "warnings": list(self.warnings), "notes": list(self.notes),
        }


@dataclass(frozen=True)
class NoiseResult:
    """Accuracy under random noise at several levels, with confidence intervals.

    Attributes:
        kind: "uniform" (U[-level, level] per value), "gaussian" (sigma = level) or "replace"
            (a proportion ``level`` of pixels set to a random grey value).
        levels: the noise levels, in increasing order as given.
        draws: noisy copies per image and level.
        accuracy, ci_low, ci_high: per level, over draws x images.
        design_effect: per level, the variance inflation from draws of one image being correlated
            (1: draws as good as independent images; ``draws``: draws add nothing).
        per_image: (N, L) fraction of each image's draws classified correctly.
        clean_accuracy: accuracy without noise.
    """

    kind: str
    levels: tuple[float, ...]
    draws: int
    seed: int
    domain: tuple[float, float]
    labels: numpy.ndarray
    clean_predictions: numpy.ndarray
    per_image: numpy.ndarray
    accuracy: tuple[float, ...]
    ci_low: tuple[float, ...]
    ci_high: tuple[float, ...]
    design_effect: tuple[float, ...]
    confidence: float
    seconds: float
    interval: str = "wilson, effective sample size = draws*images / design effect (clustered by image)"
    notes: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def clean_accuracy(self) -> float:
        return float((self.clean_predictions == self.labels).mean()) if self.n else float("nan")

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind, "draws": self.draws, "seed": self.seed, "domain": _domain(self.domain),
            "n": self.n, "clean_accuracy": self.clean_accuracy, "confidence": self.confidence,
            "interval": self.interval, "seconds": self.seconds, "notes": list(self.notes),
            "results": [
                {"level": lv, "accuracy": a, "ci_low": lo, "ci_high": hi, "design_effect": d}
                for lv, a, lo, hi, d in zip(self.levels, self.accuracy, self.ci_low, self.ci_high,
                                            self.design_effect)
            ],
        }
        if samples:
            out["samples"] = {"label": self.labels.tolist(), "clean_prediction": self.clean_predictions.tolist(),
                              "fraction_correct": self.per_image.T.tolist()}
        return out


def _domain(domain: tuple[float, float]) -> list:
    return [d if numpy.isfinite(d) else ("inf" if d > 0 else "-inf") for d in domain]


def _plain(params: dict) -> dict:
    """JSON-safe copy of a settings dict (numpy scalars become Python numbers)."""
    out = {}
    for k, v in params.items():
        if isinstance(v, numpy.generic):
            v = v.item()
        elif isinstance(v, numpy.ndarray):
            v = v.tolist()
        out[k] = v
    return out
