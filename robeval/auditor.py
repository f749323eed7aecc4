"""``audit``: one robustness report for a model — clean accuracy, random noise, FGSM/PGD/APGD at
several radii, IBP/CROWN/Lipschitz certificates where the model allows them, the certificate-vs-attack
consistency check and the gradient-masking warnings; with ``sigma=``, randomized-smoothing
certificates too, kept apart as probabilistic.

The ``Evaluator`` computes each of these on demand and caches nothing but the model, the data and
the clean predictions; ``robeval gate`` uses it to compute only the metrics its checks need.

>>> # report = robeval.audit("model.onnx", "digits", profile="quick")
>>> # report.save("out/")   # report.json, report.html, report.md
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy

from .errors import InvalidParameterError, RobevalError, UnsupportedOpError, UnsupportedRuleError
from .report.report import Example, Report, SkippedCertificate
from .util import progress_bar


class NonFiniteOutputError(RobevalError):
    """The model returns NaN or inf on valid inputs, so no accuracy it has can be trusted."""


class CertifierUnavailableError(RobevalError):
    """A certificate was asked for that this model (its ops or the norm) does not allow."""


@dataclass(frozen=True)
class Profile:
    """What an audit runs. ``limit`` is the default number of samples (None: all)."""

    name: str
    limit: int | None
    eps: dict[str, tuple[float, ...]]  # per norm
    attacks: tuple[tuple[str, int | None], ...]  # (attack, steps); FGSM takes no steps
    restarts: int
    noise_kinds: tuple[str, ...]
    noise_levels: tuple[float, ...]
    draws: int
    certifiers: tuple[str, ...]
    masking_checks: tuple[str, ...]  # attacks whose results get the gradient-masking checks
    examples: int = 6
    smoothing_n: int = 1000  # randomized smoothing (only with sigma=): estimation draws per sample
    smoothing_n0: int = 100  # selection draws per sample
    smoothing_alpha: float = 0.001  # failure probability


PROFILES: dict[str, Profile] = {
    "quick": Profile("quick", limit=200, eps={"linf": (0.01, 0.05, 0.1, 0.2, 0.3), "l2": (0.1, 0.25, 0.5, 1.0, 2.0)},
                     attacks=(("fgsm", None), ("pgd", 10), ("apgd", 10)), restarts=1,
                     noise_kinds=("uniform", "pixels"), noise_levels=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5), draws=2,
                     certifiers=("ibp", "crown", "lipschitz"), masking_checks=("pgd",)),
    "full": Profile("full", limit=None,
                    eps={"linf": (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3), "l2": (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)},
                    attacks=(("fgsm", None), ("pgd", 40), ("apgd", 100)), restarts=2,
                    noise_kinds=("uniform", "gaussian", "pixels"),
                    noise_levels=(0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5), draws=10,
                    certifiers=("ibp", "crown", "lipschitz"), masking_checks=("pgd", "apgd"), smoothing_n=10_000),
}


def get_profile(profile: str | Profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    try:
        return PROFILES[str(profile).lower()]
    except KeyError:
        raise InvalidParameterError(f"profile={profile!r}; expected one of {sorted(PROFILES)}") from None


def noise_kind(kind: str) -> str:
    """The noise module's name for ``kind``: 'pixels' and 'replace' name the same corruption."""
    from .certifiers.noise import KINDS

    if kind in KINDS:
        return kind
    alias = {"pixels": "replace", "replace": "pixels", "pixel": "replace"}.get(kind)
    if alias in KINDS:
        return alias
    raise InvalidParameterError(f"noise kind={kind!r} is not known; expected one of {sorted(set(KINDS) | {'pixels'})}")


def certifier_classes() -> dict[str, type]:
    """Every registered certifier (CROWN registers itself when its module is importable)."""
    from . import certifiers

    try:
        from .certifiers import crown  # noqa: F401 - registers crown, crown-ibp, best
    except ImportError:
        pass
    return dict(certifiers.CERTIFIERS)


def predict_checked(adapter: Any, x: Any, batch: int = 1000) -> numpy.ndarray:
    """(N,) predicted classes; raises NonFiniteOutputError when an output is NaN or inf."""
    from .backend import asnumpy

    preds = numpy.empty(int(x.shape[0]), dtype=numpy.int64)
    for s in range(0, int(x.shape[0]), batch):
        out = numpy.asarray(asnumpy(adapter.predict(x[s:s + batch])), dtype=numpy.float64)
        bad = ~numpy.isfinite(out).reshape(out.shape[0], -1).all(axis=1)
        if bad.any():
            rows = (numpy.flatnonzero(bad) + s)[:10].tolist()
            raise NonFiniteOutputError(
                f"the model's output is NaN/inf for {int(bad.sum())} of the first {s + out.shape[0]} inputs "
                f"(samples {rows}); expected finite logits. Check the weights for NaN/inf, divisions by zero or "
                "logs of non-positive values, then re-export the model")
        preds[s:s + batch] = out.argmax(axis=1)
    return preds


