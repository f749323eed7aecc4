"""IBP certified training of a small CNN on MNIST for L-inf eps = 0.1 (Gowal et al. 2018; Shi et al. 2021).

Conv(16, 4x4, stride 2) -> ReLU -> Conv(32, 4x4, stride 2) -> ReLU -> Linear(1568, 256) -> ReLU ->
Linear(256, 10), IBP initialisation. One warm-up epoch at eps = 0, then a smooth ramp of the
training radius to --train-eps while the clean-loss weight kappa goes from 1 to --kappa-end,
then epochs at the target; Adam, learning rate divided by 10 for the last two epochs.
Reports clean accuracy and IBP-certified accuracy at eps = 0.1 on the full test set, and
writes the plain network to ONNX.

    ROBEVAL_DATA=/path/to/mnist.npz python examples/torch/ibp_cnn.py [--epochs 36] [--quick]
"""

from __future__ import annotations

import json
import sys

import torch
from _shared import Timer, mnist, parse_args, report
from torch import nn

from robeval.training.torch import (
    EpsilonSchedule,
    IBPLoss,
    KappaSchedule,
    Trainer,
    accuracy,
    certified_accuracy,
    export_onnx,
    ibp_init_,
)


def build(width: int = 256) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 7 * 7, width), nn.ReLU(), nn.Linear(width, 10),
    )


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], epochs=36,
                      eps=(float, 0.1, "certified radius (L-inf) to test for"),
                      train_eps=(float, 0.13, "radius used in training (at or above --eps)"),
                      warmup=(float, 1.0, "epochs at eps = 0"), ramp=(float, 15.0, "epochs of the eps ramp"),
                      kappa_end=(float, 0.0, "weight of the clean loss after the ramp"),
                      width=(int, 256, "width of the hidden dense layer"),
                      batch=(int, 128, "batch size"),
                      lr=(float, 1e-3, "Adam learning rate (divided by 10 for the last 2 epochs)"),
                      onnx=(str, "", "ONNX path (default OUT/ibp_cnn.onnx)"))
    timer = Timer()
    xtr, ytr, xva, yva, xte, yte = mnist(args.quick)
    epochs, warmup, ramp = (2, 0.0, 1.0) if args.quick else (args.epochs, args.warmup, args.ramp)
    model = ibp_init_(build(args.width))
    loss = IBPLoss(EpsilonSchedule(args.train_eps, warmup=warmup, ramp=ramp, shape="smooth"),
                   KappaSchedule(start=1.0, end=args.kappa_end, warmup=warmup, ramp=ramp))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(epochs - 2, 1)], gamma=0.1)
    trainer = Trainer(model, opt, loss, seed=args.seed, epochs=epochs, batch_size=args.batch, scheduler=sched,
                      metrics={f"certified@{args.eps}": lambda m, x, y: certified_accuracy(m, x, y, args.eps)},
                      checkpoint=f"{args.out}/ibp_cnn.pt", progress=not args.quick)
    trainer.fit((xtr, ytr), val=(xva[:1000], yva[:1000]))
    train_seconds = timer()
    model.eval()
    onnx_path = args.onnx or f"{args.out}/ibp_cnn.onnx"
    export_onnx(model, onnx_path, xte[:1])
    rows = {
        "clean accuracy": accuracy(model, xte, yte),
        f"IBP-certified accuracy, eps={args.eps}": certified_accuracy(model, xte, yte, args.eps),
        "training time (s)": f"{train_seconds:.1f}",
    }
    report(f"ibp_cnn ({epochs} epochs, {len(xtr)} training images)", rows, timer())
    summary = {"command": " ".join(["python"] + sys.argv), "wall_time_s": round(timer(), 1),
               "training_time_s": round(train_seconds, 1), "epochs": epochs, "test_images": len(xte),
               "clean_accuracy": rows["clean accuracy"],
               f"ibp_certified_accuracy_eps_{args.eps}": rows[f"IBP-certified accuracy, eps={args.eps}"],
               "history": [r.to_dict() for r in trainer.history]}
    with open(f"{onnx_path.rsplit('.', 1)[0]}.json", "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
