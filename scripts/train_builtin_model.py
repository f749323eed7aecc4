"""Train the small classifier that ships with robeval (robeval/models/digits_mlp.onnx): an MLP
64-64-64-10 on scikit-learn's 8x8 digits, trained with IBP (eps ramped to 0.1) so that the
built-in `robeval certify` run shows non-trivial certificates. Runs offline in under a minute.

    python scripts/train_builtin_model.py [--out robeval/models/digits_mlp.onnx]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from robeval.data import load_dataset
from robeval.training.torch import EpsilonSchedule, IBPLoss, KappaSchedule, Trainer, certified_accuracy
from robeval.training.torch.trainer import accuracy, export_onnx


def build() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "robeval/models/digits_mlp.onnx"))
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--eps", type=float, default=0.1)
    args = parser.parse_args()
    torch.manual_seed(0)
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    xt, yt = torch.from_numpy(train.x), torch.from_numpy(train.y)
    xv, yv = torch.from_numpy(test.x), torch.from_numpy(test.y)
    model = build()
    loss = IBPLoss(EpsilonSchedule(target=args.eps, warmup=10, ramp=60),
                   KappaSchedule(start=1.0, end=0.5, warmup=10, ramp=60))
    start = time.perf_counter()
    Trainer(model, loss=loss, epochs=args.epochs, batch_size=64, lr=2e-3, progress=False).fit((xt, yt))
    seconds = time.perf_counter() - start
    model.eval()
    facts = {"data": "digits (scikit-learn 8x8), train split 1347 / test split 450",
             "architecture": "Flatten-64-ReLU-64-ReLU-10", "training": f"IBP, eps ramped to {args.eps}",
             "epochs": args.epochs, "train_seconds": round(seconds, 1),
             "test_accuracy": accuracy(model, xv, yv),
             "ibp_certified_accuracy_training_code": {str(e): certified_accuracy(model, xv, yv, e)
                                                       for e in (0.01, 0.05, 0.1)},
             "command": "python scripts/train_builtin_model.py"}
    out = export_onnx(model, args.out, xv[:1])
    Path(out).with_suffix(".json").write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
