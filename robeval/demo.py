"""``robeval demo``: the whole job on a built-in example that works offline on a fresh machine.

Trains two small classifiers on scikit-learn's 8x8 digits (or on MNIST when it is already on disk,
see ``robeval.data``): a plain one (cross-entropy) and a robust one (IBP-trained, Gowal et al. 2018),
exports both to ONNX, audits both and compares them. Without PyTorch the shipped IBP-trained model
stands in for the robust one and a scikit-learn MLP for the plain one.

>>> # result = robeval.demo.run_demo("robeval-demo"); print("\\n".join(result.summary()))
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy

from .auditor import PROFILES, Profile, audit
from .errors import DataNotFoundError, InvalidParameterError
from .report.report import Report, headline_eps

#: Training settings per data set: hidden width, epochs (plain, robust), batch size, IBP eps, train samples.
SETTINGS = {
    "digits": {"hidden": 64, "epochs": (30, 60), "batch": 128, "lr": 4e-3, "eps": 0.1, "train": None},
    "mnist": {"hidden": 128, "epochs": (3, 8), "batch": 128, "lr": 1e-3, "eps": 0.1, "train": 20000},
}
QUICK_SETTINGS = {"digits": {"epochs": (2, 3), "train": 400}, "mnist": {"epochs": (1, 1), "train": 2000}}
#: Test samples audited: the whole digits test split; 500 of MNIST's (under two minutes on two cores).
AUDIT_LIMIT = {"digits": 450, "mnist": 500}
QUICK_AUDIT_LIMIT = 60


@dataclass(frozen=True)
class DemoResult:
    """The two reports, where they were written, and what was done differently from the default."""

    out: Path
    data: str
    reports: dict[str, Report]
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    models: dict[str, str] = field(default_factory=dict)

    def summary(self) -> list[str]:
        """A table comparing the models: clean, strongest attack and best certificate per eps."""
        first = next(iter(self.reports.values()))
        eps = [e for e in first.eps if e in (0.05, 0.1)] or [headline_eps(first.eps)]
        header = ["model", "clean"] + [f"{k}@{e:g}" for e in eps for k in ("PGD", "APGD", "certified")] + ["Lipschitz"]
        rows = []
        for name, rep in self.reports.items():
            row = [name, f"{100 * rep.clean_accuracy:.1f}%"]
            for e in eps:
                for attack in ("pgd", "apgd"):
                    v = rep.metric("attack_accuracy", attack=attack, eps=e, norm=rep.settings["norm"])
                    row.append("-" if v is None else f"{100 * v:.1f}%")
                certs = [rep.metric("certified_accuracy", method=c.method, eps=e, norm=c.norm)
                         for c in rep.certificates]
                certs = [c for c in certs if c is not None]
                row.append(f"{100 * max(certs):.1f}%" if certs else "-")
            row.append("-" if rep.lipschitz_bound is None else f"{rep.lipschitz_bound:.3g}")
            rows.append(row)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        lines = [f"robeval demo on {self.data} ({first.data['n']} test samples, eps in L-inf):"]
        lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append("PGD/APGD: robust accuracy under attack (an upper bound); certified: the best of the "
                     "certificates (a lower bound)")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"{name}: {self.out / name / 'report.html'}" for name in self.reports]
        lines.append(f"total time: {self.seconds:.1f}s")
        return lines

    def markdown(self) -> str:
        return "# robeval demo\n\n```\n" + "\n".join(self.summary()) + "\n```\n"


def has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def choose_data(data: str, quick: bool) -> str:
    """'auto': MNIST when it is already on disk ($ROBEVAL_DATA or the cache) and not --quick, else digits."""
    if data not in ("auto", "digits", "mnist"):
        raise InvalidParameterError(f"data={data!r}; expected 'auto', 'digits' or 'mnist'")
    if data != "auto":
        return data
    if quick:
        return "digits"
    from .data import load_dataset

    try:
        load_dataset("mnist", split="test", limit=1, download=False)
    except DataNotFoundError:
        return "digits"
    return "mnist"


@contextlib.contextmanager
def one_thread():
    """Run torch and the BLAS libraries on one thread: for models this small, threads cost more than
    they give (on a busy two-core machine, ten times more)."""
    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits  # installed with scikit-learn
        except ImportError:
            pass
        else:
            stack.enter_context(threadpool_limits(1))
        if has_torch():
            import torch

            before = torch.get_num_threads()
            torch.set_num_threads(1)
            stack.callback(torch.set_num_threads, before)
        yield


def train_models(data: str, out: Path, quick: bool, seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Train the plain and the IBP model and export both to ONNX; returns name -> ONNX path."""
    import torch
    from torch import nn

    from .data import load_dataset
    from .training.torch import EpsilonSchedule, IBPLoss, KappaSchedule, Trainer, export_onnx

    cfg = dict(SETTINGS[data], **(QUICK_SETTINGS[data] if quick else {}))
    train = load_dataset(data, split="train", limit=cfg["train"])
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    inputs = int(numpy.prod(train.x.shape[1:]))
    h = cfg["hidden"]
    paths = {}
    for name, epochs in zip(("plain", "robust"), cfg["epochs"]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(inputs, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                              nn.Linear(h, 10))
        loss = None
        if name == "robust":
            warm, ramp = max(epochs // 12, 1) if epochs > 2 else 0, max(epochs // 2, 1)
            loss = IBPLoss(EpsilonSchedule(target=cfg["eps"], warmup=warm, ramp=ramp),
                           KappaSchedule(start=1.0, end=0.5, warmup=warm, ramp=ramp))
        t0 = time.perf_counter()
        Trainer(model, loss=loss, epochs=epochs, batch_size=cfg["batch"], lr=cfg["lr"], progress=False,
                seed=seed).fit((x, y))
        what = "cross-entropy" if loss is None else f"IBP, eps ramped to {cfg['eps']}"
        log(f"trained the {name} model ({what}, {epochs} epochs on {len(train)} samples) in "
            f"{time.perf_counter() - t0:.1f}s")
        paths[name] = export_onnx(model.eval(), out / "models" / f"{name}.onnx", x[:1])
    return paths


def fallback_models(log: Callable[[str], None]) -> dict[str, Any]:
    """Without PyTorch: the shipped IBP-trained model, and a scikit-learn MLP as the plain one."""
    from .cli.common import builtin_model_path

    models: dict[str, Any] = {}
    try:
        models["plain"] = sklearn_plain_model()
    except ImportError:
        log("scikit-learn is not installed either: auditing the shipped robust model only")
    models["robust"] = builtin_model_path()
    return models


def sklearn_plain_model():
    """An MLPClassifier on the digits train split, as a robeval Network (dense/relu nodes)."""
    from sklearn.neural_network import MLPClassifier

    from .data import load_dataset
    from .ir import Network, Node

    train = load_dataset("digits", split="train")
    clf = MLPClassifier(hidden_layer_sizes=(64, 64), max_iter=300, random_state=0)
    clf.fit(train.x.reshape(len(train), -1), train.y)
    nodes = [Node("flatten", "flatten", ("input",))]
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        nodes.append(Node(f"dense{i}", "dense", (nodes[-1].name,),
                          params={"weight": w.T.astype(numpy.float32), "bias": b.astype(numpy.float32)}))
        if i < len(clf.coefs_) - 1:
            nodes.append(Node(f"relu{i}", "relu", (nodes[-1].name,)))
    return Network(nodes, (1, 8, 8), meta={"source": "scikit-learn MLPClassifier"})


def demo_profile(quick: bool) -> Profile:
    """The audit profile of the demo: the CI profile, trimmed further for --quick."""
    if not quick:
        return PROFILES["quick"]
    return replace(PROFILES["quick"], attacks=(("fgsm", None), ("pgd", 5)), draws=1, certifiers=("ibp", "lipschitz"),
                   noise_levels=(0.0, 0.1, 0.3), examples=4)


def run_demo(out: str | Path = "robeval-demo", quick: bool = False, data: str = "auto", seed: int = 0,
             progress: bool = False, log: Callable[[str], None] = print) -> DemoResult:
    """Train (or load) a plain and a robust model, audit both, and write their reports into ``out``.

    Args:
        out: folder for models/, plain/ and robust/ (reports) and summary.md.
        quick: tiny training and audit (seconds; for tests).
        data: "auto" (MNIST when on disk and not quick, else digits), "digits" or "mnist".
        seed, progress: as in ``audit``; log: where progress lines go.
    """
    with one_thread():
        return _run_demo(Path(out), quick, data, seed, progress, log)


def _run_demo(out: Path, quick: bool, data: str, seed: int, progress: bool, log: Callable[[str], None]) -> DemoResult:
    start = time.perf_counter()
    notes = []
    if has_torch():
        data = choose_data(data, quick)
        models = train_models(data, out, quick, seed, log)
    else:
        if data == "mnist":
            raise InvalidParameterError("the MNIST demo trains its models and needs PyTorch: pip install torch")
        data = "digits"
        notes.append("PyTorch is not installed: the shipped IBP-trained model (robeval/models/digits_mlp.onnx) is "
                     "the robust model and a scikit-learn MLP the plain one; pip install torch to train both")
        log(notes[-1])
        models = fallback_models(log)
    limit = QUICK_AUDIT_LIMIT if quick else AUDIT_LIMIT[data]
    profile = demo_profile(quick)
    reports = {}
    for name, model in models.items():
        t0 = time.perf_counter()
        label = str(model) if isinstance(model, Path) else f"{name} (scikit-learn MLP)"
        report = audit(model, data, profile=profile, limit=limit, seed=seed, progress=progress, label=label)
        report.save(out / name)
        reports[name] = report
        log(f"audited the {name} model in {time.perf_counter() - t0:.1f}s")
    result = DemoResult(out, data, reports, tuple(notes), time.perf_counter() - start,
                        {k: str(v) for k, v in models.items()})
    (out / "summary.md").write_text(result.markdown(), encoding="utf-8")
    return result


__all__ = ["run_demo", "DemoResult", "choose_data", "demo_profile"]