@dataclass
class Evaluator:
    """A model on a data set with shared settings; each method computes one kind of result.

    Args:
        adapter: a model adapter (``robeval.load_model``); x: (N, *input_shape); y: (N,) labels.
        norm, domain, seed, device, batch_size, progress: as in ``audit``.
    """

    adapter: Any
    x: Any
    y: numpy.ndarray
    norm: str = "linf"
    domain: tuple[float, float] | None = (0.0, 1.0)
    seed: int = 0
    device: str = "cpu"
    batch_size: int | None = None
    progress: bool = False
    sharding: Any = None  # a robeval.executors.base.Sharding: certificates, attacks and noise in shards
    predictions: numpy.ndarray = field(init=False)
    _network: Any = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.y = numpy.asarray(self.y, dtype=numpy.int64)
        if int(self.x.shape[0]) == 0:
            raise InvalidParameterError("the data set is empty; pass at least one sample")
        self.predictions = predict_checked(self.adapter, self.x, self.batch_size or 1000)

    @classmethod
    def load(cls, model: Any, data: Any, limit: int | None = None, split: str = "test", data_path: Any = None,
             **options) -> Evaluator:
        """Load the model and the data (a name such as 'digits', a Dataset, an (x, y) pair or a dict)."""
        from .adapters.base import load_model

        adapter = load_model(model)
        x, y, _, domain = load_data(adapter, data, limit, split, data_path)
        options.setdefault("domain", domain)
        return cls(adapter, x, y, **options)

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    @property
    def clean_accuracy(self) -> float:
        return float((self.predictions == self.y).mean())

    @property
    def network(self):
        if self._network is None:
            self._network = self.adapter.to_network()
        return self._network

    def attack(self, name: str, eps: Sequence[float], steps: int | None = None, restarts: int | None = None,
               checks: bool = False, norm: str | None = None):
        """An AttackReport at every eps (masking warnings collected in it, not printed)."""
        from .certifiers.attacks import attack
        from .certifiers.consistency import GradientMaskingWarning

        budget = {} if name == "fgsm" else {"steps": steps, "restarts": restarts}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GradientMaskingWarning)
            return attack(self.adapter, (self.x, self.y), attack=name, eps=list(eps), norm=norm or self.norm,
                          seed=self.seed, domain=self.domain, batch_size=self.batch_size, progress=self.progress,
                          checks=checks, sharding=self.sharding, **budget)

    def unsupported(self, method: str, norm: str | None = None) -> str | None:
        """Why ``method`` cannot certify this model (None when it can)."""
        classes = certifier_classes()
        if method not in classes:
            return f"{method} is not installed (known: {', '.join(sorted(classes))})"
        cls = classes[method]
        norm = norm or self.norm
        if norm not in cls.norms:
            return f"{method} does not support norm {norm!r} (supports {', '.join(cls.norms)})"
        missing = cls.unsupported_ops(self.network)
        if missing:
            return f"unsupported op(s): {', '.join(f'{op} (node {node!r})' for op, node in missing)}"
        return None

    def certify(self, method: str, eps: Sequence[float], norm: str | None = None):
        """A CertificationResult; raises CertifierUnavailableError saying why when the method cannot run."""
        from .api import certify

        reason = self.unsupported(method, norm)
        if reason is not None:
            raise CertifierUnavailableError(f"{method} cannot certify this model: {reason}")
        return certify(self.adapter, (self.x, self.y), method=method, eps=list(eps), norm=norm or self.norm,
                       device=self.device, batch_size=self.batch_size, domain=self.domain, progress=self.progress,
                       sharding=self.sharding)

    def smooth(self, sigma: float, radii: Sequence[float], alpha: float = 0.001, n: int | None = None,
               n0: int | None = None):
        """A SmoothingResult (randomized smoothing, probabilistic) at L2 ``radii``, seeded by the run's seed."""
        from .api import certify

        budget = {k: v for k, v in (("n", n), ("n0", n0)) if v is not None}
        return certify(self.adapter, (self.x, self.y), method="smoothing", eps=list(radii), norm="l2",
                       device=self.device, batch_size=self.batch_size, domain=self.domain, progress=self.progress,
                       sigma=sigma, alpha=alpha, seed=self.seed, **budget)

    def noise(self, kind: str, levels: Sequence[float], draws: int):
        from .certifiers.noise import sweep

        return sweep(self.adapter, (self.x, self.y), kind=noise_kind(kind), levels=list(levels), draws=draws,
                     seed=self.seed, domain=self.domain, batch_size=self.batch_size, progress=self.progress,
                     sharding=self.sharding)

    def lipschitz_bound(self) -> float:
        """Global L2 Lipschitz bound of the logits (softmax stripped)."""
        reason = self.unsupported("lipschitz", "l2")
        if reason is not None:
            raise CertifierUnavailableError(f"no Lipschitz bound for this model: {reason}")
        return float(self.network.lipschitz_bound())


