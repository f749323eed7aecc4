"""Helpers shared by the PyTorch training examples: MNIST loading, command-line options, timing.

MNIST is read with ``robeval.data.load_dataset`` when that module can find it, else straight from
the Keras-format ``mnist.npz`` named by ``$ROBEVAL_DATA`` (a file, or a folder holding it).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch


def parse_args(description: str, epochs: int, **extra: tuple[type, object, str]) -> argparse.Namespace:
    """--epochs, --quick, --seed, --threads, --out and any ``name=(type, default, help)`` extras."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default {epochs})")
    p.add_argument("--quick", action="store_true", help="tiny run on a data subset (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", default="examples_out", help="folder for plots, checkpoints and ONNX files")
    for name, (typ, default, text) in extra.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=typ, default=default, help=text)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return args


def _npz_path() -> Path:
    env = os.environ.get("ROBEVAL_DATA", "")
    candidates = [Path(env), Path(env) / "mnist.npz"] if env else []
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist.npz")
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        "MNIST not found; set ROBEVAL_DATA to mnist.npz (Keras format: x_train, y_train, x_test, y_test)"
    )


def load_mnist(split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): x float32 (N, 1, 28, 28) in [0, 1], y int64 (N,)."""
    try:
        from robeval.data import load_dataset

        ds = load_dataset("mnist", split=split, limit=limit, path=os.environ.get("ROBEVAL_DATA"),
                          download=False)
        return torch.from_numpy(np.asarray(ds.x, np.float32)), torch.from_numpy(np.asarray(ds.y, np.int64))
    except Exception:  # noqa: BLE001 - the data module is optional here; read the npz directly
        with np.load(_npz_path()) as f:
            x, y = f[f"x_{split}"][:limit], f[f"y_{split}"][:limit]
        x = torch.from_numpy(x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
        return x, torch.from_numpy(y.astype(np.int64))


#: Training images held out as the validation split (the last ones of the training file); the test
#: set is used once, for the reported numbers, and never for a choice (epochs, schedules, weights).
VAL_SIZE = 5000


def mnist(quick: bool, n_train: int = 2000, n_test: int = 1000, n_val: int | None = None):
    """(x_train, y_train, x_val, y_val, x_test, y_test): the validation split is the last ``n_val``
    training images (VAL_SIZE, or a tenth of the subset when ``quick``), never test images."""
    xtr, ytr = load_mnist("train", n_train if quick else None)
    xte, yte = load_mnist("test", n_test if quick else None)
    n_val = n_val or (max(1, len(xtr) // 10) if quick else VAL_SIZE)
    cut = len(xtr) - n_val
    return xtr[:cut], ytr[:cut], xtr[cut:], ytr[cut:], xte, yte


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and the framework: weights, shuffling, noise and attacks all follow --seed."""
    import random

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the legacy global generator, for any code that still uses it
    torch.manual_seed(seed)


class Timer:
    """Wall time since creation, in seconds."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def report(name: str, rows: dict[str, float], seconds: float) -> None:
    """Print a result block the docs table is copied from."""
    print(f"\n== {name} ==")
    for k, v in rows.items():
        print(f"{k:>40s}: {v * 100:.2f}%" if isinstance(v, float) else f"{k:>40s}: {v}")
    print(f"{'wall time':>40s}: {seconds:.1f} s")


def plot_curves(levels, curves: dict[str, np.ndarray], path: str, xlabel: str) -> str | None:
    """Accuracy (%) against noise level, one line per curve; a (seeds, levels) array is drawn as its
    mean with a band of +-1 standard deviation. None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3))
    for label, acc in curves.items():
        acc = np.atleast_2d(np.asarray(acc, dtype=float)) * 100
        mean = acc.mean(0)
        (line,) = ax.plot(levels, mean, marker="o", label=label)
        if len(acc) > 1:
            sd = acc.std(0, ddof=1)
            ax.fill_between(levels, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
