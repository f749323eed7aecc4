"""Frozen result objects with ``to_dict`` for JSON output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy

VERIFIED = "verified"  # the clean prediction is right and no input in the region changes it
FALSIFIED = "falsified"  # a counterexample is known (the clean prediction is already wrong)
UNKNOWN = "unknown"  # the method could not decide
VERDICTS = (VERIFIED, FALSIFIED, UNKNOWN)


@dataclass(frozen=True)
class CertificationResult:
    """Per-sample verdicts of one certifier at several radii.

    verdicts: (N, E) strings; bound: (N, E) the certificate's score (> 0 means verified): the
    smallest margin lower bound for IBP/CROWN, or certified radius minus eps for Lipschitz."""

    method: str
    norm: str
    eps: tuple[float, ...]
    domain: tuple[float, float]
    labels: numpy.ndarray
    predictions: numpy.ndarray
    verdicts: numpy.ndarray
    bound: numpy.ndarray
    seconds: tuple[float, ...]
    notes: tuple[str, ...] = ()
    bound_kind: str = "margin_lower"
    lipschitz_bound: float | None = None
    device: str = "cpu"
    dtype: str = "float64"
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def clean_accuracy(self) -> float:
        return float((self.predictions == self.labels).mean()) if self.n else float("nan")

    @property
    def certified_accuracy(self) -> tuple[float, ...]:
        return tuple(float((self.verdicts[:, i] == VERIFIED).mean()) if self.n else float("nan")
                     for i in range(len(self.eps)))

    @property
    def certified_radius(self) -> numpy.ndarray | None:
        """Per-sample certified radius (Lipschitz only; 0 for wrong predictions)."""
        if self.bound_kind != "radius_minus_eps":
            return None
        r = self.bound[:, 0] + self.eps[0]
        return numpy.where(self.predictions == self.labels, numpy.maximum(r, 0.0), 0.0)

    def counts(self, i: int) -> dict[str, int]:
        col = self.verdicts[:, i]
        return {v: int((col == v).sum()) for v in VERDICTS}

    def to_dict(self, samples: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method, "norm": self.norm, "domain": list(self.domain), "n": self.n,
            "clean_accuracy": self.clean_accuracy, "device": self.device, "dtype": self.dtype,
            "lipschitz_bound": self.lipschitz_bound, "notes": list(self.notes),
            "results": [
                {"eps": e, "certified_accuracy": acc, "counts": self.counts(i), "seconds": self.seconds[i]}
                for i, (e, acc) in enumerate(zip(self.eps, self.certified_accuracy))
            ],
        }
        if samples:
            out["samples"] = {
                "label": self.labels.tolist(), "prediction": self.predictions.tolist(),
                "verdict": self.verdicts.T.tolist(), self.bound_kind: _finite(self.bound.T),
            }
        return out


def _finite(a: numpy.ndarray) -> list:
    """JSON-safe nested lists: +/-inf become strings."""
    return [[x if numpy.isfinite(x) else ("inf" if x > 0 else "-inf") for x in row] for row in a.tolist()]