def load_data(adapter: Any, data: Any, limit: int | None, split: str = "test", data_path: Any = None):
    """(x, y, name, domain) laid out for the adapter, from a data set name or arrays."""
    from .api import _to_model_layout, as_arrays
    from .data import Dataset, check_against_input_shape, load_dataset

    if isinstance(data, str):
        data = load_dataset(data, split=split, limit=limit, path=data_path, input_shape=tuple(adapter.input_shape))
        limit = None
    if isinstance(data, Dataset):
        ds = data.subset(limit) if limit else data
        x = check_against_input_shape(ds, adapter.input_shape, channels_last=False)
        return x, ds.y, ds.name, tuple(ds.value_range)
    x, y = as_arrays(data, limit)
    return _to_model_layout(adapter, numpy.asarray(x)), numpy.asarray(y), "arrays", (0.0, 1.0)


def audit(model: Any, data: Any, profile: str | Profile = "quick", eps: Sequence[float] | None = None,
          norm: str = "linf", limit: int | None = None, seed: int = 0, device: str = "cpu",
          batch_size: int | None = None, domain: Any = "data", split: str = "test",
          data_path: Any = None, progress: bool = False, label: str | None = None,
          data_name: str | None = None, executor: Any = None, workers: int | None = None,
          shard_size: int | None = None, shards: Any = None, resume: bool = False, ray_address: str | None = None,
          gpus_per_worker: float | None = None, sigma: float | Sequence[float] | None = None,
          smoothing_n: int | None = None, smoothing_n0: int | None = None, smoothing_alpha: float | None = None,
          smoothing_radii: Sequence[float] | None = None) -> Report:
    """Audit ``model`` on ``data``: clean accuracy, noise sweeps, attacks, certificates, checks.

    Args:
        model: anything ``robeval.load_model`` takes (path, torch/keras model, ONNX, Network, adapter).
        data: a data set name ("digits", "mnist", "data.npz"), a Dataset, an (x, y) pair or a dict.
        profile: "quick" (CI: minutes on a CPU; 200 samples, PGD-10, 2 noise draws) or "full".
        eps: radii for attacks and certificates (None: the profile's for ``norm``).
        norm: "linf" or "l2"; limit: samples to use (None: the profile's); seed: attacks and noise.
        device, batch_size: as in ``robeval.certify``; domain: input range (low, high), None for
            unbounded inputs, or "data" (default) for the data set's value range.
        split, data_path: for a data set given by name; progress: progress bars on stderr.
        label: the model's name in the report (default: the path, or the type's name).
        data_name: the data's name in the report (default: the data set's, or "arrays").
        executor, workers, shard_size, shards, resume, ray_address, gpus_per_worker: run every
            certificate, attack and noise sweep in shards (see ``robeval.certify``); one shard folder
            holds every job of the audit, so ``resume=True`` reruns only the missing shards.
        sigma: one or more Gaussian noise levels for randomized smoothing (None: no smoothing); the
            report keeps these probabilistic certificates apart. smoothing_n, smoothing_n0,
            smoothing_alpha: estimation draws, selection draws and failure probability (None: the
            profile's: 1,000 draws quick, 10,000 full; 100; 0.001). smoothing_radii: L2 radii (None:
            0 and the audit's eps when ``norm="l2"``, else 0 and the profile's L2 radii).
            Smoothing runs unsharded (its noise stream runs over the samples in order).
    Returns:
        Report, with ``to_json``, ``to_html``, ``to_markdown`` and ``save(dir)``.

    >>> # report = robeval.audit("robeval/models/digits_mlp.onnx", "digits", profile="quick")
    >>> # report.metric("attack_accuracy", attack="pgd", eps=0.1)
    """
    from .adapters.base import load_model
    from .certifiers.base import check_eps, check_norm

    prof = get_profile(profile)
    norm = check_norm(norm, ("linf", "l2"))
    eps_values = check_eps(eps if eps is not None else prof.eps[norm])
    smoothing = smoothing_settings(prof, norm, eps_values, sigma, smoothing_n, smoothing_n0, smoothing_alpha,
                                   smoothing_radii)
    start = time.perf_counter()
    adapter = load_model(model)
    x, y, loaded_name, data_domain = load_data(adapter, data, limit if limit is not None else prof.limit, split,
                                             data_path)
    domain = data_domain if isinstance(domain, str) and domain == "data" else domain
    sharding = _audit_sharding(adapter, x, y, executor, workers, shard_size, shards, resume, ray_address,
                               gpus_per_worker, progress, profile=prof.name, eps=list(eps_values), norm=norm,
                               seed=seed, device=device, batch_size=batch_size, domain=domain)
    ev = Evaluator(adapter, x, y, norm=norm, domain=None if domain is None else tuple(domain),
                   seed=seed, device=device, batch_size=batch_size, progress=progress, sharding=sharding)
    seconds = {"clean": time.perf_counter() - start}
    run = _AuditRun(ev, prof, eps_values, seconds, smoothing)
    steps = [("noise", run.noise), ("certificates", run.certificates), ("attacks", run.attacks),
             ("consistency", run.consistency)] + ([("smoothing", run.smoothing)] if smoothing else [])
    for name, step in progress_bar(steps, total=len(steps), desc="audit", enabled=progress):
        t0 = time.perf_counter()
        step()
        seconds[name] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - start
    return Report(
        model={"label": label or _label(model), "framework": getattr(adapter, "framework", type(adapter).__name__),
               "input_shape": [int(d) for d in adapter.input_shape], "num_classes": int(adapter.num_classes)},
        data={"name": data_name or loaded_name, "n": ev.n,
              "domain": [float("-inf"), float("inf")] if ev.domain is None else list(ev.domain)},
        profile=prof.name,
        settings={"norm": norm, "eps": list(eps_values), "seed": seed, "device": device, "batch_size": batch_size,
                  "attacks": [{"attack": a, "steps": s, "restarts": None if a == "fgsm" else prof.restarts}
                              for a, s in prof.attacks],
                  "noise": {"kinds": [noise_kind(k) for k in prof.noise_kinds], "levels": list(prof.noise_levels),
                            "draws": prof.draws},
                  "certifiers": list(prof.certifiers), **({"smoothing": smoothing} if smoothing else {})},
        clean_accuracy=ev.clean_accuracy, attacks=tuple(run.attack_reports), noise=tuple(run.noise_results),
        certificates=tuple(run.certs), skipped=tuple(run.skipped), violations=tuple(run.violations),
        pairs_checked=run.pairs_checked, warnings=tuple(run.warnings), examples=run.examples(),
        lipschitz_bound=run.lipschitz, smoothing=tuple(run.smoothed), seconds=seconds)


