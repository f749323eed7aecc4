"""APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks"): PGD without a step size to tune. It starts at eta = 2 eps, moves with
momentum 0.75, and at checkpoints halves eta (restarting from the best point so far) for every
sample whose loss rose in at most rho = 75% of the steps since the last checkpoint, or whose best
loss did not improve although eta was not halved last time. The strong default attack of robeval.
"""

from __future__ import annotations

import numpy

from ..adapters.gradients import loss_and_cotangent
from ..backend import asnumpy, get_xp
from ..errors import InvalidParameterError
from .attacks import Attack, check_int, hits, project, random_in_ball


def checkpoints(steps: int) -> list[int]:
    """Iteration counts after which the step size is checked: w_j = ceil(p_j * steps) with p_0 = 0,
    p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), in the reference code's integers.

    >>> checkpoints(100)
    [22, 41, 57, 70, 80, 87, 93, 99]
    """
    k, decr, k_min = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, w = [], 0
    while w + k <= steps:
        w += k
        out.append(w)
        k = max(k - decr, k_min)
    return out


class APGD(Attack):
    """APGD-CE (or APGD with the CW margin loss): L-inf or L2, untargeted or targeted.

    Args:
        steps: gradient steps per restart (100 in the paper; 10-20 already beat PGD of that budget).
        restarts: runs from fresh random starts for the samples not broken yet.
        rho: the checkpoint test's fraction of loss increases (0.75).
        momentum: weight of the new gradient point (0.75; the first step uses 1).
        norm, loss, domain, seed, batch_size, progress: see ``Attack``.

    Samples are frozen at the first iterate that succeeds; the others return their best-loss point.
    After a step-size halving a sample restarts from its best point without momentum.
    """

    name = "apgd"

    def __init__(self, norm: str = "linf", steps: int = 100, restarts: int = 1, rho: float = 0.75,
                 momentum: float = 0.75, **options):
        super().__init__(norm=norm, **options)
        self.steps = check_int("steps", steps, 1)
        self.restarts = check_int("restarts", restarts, 1)
        for name, v in (("rho", rho), ("momentum", momentum)):
            if not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise InvalidParameterError(f"{name}={v!r}; expected a number in (0, 1]")
        self.rho, self.momentum = float(rho), float(momentum)

    def params(self):
        return dict(super().params(), steps=self.steps, restarts=self.restarts, rho=self.rho,
                    momentum=self.momentum, checkpoints=checkpoints(self.steps))

    def perturb(self, oracle, x, y, eps, rng, targets=None):
        best, found = x.copy(), numpy.zeros(x.shape[0], dtype=bool)
        for _ in range(self.restarts):
            act = numpy.flatnonzero(~found)
            if act.size == 0:
                break
            xa, hit = self._run(oracle, x[act], y[act], None if targets is None else targets[act], eps, rng)
            best[act], found[act] = xa, hit
        return best, found

    def _run(self, oracle, x0, y, t, eps, rng):
        """One APGD run from a random start; returns (points, hit) for the rows of x0."""
        xp = get_xp(x0)
        sign = 1.0 if t is None else -1.0
        labels = y if t is None else t
        out, done = x0.copy(), numpy.zeros(x0.shape[0], dtype=bool)
        xa = project(xp, random_in_ball(xp, rng, x0, eps, self.norm), x0, eps, self.norm, self.domain)
        logits, grad = oracle(xa, labels, self.loss, sign)
        f = sign * loss_value(xp, logits, labels, self.loss)
        s = {"idx": numpy.arange(x0.shape[0]), "x0": x0, "y": y, "lab": labels, "t": t, "xa": xa, "prev": xa,
             "grad": grad, "f": f, "f_best": f, "x_best": xa, "g_best": grad, "f_last": f,
             "eta": xp.full(x0.shape[0], 2.0 * eps, dtype=x0.dtype), "ups": xp.zeros(x0.shape[0]),
             "reduced": xp.zeros(x0.shape[0], dtype=bool)}
        s = self._freeze(s, hits(logits, y, t), out, done)
        marks, last = set(checkpoints(self.steps)), 0
        for i in range(self.steps):
            if s["idx"].size == 0:
                break
            a = 1.0 if i == 0 else self.momentum
            xa, x0 = s["xa"], s["x0"]
            z = self.step(xp, xa, x0, s["grad"], s["eta"].reshape((-1,) + (1,) * (xa.ndim - 1)), eps)
            new = project(xp, xa + a * (z - xa) + (1 - a) * (xa - s["prev"]), x0, eps, self.norm, self.domain)
            logits, grad = oracle(new, s["lab"], self.loss, sign)
            f = sign * loss_value(xp, logits, s["lab"], self.loss)
            better = f > s["f_best"]
            s.update(prev=xa, xa=new, grad=grad, ups=s["ups"] + (f > s["f"]), f=f,
                     f_best=xp.where(better, f, s["f_best"]), x_best=_where_rows(xp, better, new, s["x_best"]),
                     g_best=_where_rows(xp, better, grad, s["g_best"]))
            s = self._freeze(s, hits(logits, s["y"], s["t"]), out, done)
            if i + 1 in marks:
                s = self._checkpoint(xp, s, i + 1 - last)
                last = i + 1
        out[s["idx"]] = s["x_best"]
        return out, done

    def _checkpoint(self, xp, s, k):
        """Halve eta where the loss oscillated or stalled; those samples go back to their best point."""
        reduce = (s["ups"] <= self.rho * k) | (~s["reduced"] & (s["f_last"] >= s["f_best"]))
        s["eta"] = xp.where(reduce, s["eta"] / 2, s["eta"])
        for key, best in (("xa", "x_best"), ("prev", "x_best"), ("grad", "g_best")):
            s[key] = _where_rows(xp, reduce, s[best], s[key])
        s.update(reduced=reduce, f_last=s["f_best"], ups=xp.zeros_like(s["ups"]))
        return s

    @staticmethod
    def _freeze(s, hit, out, done):
        """Record the rows that succeeded and drop them from the state."""
        hit = asnumpy(hit)
        if not hit.any():
            return s
        out[s["idx"][hit]] = s["xa"][hit]
        done[s["idx"][hit]] = True
        keep = ~hit
        return {k: (v if v is None else v[keep]) for k, v in s.items()}


def loss_value(xp, logits, labels, loss: str):
    """(N,) per-sample loss, in float64 (float32 logits would underflow the cross-entropy's clamp)."""
    return loss_and_cotangent(xp, xp.asarray(logits, dtype=numpy.float64), labels, loss)[0]


def _where_rows(xp, mask, a, b):
    """Rows of a where mask (N,) is set, else rows of b."""
    return xp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
