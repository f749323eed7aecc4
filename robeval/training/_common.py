"""Framework-neutral math and configuration for robust training.

The PyTorch plugin (``robeval.training.torch``) and a future Keras twin bind this module: the
schedules, the constants of the HKR loss, the settings of the power and Björck iterations, the
IBP initialisation and the float64 bounds on exported weights live here, in plain Python and
NumPy, so both frameworks train and certify with the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidParameterError

# HKR loss (Serrurier et al. 2021), with the values of the deel-lip binary MNIST tutorial.
HKR_ALPHA = 10.0
HKR_MIN_MARGIN = 1.0

# Relative slack added to float64 singular values: the exported weights are float32 and the
# SVD itself has a relative error of a few ulps, so a bound of sigma * (1 + 1e-6) stays above
# the exact norm of the stored matrix.
BOUND_SLACK = 1e-6

RAMP_SHAPES = ("linear", "smooth")


@dataclass(frozen=True)
class SpectralConfig:
    """How a spectral layer turns its free weight into a near-orthogonal one.

    Attributes:
        power_iterations: power-iteration steps per forward pass to estimate sigma_max; the
            singular vector is kept between steps, so a few suffice once training runs.
        bjorck_iterations: Björck steps W <- (1 + beta) W - beta W W^T W after dividing by sigma.
        bjorck_beta: Björck step size; 0.5 is the classic Newton-Schulz choice.
    """

    power_iterations: int = 3
    bjorck_iterations: int = 15
    bjorck_beta: float = 0.5

    def __post_init__(self) -> None:
        check_int("power_iterations", self.power_iterations, minimum=1)
        check_int("bjorck_iterations", self.bjorck_iterations, minimum=0)
        if not 0.0 < self.bjorck_beta <= 0.5:
            raise InvalidParameterError(
                f"bjorck_beta={self.bjorck_beta!r}; expected 0 < beta <= 0.5 (larger steps can diverge); "
                "use the default 0.5"
            )


def check_int(name: str, value: object, minimum: int = 0) -> int:
    """Return ``value`` if it is an int >= minimum, else raise with the fix."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidParameterError(f"{name}={value!r}; expected an integer >= {minimum}")
    return int(value)