def smoothing_settings(prof: Profile, norm: str, eps: Sequence[float], sigma: Any, n: int | None, n0: int | None,
                       alpha: float | None, radii: Sequence[float] | None) -> dict[str, Any] | None:
    """The audit's smoothing settings {sigma: [...], n0, n, alpha, radii}, checked; None without sigma."""
    from .certifiers.base import check_eps
    from .certifiers.smoothing import check_smoothing_params

    if sigma is None:
        if any(v is not None for v in (n, n0, alpha, radii)):
            raise InvalidParameterError("smoothing options were given without sigma; pass sigma (e.g. sigma=0.25, "
                                        "--sigma 0.25) to run randomized smoothing")
        return None
    sigmas = [sigma] if isinstance(sigma, (int, float)) else list(sigma)
    if not sigmas:
        raise InvalidParameterError("sigma=[]; expected one or more noise levels, e.g. sigma=0.25")
    n = prof.smoothing_n if n is None else n
    n0 = prof.smoothing_n0 if n0 is None else n0
    alpha = prof.smoothing_alpha if alpha is None else alpha
    checked = [check_smoothing_params(s, n0, n, alpha) for s in sigmas]
    if radii is None:
        radii = sorted({0.0, *(eps if norm == "l2" else prof.eps["l2"])})
    elif any(not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0 for r in radii) or not len(radii):
        raise InvalidParameterError(f"smoothing radii={list(radii)!r}; expected one or more finite L2 radii >= 0")
    return {"sigma": [c[0] for c in checked], "n0": checked[0][1], "n": checked[0][2], "alpha": checked[0][3],
            "radii": list(check_eps(radii))}


