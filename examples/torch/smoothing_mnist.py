"""Gaussian noise training for randomized smoothing on MNIST, then smoothing certificates (Cohen et al. 2019).

A small CNN (Conv(16, 4x4, s2) -> ReLU -> Conv(32, 4x4, s2) -> ReLU -> Linear(1568, 128) -> ReLU ->
Linear(128, 10)) is trained with ``GaussianNoiseLoss`` at --sigma (Adam); the plain network is
exported to ONNX and certified with robeval's smoothing certifier (n0 = 100 selection draws,
--draws estimation draws, alpha = 0.001) on the first --certify test images, printing the
certified accuracy (with probability >= 0.999) at L2 radii 0, 0.25, 0.5, 0.75, 1.0.

    ROBEVAL_DATA=/path/to/mnist.npz python examples/torch/smoothing_mnist.py [--epochs 2] [--quick]
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from _shared import Timer, mnist, parse_args, report
from torch import nn

from robeval.api import certify
from robeval.training.torch import GaussianNoiseLoss, Trainer, accuracy, export_onnx

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def build(width: int = 128) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 7 * 7, width), nn.ReLU(), nn.Linear(width, 10),
    )


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], epochs=2,
                      sigma=(float, 0.25, "noise level for training and certification"),
                      train=(int, 0, "training images to use (0: all but the validation split)"),
                      certify_n=(int, 200, "test images to certify"),
                      draws=(int, 10_000, "estimation draws per image"),
                      batch=(int, 128, "batch size"), lr=(float, 1e-3, "Adam learning rate"),
                      onnx=(str, "", "ONNX path (default OUT/smoothing_mnist.onnx)"))
    timer = Timer()
    xtr, ytr, xva, yva, xte, yte = mnist(args.quick)
    if args.train:
        xtr, ytr = xtr[:args.train], ytr[:args.train]
    epochs, n_cert, draws = (1, 10, 200) if args.quick else (args.epochs, args.certify_n, args.draws)
    model = build()
    loss = GaussianNoiseLoss(model, sigma=args.sigma, generator=torch.Generator().manual_seed(args.seed))
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=args.lr), loss, seed=args.seed, epochs=epochs,
                      batch_size=args.batch, progress=not args.quick)
    trainer.fit((xtr, ytr), val=(xva[:1000], yva[:1000]))
    train_seconds = timer()
    model.eval()
    onnx_path = args.onnx or f"{args.out}/smoothing_mnist.onnx"
    export_onnx(model, onnx_path, xte[:1])
    t0 = timer()
    res = certify(onnx_path, (xte[:n_cert].numpy(), yte[:n_cert].numpy()), method="smoothing", eps=list(RADII),
                  norm="l2", sigma=args.sigma, n0=100, n=draws, alpha=0.001, seed=args.seed)
    cert_seconds = timer() - t0
    rows = {"clean accuracy (base model, no noise)": accuracy(model, xte, yte),
            f"smoothed accuracy ({n_cert} images)": res.clean_accuracy, "abstained": res.abstain_rate}
    rows.update({f"certified (p>=0.999), L2 r={r}": a for r, a in zip(RADII, res.certified_accuracy)})
    rows.update({"training time (s)": f"{train_seconds:.1f}", "certification time (s)": f"{cert_seconds:.1f}"})
    report(f"smoothing_mnist (sigma={args.sigma}, {epochs} epochs, {len(xtr)} training images, n={draws})", rows,
           timer())
    summary = {"command": " ".join(["python"] + sys.argv), "sigma": args.sigma, "epochs": epochs,
               "training_images": len(xtr), "certified_images": n_cert, "n0": 100, "n": draws, "alpha": 0.001,
               "smoothed_accuracy": res.clean_accuracy, "abstain_rate": res.abstain_rate,
               "certified_accuracy": dict(zip(map(str, RADII), res.certified_accuracy)),
               "mean_radius_of_correct": float(np.mean(res.radius[res.predictions == res.labels]))
               if (res.predictions == res.labels).any() else 0.0,
               "training_time_s": round(train_seconds, 1), "certification_time_s": round(cert_seconds, 1)}
    with open(f"{onnx_path.rsplit('.', 1)[0]}.json", "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