def check_positive(name: str, value: object, allow_zero: bool = False, allow_inf: bool = False) -> float:
    """Return ``value`` as float if it is a positive (or zero) number, else raise with the fix."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{name}={value!r}; expected a number") from None
    ok = (v >= 0 if allow_zero else v > 0) and not math.isnan(v) and (allow_inf or math.isfinite(v))
    if not ok:
        lo = ">= 0" if allow_zero else "> 0"
        kind = "number" if allow_inf else "finite number"
        raise InvalidParameterError(f"{name}={value!r}; expected a {kind} {lo}")
    return v


# --------------------------------------------------------------------------------------------
# Schedules (epsilon and kappa for IBP training)
# --------------------------------------------------------------------------------------------


def ramp_fraction(t: float, warmup: float, ramp: float, shape: str = "linear", mid: float = 0.25,
                  beta: float = 4.0) -> float:
    """Fraction in [0, 1] of the way from the start value to the end value at time ``t``.

    ``t`` counts epochs (fractional: epoch + batch / batches). Before ``warmup`` it is 0; over
    the next ``ramp`` epochs it rises to 1; afterwards it stays 1. ``shape="linear"`` rises at
    a constant rate. ``shape="smooth"`` starts as a power s**beta up to ``mid`` of the ramp and
    continues as the tangent line, which reaches 1 at the end (the shape of auto_LiRPA's
    SmoothedScheduler); it is C1, so the bounds do not jump when the ramp starts.
    """
    if shape not in RAMP_SHAPES:
        raise InvalidParameterError(f"shape={shape!r}; expected one of {RAMP_SHAPES}")
    if t < warmup:
        return 0.0
    if ramp <= 0 or t >= warmup + ramp:
        return 1.0
    s = (t - warmup) / ramp
    if shape == "linear":
        return s
    scale = 1.0 / (mid**beta + beta * mid ** (beta - 1) * (1.0 - mid))
    if s <= mid:
        return scale * s**beta
    return scale * (mid**beta + beta * mid ** (beta - 1) * (s - mid))


@dataclass(frozen=True)
class EpsilonSchedule:
    """Perturbation radius over training: 0 for ``warmup`` epochs, then a ramp to ``target``.

    >>> s = EpsilonSchedule(target=0.01, warmup=2, ramp=8)
    >>> s(0.0), s(2.0), s(6.0), s(10.0), s(50.0)
    (0.0, 0.0, 0.005, 0.01, 0.01)
    """

    target: float
    warmup: float = 0.0
    ramp: float = 0.0
    shape: str = "linear"

    def __post_init__(self) -> None:
        check_positive("target", self.target, allow_zero=True)
        check_positive("warmup", self.warmup, allow_zero=True)
        check_positive("ramp", self.ramp, allow_zero=True)
        if self.shape not in RAMP_SHAPES:
            raise InvalidParameterError(f"shape={self.shape!r}; expected one of {RAMP_SHAPES}")

    def __call__(self, t: float) -> float:
        return self.target * ramp_fraction(t, self.warmup, self.ramp, self.shape)


@dataclass(frozen=True)
class KappaSchedule:
    """Weight of the clean loss in ``kappa * clean + (1 - kappa) * robust`` (Gowal et al. 2018).

    Stays at ``start`` during warm-up, then moves linearly to ``end`` over the ramp.

    >>> KappaSchedule(start=1.0, end=0.5, warmup=2, ramp=8)(6.0)
    0.75
    """

    start: float = 1.0
    end: float = 0.5
    warmup: float = 0.0
    ramp: float = 0.0

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise InvalidParameterError(f"{name}={v!r}; expected a weight in [0, 1]")
        check_positive("warmup", self.warmup, allow_zero=True)
        check_positive("ramp", self.ramp, allow_zero=True)

    def __call__(self, t: float) -> float:
        return self.start + (self.end - self.start) * ramp_fraction(t, self.warmup, self.ramp)


#: Margin bounds the IBP objectives train on: interval bounds, or CROWN-IBP mixed with them.
BOUNDS = ("ibp", "crown-ibp")


def check_bound(bound: str) -> str:
    """``bound`` if it is one of ``BOUNDS``."""
    if bound not in BOUNDS:
        raise InvalidParameterError(f"bound={bound!r}; expected one of {BOUNDS}")
    return bound


def weight_schedule(name: str, value):
    """A weight in [0, 1] as a schedule of t: a callable is taken as given, a number held constant."""
    if callable(value):
        return value
    if not 0 <= value <= 1:
        raise InvalidParameterError(f"{name}={value!r}; expected a weight in [0, 1]")
    return KappaSchedule(start=float(value), end=float(value))


# --------------------------------------------------------------------------------------------
# Initialisation and scales
# --------------------------------------------------------------------------------------------


def ibp_init_std(fan_in: int) -> float:
    """Standard deviation of the IBP initialisation of Shi et al. (2021): sqrt(2 pi) / fan_in.

    With w ~ N(0, sigma^2), E|w| = sigma sqrt(2/pi), so an interval of radius r grows to
    fan_in * E|w| * r = 2 r per layer on average at initialisation, instead of exploding with
    the width as under Kaiming initialisation (sigma = sqrt(2 / fan_in)); with half the ReLUs
    active, the radius is then kept roughly constant from layer to layer.
    """
    check_int("fan_in", fan_in, minimum=1)
    return math.sqrt(2.0 * math.pi) / fan_in


def lbdn_scale(gamma: float) -> float:
    """Input and output scale sqrt(gamma) of an LBDN with Lipschitz bound gamma (1-Lipschitz core)."""
    return math.sqrt(check_positive("gamma", gamma))


def conv_overlap(kernel_size: tuple[int, int], stride: tuple[int, int]) -> int:
    """How many output positions can read one input pixel in a zero-padded 2-D convolution.

    Along one axis, output p reads inputs p*s + o for o in [0, k); an input i is read by the p
    with i - k < p*s <= i, at most ceil(k / s) of them. The count in 2-D is the product.
    """
    (kh, kw), (sh, sw) = kernel_size, stride
    return math.ceil(kh / sh) * math.ceil(kw / sw)


def conv_lipschitz_factor(kernel_size: tuple[int, int], stride: tuple[int, int]) -> float:
    """sqrt(conv_overlap): ||conv(x)||_2 <= factor * ||W_mat||_2 * ||x||_2 for the (C_out, C_in*kh*kw) matrix.

    Why it is a bound: the output at position p is W_mat @ patch_p(x), so
    ||y||^2 = sum_p ||W_mat patch_p||^2 <= ||W_mat||^2 sum_p ||patch_p||^2, and each input entry
    appears in at most ``conv_overlap`` patches (zero padding adds nothing), so
    sum_p ||patch_p||^2 <= conv_overlap * ||x||^2.
    """
    return math.sqrt(conv_overlap(kernel_size, stride))


# --------------------------------------------------------------------------------------------
# Bounds on stored weights (float64 NumPy, so every framework reports the same number)
# --------------------------------------------------------------------------------------------


def spectral_norm(matrix: np.ndarray) -> float:
    """Upper bound on the largest singular value of a stored matrix (float64 SVD plus slack).

    Power iteration would underestimate sigma_max, so an exact SVD is used: these matrices
    are at most a few thousand wide.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise InvalidParameterError(f"matrix has shape {m.shape}; expected a 2-D weight matrix")
    if m.size == 0:
        return 0.0
    sigma = float(np.linalg.svd(m, compute_uv=False)[0])
    return sigma * (1.0 + BOUND_SLACK)


def sandwich_bound(q: np.ndarray) -> float:
    """Lipschitz bound of a sandwich layer whose stacked matrix Q = [A B] is stored as ``q``.

    The layer is h -> sqrt(2) A^T Psi relu(sqrt(2) Psi^-1 B h + b); its Jacobian is 2 A^T D B
    with D diagonal in [0, 1]. If Q Q^T <= (1 + e) I, then ||2 A^T D B|| <= 1 + e (with
    w = B v, s = w^T D w and p = ||B^T D w||^2, ||2 A^T D B v||^2 <= 4 (1 + e) s - 4 p and
    ||v||^2 >= s^2 / p, and 4 (1 + e) s p - 4 p^2 <= (1 + e)^2 s^2 is a square). The Cayley
    transform makes Q Q^T = I up to rounding, so this returns 1 + rounding error.
    """
    return spectral_norm(q) ** 2 * (1.0 + BOUND_SLACK)
