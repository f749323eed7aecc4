"""Gradient attacks through the adapter interface: FGSM and PGD here, APGD-CE in ``apgd.py``.

Attacks are upper bounds on robust accuracy, so the one thing they must never do is over-report.
Subclasses only propose adversarial inputs (``perturb``); the final ``Attack.__call__`` validates the
parameters and data, re-projects the proposals onto the eps-ball and the domain, and decides success
itself with ``model.predict`` (Foolbox 3's template). Gradients come from the adapter, so PyTorch and
Keras models use their own autograd and ONNX models / robeval Networks the representation's vjp.

>>> # from robeval.certifiers.attacks import PGD
>>> # result = PGD(norm="linf", steps=40)(model, x, y, eps=0.1); result.robust_accuracy
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, final

import numpy

from ..adapters.base import NetworkModel
from ..adapters.gradients import LOSSES, loss_and_cotangent
from ..backend import asnumpy, get_xp
from ..errors import InputShapeError, InvalidParameterError
from ..ir.registry import get_op
from ..report.empirical import AttackReport, AttackResult
from ..util import progress_bar
from .base import check_data, check_domain, check_eps, check_norm

#: Samples per model call when no batch size is given.
DEFAULT_BATCH = 1000


# ---------------------------------------------------------------------------- parameter checks
def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < minimum:
        raise InvalidParameterError(f"{name}={value!r}; expected an integer >= {minimum}")
    return int(value)


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise InvalidParameterError(f"loss={loss!r} is not known; expected one of {LOSSES} "
                                    "('margin' is the Carlini-Wagner margin max_j z_j - z_y)")
    return loss


def check_inputs(model: Any, x: Any, y: Any, domain: tuple[float, float]) -> tuple[Any, numpy.ndarray]:
    """Floating (N, *input_shape) inputs inside the domain and int64 labels in [0, K)."""
    xp = get_xp(x)
    x = xp.asarray(x)
    if not numpy.issubdtype(x.dtype, numpy.floating):
        raise InvalidParameterError(f"inputs have dtype {x.dtype}; expected float32/float64 in the domain "
                                    f"{domain} (for uint8 pixels use x.astype('float32') / 255)")
    want = tuple(model.input_shape)
    if tuple(x.shape[1:]) != want:
        raise InputShapeError(f"inputs have shape {tuple(x.shape)}; expected (N, {', '.join(map(str, want))})"
                              + ("; add a batch axis: x[None]" if tuple(x.shape) == want else ""))
    y = numpy.asarray(asnumpy(y))
    if y.size and not numpy.issubdtype(y.dtype, numpy.integer):
        raise InvalidParameterError(f"labels have dtype {y.dtype}; expected integer class indices")
    check_data(x, y, domain, int(model.num_classes))
    return x, y.astype(numpy.int64)


# ---------------------------------------------------------------------------- geometry
def flat_norm(xp, d, norm: str):
    """(N,) norm of each row of d (any trailing shape)."""
    flat = d.reshape(d.shape[0], -1)
    if norm == "linf":
        return xp.abs(flat).max(axis=1) if flat.shape[1] else xp.zeros(d.shape[0], dtype=d.dtype)
    return xp.sqrt((flat * flat).sum(axis=1))


def _rows(v, ndim: int):
    return v.reshape((-1,) + (1,) * (ndim - 1))


def direction(xp, g, norm: str):
    """Steepest-ascent direction of unit norm: sign(g) for L-inf, g / ||g||_2 for L2 (0 where g = 0)."""
    if norm == "linf":
        return xp.sign(g)
    n = flat_norm(xp, g, "l2")
    return g / _rows(xp.where(n > 0, n, 1), g.ndim)


def project(xp, xa, x0, eps, norm: str, domain: tuple[float, float]):
    """Onto the eps-ball around x0 (eps a number or (N,) array), then into the domain box. The domain
    clip moves every value towards x0 (which is in the domain), so the result stays in the ball."""
    if norm == "linf":
        e = _rows(xp.asarray(eps, dtype=xa.dtype), xa.ndim) if numpy.ndim(eps) else eps
        xa = xp.clip(xa, x0 - e, x0 + e)
    else:
        d = xa - x0
        n = flat_norm(xp, d, "l2")
        factor = xp.minimum(1, eps / xp.where(n > 0, n, 1))
        xa = x0 + d * _rows(factor.astype(xa.dtype), xa.ndim)
    lo, hi = domain
    if math.isfinite(lo) or math.isfinite(hi):
        xa = xp.clip(xa, lo, hi)
    return xa


def inside_exactly(xp, xa, x0, eps: float, norm: str):
    """``xa`` moved towards x0 until ||xa - x0|| <= eps holds exactly (in float64): a projection in
    float32 can overshoot by an ulp. Every move is towards x0, so the domain stays satisfied."""
    x0_64 = x0.astype(numpy.float64)
    for attempt in range(7):
        d = xa.astype(numpy.float64) - x0_64
        if norm == "linf":
            over = xp.abs(d) > eps
            if not bool(over.any()):
                break
            nearest = (x0_64 + xp.clip(d, -eps, eps)).astype(xa.dtype)  # within half an ulp of the bound
            inward = xp.nextafter(nearest, x0.astype(xa.dtype))
            fixed = xp.where(xp.abs(nearest.astype(numpy.float64) - x0_64) > eps, inward, nearest)
            xa = xp.where(over, fixed, xa)
        else:
            n = flat_norm(xp, d, "l2")
            over = n > eps
            if not bool(over.any()):
                break
            # rounding back to float32 moves every entry by up to half an ulp, which for a small eps and
            # many entries can exceed a fixed margin: shrink by 1e-6, 1e-5, ... until it holds
            margin = 1e-6 * 10.0**attempt
            shrunk = (x0_64 + d * _rows(eps / xp.where(over, n, 1) * (1 - margin), d.ndim)).astype(xa.dtype)
            xa = xp.where(_rows(over, d.ndim), shrunk, xa)
    else:  # still outside after shrinking by up to 10%: fall back to the centre, which is inside
        d = xa.astype(numpy.float64) - x0_64
        n = flat_norm(xp, d, "l2") if norm == "l2" else xp.abs(d).reshape(d.shape[0], -1).max(axis=1)
        xa = xp.where(_rows(n > eps, d.ndim), x0.astype(xa.dtype), xa)
    return xa


def random_in_ball(xp, rng, x0, eps: float, norm: str, surface: bool = False):
    """A random point of the eps-ball around each row of x0 (before the domain clip): uniform in the
    L-inf box (its corners when ``surface``), or uniform in the L2 ball (on its sphere)."""
    shape, dtype = x0.shape, x0.dtype
    if norm == "linf":
        u = rng.choice([-1.0, 1.0], size=shape) if surface else rng.uniform(-1.0, 1.0, size=shape)
        return x0 + xp.asarray(eps * u, dtype=dtype)
    g = rng.standard_normal(size=shape)
    n = numpy.sqrt((g.reshape(shape[0], -1) ** 2).sum(axis=1))
    d = int(numpy.prod(shape[1:]))
    r = numpy.ones(shape[0]) if surface else rng.uniform(size=shape[0]) ** (1.0 / max(d, 1))
    g = g * _rows(eps * r / numpy.where(n > 0, n, 1), len(shape))
    return x0 + xp.asarray(g, dtype=dtype)


# ---------------------------------------------------------------------------- the model as an oracle
class Oracle:
    """Logits and the gradient of a signed loss for a batch, counted and sanitised.

    One forward and one backward per call where the adapter allows it: an adapter method
    ``logits_and_gradient(x, y, loss)``, or a NetworkModel's network walked once; otherwise
    ``predict`` then ``input_gradient``. Non-finite gradient rows are zeroed and counted (a
    gradient-masking symptom reported by the consistency checks)."""

    def __init__(self, model: Any):
        self.model = model
        self.calls = 0
        self.rows = 0
        self.nonfinite_rows = 0
        self.zero_rows = 0
        self._fast = getattr(model, "logits_and_gradient", None)
        self._net = None
        if self._fast is None and isinstance(model, NetworkModel):
            self._net, _ = model.network.strip_output_squashers()

    def logits(self, x):
        """Scores whose argmax is the prediction and whose differences are logit differences."""
        if self._net is not None:
            return self._net.forward(x)
        return self._as_logits(self.model.predict(x))

    def _as_logits(self, out):
        """A probability output mapped back with log (which only shifts the logits)."""
        if getattr(self.model, "outputs_probabilities", False):
            xp = get_xp(out)
            out = xp.log(xp.maximum(out, numpy.finfo(out.dtype).tiny))
        return out

    def __call__(self, x, labels, loss: str, sign: float = 1.0):
        """(logits (N, K), sign * dL(x, labels)/dx in x's dtype). ``logits_and_gradient`` returns
        what ``predict`` and ``input_gradient`` would."""
        if self._fast is not None:
            out, grad = self._fast(x, labels, loss)
            logits = self._as_logits(out)
        elif self._net is not None:
            logits, grad = network_logits_and_gradient(self._net, x, labels, loss)
        else:
            logits, grad = self.logits(x), self.model.input_gradient(x, labels, loss)
        xp = get_xp(x)
        grad = xp.asarray(grad, dtype=x.dtype)
        if sign != 1.0:
            grad = -grad
        flat = grad.reshape(grad.shape[0], -1)
        bad = ~xp.isfinite(flat).all(axis=1)
        if bool(bad.any()):
            self.nonfinite_rows += int(bad.sum())
            grad = xp.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        self.zero_rows += int((~xp.any(flat != 0, axis=1) & ~bad).sum())
        self.calls += 1
        self.rows += int(x.shape[0])
        return logits, grad


def network_logits_and_gradient(net, x, labels, loss: str):
    """Logits and dL/dx of a Network (output squashers already stripped) in one forward and one
    backward walk; ``Network.vjp`` alone would redo the forward pass."""
    xp = get_xp(x)
    values = net.forward(x, keep=True)
    logits = values[net.output_name]
    _, g = loss_and_cotangent(xp, logits, xp.asarray(labels), loss)
    grads = {net.output_name: g}
    for node in reversed(net.nodes):
        if node.name not in grads:
            continue
        gins = get_op(node.op).vjp(xp, node, [values[n] for n in node.inputs], grads.pop(node.name))
        for name, gi in zip(node.inputs, gins):
            if gi is not None:
                grads[name] = gi if name not in grads else grads[name] + gi
    return logits, grads.get(net.input_name, xp.zeros_like(x))


def hits(logits, y, targets):
    """(N,) bool: misclassified (untargeted) or classified as the target."""
    pred = logits.argmax(axis=1)
    return pred != y if targets is None else pred == targets


# ---------------------------------------------------------------------------- the template
class Attack(abc.ABC):
    """Base class. Subclasses implement ``perturb``; ``__call__`` is final and keeps every check.

    Args:
        norm: "linf" or "l2" (the threat model; ``norms`` lists what a subclass supports).
        loss: "ce" (cross-entropy) or "margin" (Carlini-Wagner max_{j != y} z_j - z_y).
        domain: (low, high) box of valid inputs, or None for unbounded inputs.
        seed: seeds the random starts (results depend on the seed and the batch size only).
        batch_size: samples per model call (None: up to 1000).
        progress: show a progress bar over batches.
    """

    name = "attack"
    norms: tuple[str, ...] = ("linf", "l2")

    def __init__(self, norm: str = "linf", loss: str = "ce", domain=(0.0, 1.0), seed: int = 0,
                 batch_size: int | None = None, progress: bool = False):
        self.norm = check_norm(norm, self.norms)
        self.loss = check_loss(loss)
        self.domain = check_domain(domain)
        self.seed = check_int("seed", seed, 0)
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size, 1)
        self.progress = progress
        #: a ``robeval.executors.base.Sharding``: attack shard by shard on its executor (None: in one pass)
        self.sharding = None

    @abc.abstractmethod
    def perturb(self, oracle: Oracle, x, y, eps: float, rng: numpy.random.Generator, targets=None):
        """Propose adversarial inputs for a batch whose clean inputs are all correctly classified
        (not yet at their target). Returns (x_adv, claimed (N,) bool); the caller re-checks both."""
        ...

    def params(self) -> dict[str, Any]:
        return {"loss": self.loss, "seed": self.seed}

    def step(self, xp, xa, x0, grad, size, eps):
        """One projected ascent step of length ``size`` along the steepest direction."""
        return project(xp, xa + size * direction(xp, grad, self.norm), x0, eps, self.norm, self.domain)

    @final
    def __call__(self, model: Any, x: Any, y: Any, eps: float, targets: Any = None, offset: int = 0) -> AttackResult:
        """Attack every sample of (x, y) at radius ``eps``; success is decided here, by ``model.predict``.

        Args:
            model: an adapter (``robeval.load_model``) with predict / input_gradient.
            x: (N, *model.input_shape) inputs in the domain; y: (N,) labels.
            eps: the radius in ``self.norm``.
            targets: None (untargeted), (N,) target classes, "random" or "least_likely".
            offset: index of x[0] in the whole data set (a shard's start): batch b is seeded with
                (seed, offset + b's start), so a sharded run draws what the unsharded one draws.
        """
        values = check_eps(eps)
        if len(values) != 1:
            raise InvalidParameterError(f"eps={eps!r}; an attack call takes one radius (attack() runs several)")
        eps = values[0]
        x, y = check_inputs(model, x, y, self.domain)
        if self.sharding is not None:
            from ..executors.jobs import attack_sharded

            if isinstance(targets, str) and targets == "random":  # drawn over the whole set, as unsharded
                targets = resolve_targets(targets, y, None, int(model.num_classes), self.seed)
            return attack_sharded(self, model, x, y, eps, targets, self.sharding)
        xp = get_xp(x)
        oracle = Oracle(model)
        t0 = time.perf_counter()
        n = int(x.shape[0])
        batch = min(self.batch_size or DEFAULT_BATCH, max(n, 1))
        clean, least = numpy.empty(n, dtype=numpy.int64), numpy.empty(n, dtype=numpy.int64)
        for s in range(0, n, batch):
            out = asnumpy(model.predict(x[s:s + batch]))
            clean[s:s + batch], least[s:s + batch] = out.argmax(axis=1), out.argmin(axis=1)
        targets = resolve_targets(targets, y, least, int(model.num_classes), self.seed)
        pending = clean == y  # wrong clean predictions are counted as they are, never attacked
        proposals = x.copy()
        claimed = numpy.zeros(n, dtype=bool)
        starts = range(0, n, batch)
        for s in progress_bar(starts, total=len(starts), desc=self.name, enabled=self.progress):
            idx = numpy.flatnonzero(pending[s:s + batch]) + s
            if idx.size == 0 or eps == 0:
                continue
            rng = numpy.random.default_rng([self.seed, offset + s])
            tb = None if targets is None else targets[idx]
            xa, cl = self.perturb(oracle, x[idx], xp.asarray(y[idx]), eps, rng, None if tb is None else xp.asarray(tb))
            proposals[idx] = xp.asarray(xa, dtype=x.dtype)
            claimed[idx] = numpy.asarray(asnumpy(cl), dtype=bool)
        return self._recheck(model, oracle, x, y, eps, proposals, claimed, clean, pending, targets, batch, t0, offset)

    def _recheck(self, model, oracle, x, y, eps, proposals, claimed, clean, pending, targets, batch, t0, offset=0):
        """Re-project every proposal, keep clean inputs where nothing was attempted, and decide
        success with model.predict; the attack's own claims only feed a note."""
        xp = get_xp(x)
        x_adv = inside_exactly(xp, project(xp, proposals, x, eps, self.norm, self.domain), x, eps, self.norm)
        x_adv[xp.asarray(~pending)] = x[xp.asarray(~pending)]
        adv = numpy.concatenate([asnumpy(model.predict(x_adv[s:s + batch])).argmax(axis=1)
                                 for s in range(0, int(x.shape[0]), batch)] or [numpy.zeros(0, numpy.int64)])
        success = adv != y if targets is None else adv == targets
        notes = []
        refuted = numpy.flatnonzero(claimed & ~success)
        if refuted.size:
            notes.append(f"{self.name} claimed {refuted.size} success(es) that the re-check refuted (samples "
                         f"{(refuted[:10] + offset).tolist()}{' ...' if refuted.size > 10 else ''}); counted as robust")
        if oracle.nonfinite_rows:
            notes.append(f"{oracle.nonfinite_rows} gradient row(s) had NaN/inf values (zeroed)")
        params = dict(self.params(), gradient_calls=oracle.calls, gradient_rows=oracle.rows,
                      zero_gradient_rows=oracle.zero_rows, nonfinite_gradient_rows=oracle.nonfinite_rows)
        return AttackResult(
            attack=self.name, norm=self.norm, eps=float(eps), domain=self.domain, labels=y,
            clean_predictions=clean, adv_predictions=adv, success=success, x_adv=asnumpy(x_adv),
            perturbation_norms=asnumpy(flat_norm(xp, x_adv.astype(numpy.float64) - x, self.norm)),
            seconds=time.perf_counter() - t0, targets=targets, params=params, notes=tuple(notes))


def resolve_targets(targets, y, least_likely, k: int, seed: int):
    """None, or (N,) int64 targets different from the labels."""
    if targets is None:
        return None
    n = y.shape[0]
    if isinstance(targets, str):
        if targets == "least_likely":
            t = least_likely.copy()
            clash = t == y
            t[clash] = (y[clash] + 1) % k
            return t
        if targets == "random":
            shift = numpy.random.default_rng([seed, 1]).integers(1, k, size=n)
            return (y + shift) % k
        raise InvalidParameterError(f"targets={targets!r}; expected None, an array of classes, 'random' "
                                    "or 'least_likely'")
    t = numpy.asarray(asnumpy(targets))
    if t.shape != (n,) or not numpy.issubdtype(t.dtype, numpy.integer) or (n and (t.min() < 0 or t.max() >= k)):
        raise InvalidParameterError(f"targets have shape {t.shape} / dtype {t.dtype}; expected ({n},) integer "
                                    f"classes in [0, {k})")
    if (t == y).any():
        raise InvalidParameterError(f"{int((t == y).sum())} target(s) equal the label; a target must be another class")
    return t.astype(numpy.int64)


# ---------------------------------------------------------------------------- FGSM and PGD
class FGSM(Attack):
    """Fast gradient sign method (Goodfellow et al. 2015): x + eps * sign(grad) in L-inf; in L2 the
    fast gradient method x + eps * grad / ||grad||. One gradient per sample."""

    name = "fgsm"

    def perturb(self, oracle, x, y, eps, rng, targets=None):
        xp = get_xp(x)
        labels, sign = (y, 1.0) if targets is None else (targets, -1.0)
        _, grad = oracle(x, labels, self.loss, sign)
        xa = self.step(xp, x, x, grad, eps, eps)
        return xa, xp.zeros(x.shape[0], dtype=bool)


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018) in L-inf or L2.

    Args:
        steps: gradient steps per restart.
        step_size: absolute step length (None: 2.5 * eps / steps, Madry's choice).
        restarts: runs from fresh random starts for the samples not broken yet.
        random_start: begin at a uniform point of the ball (else at x; then restarts repeat).
        early_stop: freeze a sample at the first iterate that succeeds (saves gradients and can only
            help; switch off to reproduce implementations that return the last iterate).
        norm, loss, domain, seed, batch_size, progress: see ``Attack``.
    """

    name = "pgd"

    def __init__(self, norm: str = "linf", steps: int = 40, step_size: float | None = None, restarts: int = 1,
                 random_start: bool = True, early_stop: bool = True, **options):
        super().__init__(norm=norm, **options)
        self.steps = check_int("steps", steps, 1)
        if step_size is not None and (not isinstance(step_size, (int, float)) or not step_size > 0
                                      or not math.isfinite(step_size)):
            raise InvalidParameterError(f"step_size={step_size!r}; expected a positive number, or None "
                                        "for 2.5 eps / steps")
        self.step_size = step_size
        self.restarts = check_int("restarts", restarts, 1)
        self.random_start = bool(random_start)
        self.early_stop = bool(early_stop)

    def params(self):
        return dict(super().params(), steps=self.steps, step_size=self.step_size, restarts=self.restarts,
                    random_start=self.random_start, early_stop=self.early_stop)

    def perturb(self, oracle, x, y, eps, rng, targets=None):
        xp = get_xp(x)
        alpha = self.step_size if self.step_size is not None else 2.5 * eps / self.steps
        sign = 1.0 if targets is None else -1.0
        best, found = x.copy(), numpy.zeros(x.shape[0], dtype=bool)
        for r in range(self.restarts):
            act = numpy.flatnonzero(~found)
            if act.size == 0:
                break
            x0, yy = x[act], y[act]
            tt = None if targets is None else targets[act]
            xa = x0.copy()
            if self.random_start:
                xa = project(xp, random_in_ball(xp, rng, x0, eps, self.norm), x0, eps, self.norm, self.domain)
            for _ in range(self.steps):
                logits, grad = oracle(xa, yy if tt is None else tt, self.loss, sign)
                if self.early_stop:
                    hit = asnumpy(hits(logits, yy, tt))
                    if hit.any():
                        best[act[hit]], found[act[hit]] = xa[hit], True
                        keep = ~hit
                        act, x0, yy, xa, grad = act[keep], x0[keep], yy[keep], xa[keep], grad[keep]
                        tt = None if tt is None else tt[keep]
                        if act.size == 0:
                            break
                xa = self.step(xp, xa, x0, grad, alpha, eps)
            if act.size:
                best[act] = xa
                if r + 1 < self.restarts:  # only the next restart needs to know who is broken
                    found[act] = asnumpy(hits(oracle.logits(xa), yy, tt))
        return best, found


def attack_classes() -> dict[str, type[Attack]]:
    """Attack name -> class (APGD lives in its own module)."""
    from .apgd import APGD

    return {"fgsm": FGSM, "pgd": PGD, "apgd": APGD}


def get_attack(name: str, **options) -> Attack:
    """An attack instance by name, e.g. get_attack("pgd", norm="l2", steps=100)."""
    classes = attack_classes()
    try:
        cls = classes[str(name).lower()]
    except KeyError:
        raise InvalidParameterError(f"attack={name!r} is not known; expected one of {sorted(classes)}") from None
    return cls(**options)


# ---------------------------------------------------------------------------- the Python entry point
def attack(model: Any, data: Any, attack: str = "apgd", eps: float | Sequence[float] = 0.1, norm: str = "linf",
           steps: int | None = None, restarts: int | None = None, step_size: float | None = None,
           loss: str = "ce", targets: Any = None, seed: int = 0, domain=(0.0, 1.0), batch_size: int | None = None,
           limit: int | None = None, progress: bool = False, certification: Any = None, checks: bool = True,
           input_shape: tuple[int, ...] | None = None, executor: Any = None, workers: int | None = None,
           shard_size: int | None = None, shards: Any = None, resume: bool = False, ray_address: str | None = None,
           gpus_per_worker: float | None = None, sharding: Any = None, **options) -> AttackReport:
    """Attack ``model`` on ``data`` at every radius in ``eps``; an upper bound on robust accuracy.

    Args:
        model: anything ``robeval.load_model`` takes (path, torch/keras model, ONNX, Network, adapter).
        data: a robeval Dataset, an (x, y) pair or a dict with 'x' and 'y' (x NCHW in ``domain``).
        attack: "apgd" (default, step-size free), "pgd" or "fgsm".
        eps: one radius or several; norm: "linf" or "l2".
        steps, restarts, step_size: attack budget (None: the attack's defaults; FGSM takes none).
        loss: "ce" or "margin"; targets: None, (N,) classes, "random" or "least_likely".
        certification: a CertificationResult on the same data; a sample it verifies at a radius
            >= eps that the attack breaks raises ConsistencyError (it proves a bug).
        checks: run the gradient-masking checks (GradientMaskingWarning, listed in the report).
        input_shape: per-sample shape for models that do not record it (a torch nn.Module).
        executor, workers, shard_size, shards, resume, ray_address, gpus_per_worker: shard the
            attack (see ``robeval.certify``); the batches are seeded by their sample index, so the
            merged result equals the local run's. ``sharding``: a ready Sharding instead.
            The gradient-masking checks run here, on the merged results.
        options: further attack settings (e.g. random_start=False, early_stop=False for PGD).
    Returns:
        AttackReport: one AttackResult per eps, plus the warnings.

    >>> # report = robeval.attack("model.onnx", robeval.load_dataset("mnist", limit=500), eps=[0.05, 0.1])
    >>> # report.robust_accuracy
    """
    from ..adapters.base import load_model
    from ..api import _to_model_layout, as_arrays
    from .consistency import check_certified, masking_checks

    eps_values = check_eps(eps)
    budget = {k: v for k, v in (("steps", steps), ("restarts", restarts), ("step_size", step_size)) if v is not None}
    try:
        atk = get_attack(attack, norm=norm, loss=loss, domain=domain, seed=seed, batch_size=batch_size,
                         progress=progress, **budget, **options)
    except TypeError as exc:
        raise InvalidParameterError(f"attack={attack!r} does not take these settings: {exc}; FGSM takes no "
                                    "steps/restarts/step_size") from None
    adapter = load_model(model, input_shape=input_shape)
    x, y = as_arrays(data, limit)
    x = _to_model_layout(adapter, x)
    if sharding is None:
        from ..api import _sharding

        net = adapter.to_network() if shards is not None else None
        sharding = _sharding("attack", net, x, y, executor, workers, shard_size, shards, resume, ray_address,
                             gpus_per_worker, progress, attack=atk.name, eps=list(eps_values), norm=norm,
                             params=atk.params(), targets=None if targets is None else str(targets),
                             domain=domain, batch_size=batch_size)
    atk.sharding = sharding
    results = [atk(adapter, x, y, e, targets=targets) for e in eps_values]
    atk.sharding = None  # the masking checks below attack again, unsharded
    if certification is not None:
        check_certified(results, certification)
    found = masking_checks(adapter, atk, x, y, results, seed=seed) if checks else []
    results = [replace(r, warnings=tuple(m for e, m in found if e is None or e == r.eps)) for r in results]
    return AttackReport(results=tuple(results), warnings=tuple(m for _, m in found))
