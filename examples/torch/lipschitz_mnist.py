"""1-Lipschitz MLP on full MNIST (10 classes), certified in L2 by its Lipschitz bound (after deel-lip).

Flatten -> SpectralLinear(784, 256) -> GroupSort2 -> SpectralLinear(256, 256) -> GroupSort2 ->
SpectralLinear(256, 10); every dense weight is orthonormalised (power iteration + Björck) at
each step, so the exported network is 1-Lipschitz up to rounding. Trained with the multiclass
(one-vs-all) HKR loss (default alpha 50, min_margin 1; or ``--loss tau`` for
``TauCrossEntropyLoss``), Adam, learning rate divided by 10 for the last 20% of the epochs.

A logit gap z_y - z_j cannot close within an L2 radius (z_y - z_j) / (||W_y - W_j|| L_body),
where L_body is the bound of the layers below the last dense layer; the smallest of these
over j is the certified radius, as robeval's ``lipschitz`` certifier computes it. Reports clean
accuracy and certified L2 accuracy at radii 0.5, 1.0 and 1.58 on the full test set.

    ROBEVAL_DATA=/path/to/mnist.npz python examples/torch/lipschitz_mnist.py [--epochs 10] [--quick]
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from _shared import Timer, mnist, parse_args, report
from torch import nn

from robeval.training.torch import (
    GroupSort,
    HKRLoss,
    SpectralConfig,
    SpectralLinear,
    TauCrossEntropyLoss,
    Trainer,
    accuracy,
    export_model,
    export_onnx,
    lipschitz_bound,
)

RADII = (0.5, 1.0, 1.58)


def build(width: int = 256, bjorck: int = 6) -> nn.Sequential:
    cfg = SpectralConfig(bjorck_iterations=bjorck)
    return nn.Sequential(
        nn.Flatten(), SpectralLinear(784, width, config=cfg), GroupSort(2),
        SpectralLinear(width, width, config=cfg), GroupSort(2), SpectralLinear(width, 10, config=cfg),
    )


def certified_radii(plain: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-sample certified L2 radius (0 when misclassified), pairwise as robeval's certifier."""
    body = nn.Sequential(*list(plain)[:-1])
    w = plain[-1].weight.detach().double().numpy()
    pair = np.linalg.norm(w[:, None, :] - w[None, :, :], axis=-1) * lipschitz_bound(body)
    with torch.no_grad():
        z = plain.double()(x.double()).numpy()
    plain.float()
    idx = np.arange(len(z))
    y = y.numpy()
    margins = z[idx, y][:, None] - z
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(pair[y] > 0, margins / pair[y], np.inf)
    ratios[idx, y] = np.inf
    return np.maximum(ratios.min(axis=1), 0.0)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], epochs=10,
                      loss=(str, "hkr", "hkr (multiclass one-vs-all HKR) or tau (TauCrossEntropyLoss)"),
                      alpha=(float, 50.0, "HKR alpha"), min_margin=(float, 1.0, "HKR min_margin"),
                      tau=(float, 5.0, "tau of TauCrossEntropyLoss"),
                      width=(int, 256, "hidden width"), batch=(int, 256, "batch size"),
                      bjorck=(int, 6, "Björck iterations per step (SpectralConfig; deel-lip uses 15)"),
                      lr=(float, 1e-3, "Adam learning rate"),
                      onnx=(str, "", "ONNX path (default OUT/lipschitz_mnist.onnx)"))
    timer = Timer()
    xtr, ytr, xva, yva, xte, yte = mnist(args.quick)
    epochs = 1 if args.quick else args.epochs
    model = build(args.width, args.bjorck)
    criterion = HKRLoss(args.alpha, args.min_margin) if args.loss == "hkr" else TauCrossEntropyLoss(args.tau)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(int(epochs * 0.8), 1)], gamma=0.1)

    def cert(r):
        return lambda m, x, y: float((certified_radii(export_model(m), x, y) > r).mean())

    trainer = Trainer(model, opt, criterion, seed=args.seed, epochs=epochs, batch_size=args.batch, scheduler=sched,
                      metrics={"certified@0.5": cert(0.5), "certified@1.58": cert(1.58)},
                      checkpoint=f"{args.out}/lipschitz_mnist.pt", progress=not args.quick)
    trainer.fit((xtr, ytr), val=(xva[:2000], yva[:2000]))
    train_seconds = timer()
    plain = export_model(model)
    onnx_path = args.onnx or f"{args.out}/lipschitz_mnist.onnx"
    export_onnx(plain, onnx_path, xte[:1])
    radii = certified_radii(plain, xte, yte)
    rows: dict[str, float | str] = {"Lipschitz bound of the exported net": f"{lipschitz_bound(plain):.6f}",
                                    "clean accuracy": accuracy(plain, xte, yte)}
    for r in RADII:
        rows[f"certified L2 accuracy, radius {r}"] = float((radii > r).mean())
    rows["training time (s)"] = f"{train_seconds:.1f}"
    report(f"lipschitz_mnist ({epochs} epochs, {len(xtr)} training images, loss {args.loss})", rows, timer())
    summary = {"command": " ".join(["python"] + sys.argv), "wall_time_s": round(timer(), 1),
               "training_time_s": round(train_seconds, 1), "epochs": epochs, "test_images": len(xte),
               **{k: v for k, v in rows.items() if k != "training time (s)"},
               "history": [r.to_dict() for r in trainer.history]}
    with open(f"{onnx_path.rsplit('.', 1)[0]}.json", "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