def _audit_sharding(adapter, x, y, executor, workers, shard_size, shards, resume, address, gpus, progress,
                    **settings):
    """The audit's Sharding (None without sharding options); its folder is tied to the model's
    network (or, for a model robeval cannot convert, its type and source) and the data."""
    from .executors import make_sharding, run_identity

    identity = None
    if shards is not None:
        try:
            net = adapter.to_network()
        except RobevalError:  # no network: identify the model by its kind and file
            from .ir import Network, Node

            net = Network([Node("id", "flatten", ("input",), attrs={"model": type(adapter).__name__,
                                                                    "source": str(getattr(adapter, "path", ""))})],
                          tuple(adapter.input_shape))
        identity = run_identity("audit", net, x, y, shard_size=shard_size, **settings)
    return make_sharding(executor, workers, shard_size, shards, resume, identity, address, gpus, progress=progress)


def _label(model: Any) -> str:
    if isinstance(model, str) or hasattr(model, "__fspath__"):
        return str(model)
    return type(model).__name__


class _AuditRun:
    """The steps of one audit, each filling its part of the report."""

    def __init__(self, ev: Evaluator, prof: Profile, eps: tuple[float, ...], seconds: dict,
                 smoothing: dict[str, Any] | None = None):
        self.ev, self.prof, self.eps, self.seconds, self.smoothing_settings = ev, prof, eps, seconds, smoothing
        self.smoothed: list = []
        self.attack_reports: list = []
        self.noise_results: list = []
        self.certs: list = []
        self.skipped: list[SkippedCertificate] = []
        self.violations: list[str] = []
        self.warnings: list[str] = []
        self.pairs_checked = 0
        self.lipschitz: float | None = None

    def noise(self):
        for kind in self.prof.noise_kinds:
            self.noise_results.append(self.ev.noise(kind, self.prof.noise_levels, self.prof.draws))

    def certificates(self):
        optional = {"crown", "crown-ibp", "crown-pure", "best"}
        for method in self.prof.certifiers:
            reason = self.ev.unsupported(method)
            if reason is None:
                try:
                    self.certs.append(self.ev.certify(method, self.eps))
                    continue
                except (UnsupportedOpError, UnsupportedRuleError) as exc:
                    reason = str(exc)
                except RobevalError as exc:  # CROWN is optional: e.g. over its memory budget
                    if method not in optional:
                        raise
                    reason = str(exc)
            self.skipped.append(SkippedCertificate(method, reason))
        if self.ev.unsupported("lipschitz", "l2") is None:
            self.lipschitz = self.ev.lipschitz_bound()

    def attacks(self):
        for name, steps in self.prof.attacks:
            restarts = None if name == "fgsm" else self.prof.restarts
            report = self.ev.attack(name, self.eps, steps, restarts, checks=name in self.prof.masking_checks)
            self.attack_reports.append(report)
            self.warnings.extend(f"{name}: {w}" if not w.startswith(name) else w for w in report.warnings)

    def smoothing(self):
        """Randomized smoothing at each sigma (probabilistic; not paired with the attacks, which attack
        the network f while smoothing certifies the smoothed classifier g)."""
        st = self.smoothing_settings
        for sigma in st["sigma"]:
            self.smoothed.append(self.ev.smooth(sigma, st["radii"], alpha=st["alpha"], n=st["n"], n0=st["n0"]))

    def consistency(self):
        from .certifiers.consistency import ConsistencyError, check_certified

        for cert in self.certs:
            for report in self.attack_reports:
                self.pairs_checked += 1
                try:
                    check_certified(report.results, cert)
                except ConsistencyError as exc:
                    self.violations.append(str(exc))

    def examples(self) -> tuple[Example, ...]:
        """A few adversarial inputs beside their originals, from the strongest attack."""
        reports = [r for r in self.attack_reports if r.results]
        if not reports or self.prof.examples <= 0:
            return ()
        best = min(reports, key=lambda r: sum(r.robust_accuracy))
        want = self.prof.examples
        broken = [numpy.flatnonzero(r.success & (r.clean_predictions == r.labels)) for r in best.results]
        pick = next((i for i, b in enumerate(broken) if b.size >= want), int(numpy.argmax([b.size for b in broken])))
        res = best.results[pick]
        return tuple(Example(index=int(i), label=int(res.labels[i]), clean_prediction=int(res.clean_predictions[i]),
                             adv_prediction=int(res.adv_predictions[i]), attack=res.attack, eps=float(res.eps),
                             x=numpy.asarray(self.ev.x[i]), x_adv=numpy.asarray(res.x_adv[i]))
                     for i in broken[pick][:want])


__all__ = ["audit", "Evaluator", "Profile", "PROFILES", "NonFiniteOutputError", "CertifierUnavailableError",
           "get_profile", "noise_kind"]
