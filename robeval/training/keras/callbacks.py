"""Keras callbacks binding the schedules of ``robeval.training._common`` to a training run."""

from __future__ import annotations

import keras

from ...errors import InvalidParameterError
from .._common import EpsilonSchedule, KappaSchedule


class EpsilonScheduler(keras.callbacks.Callback):
    """Sets the model's eps (and kappa) before every batch from ``_common`` schedules.

    Time t counts epochs, fractional within one: t = epoch + batch / batches_per_epoch, as the
    PyTorch ``Trainer`` computes it, so both frameworks see the same eps at the same step.
    Works with ``IBPTraining`` (eps and kappa) and ``AdversarialRegularization`` (its step size);
    the values at the end of each epoch are added to the logs as ``eps`` and ``kappa``.

    Args:
        eps: an ``EpsilonSchedule`` (or a fixed float).
        kappa: a ``KappaSchedule``, a fixed float, or None to leave kappa alone.
        beta: the CROWN-IBP weight of ``IBPTraining(bound="crown-ibp")``, as a ``KappaSchedule``
            (Zhang et al. 2020 move it from 1 to 0 over the eps ramp), a float, or None.

    >>> cb = EpsilonScheduler(EpsilonSchedule(target=0.1, warmup=1, ramp=4), KappaSchedule(1.0, 0.5, 1, 4))
    """

    def __init__(self, eps: EpsilonSchedule | float, kappa: KappaSchedule | float | None = None,
                 beta: KappaSchedule | float | None = None):
        super().__init__()
        self.eps = eps if callable(eps) else EpsilonSchedule(target=float(eps))
        self.kappa = kappa if (kappa is None or callable(kappa)) else KappaSchedule(float(kappa), float(kappa))
        self.beta = beta if (beta is None or callable(beta)) else KappaSchedule(float(beta), float(beta))
        self._epoch = 0

    def _variable(self, name):
        var = getattr(self.model, f"{name}_variable", None)
        if var is None:
            raise InvalidParameterError(f"{type(self.model).__name__} has no {name}_variable for EpsilonScheduler to "
                                        "set; wrap the network in IBPTraining or AdversarialRegularization")
        return var

    def on_train_begin(self, logs=None):
        self._variable("eps")
        if self.kappa is not None:
            self._variable("kappa")
        if self.beta is not None:
            self._variable("beta")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def values(self, t: float) -> tuple[float, float | None]:
        """(eps, kappa) at time t in epochs."""
        return float(self.eps(t)), (None if self.kappa is None else float(self.kappa(t)))

    def on_train_batch_begin(self, batch, logs=None):
        steps = (self.params or {}).get("steps") or 0
        eps, kappa = self.values(self._epoch + (batch / steps if steps else 0.0))
        self._variable("eps").assign(eps)
        if kappa is not None:
            self._variable("kappa").assign(kappa)
        if self.beta is not None:
            self._variable("beta").assign(float(self.beta(self._epoch + (batch / steps if steps else 0.0))))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["eps"] = float(self._variable("eps").numpy())
            if self.kappa is not None:
                logs["kappa"] = float(self._variable("kappa").numpy())
            if self.beta is not None:
                logs["beta"] = float(self._variable("beta").numpy())
