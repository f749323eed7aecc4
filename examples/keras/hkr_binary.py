"""1-Lipschitz MLP trained with the HKR loss on MNIST 0 vs 8, in Keras (after deel-lip's demo 3).

Flatten -> SpectralDense(32) -> GroupSort2 -> SpectralDense(16) -> GroupSort2 -> SpectralDense(1, no bias)
(the tutorial's network), HKRLoss(alpha=50, min_margin=1), Adam 1e-3 with a cosine decay to 1e-5 over
the run, batch 128, 10 epochs; label +1 for digit 0, -1 for 8, pixels in [0, 1].
Two settings differ from the tutorial (alpha 10, constant learning rate): with alpha=10 the
hinge (accuracy) term is weighted so lightly against the KR term that, depending on the seed,
the fit settles at 98.3-98.8% (seed 0 stays at 98.5% even after 30 epochs); alpha=50 weights it more
and reaches 99.3-99.4% with larger certified accuracies at radii 0.5 and 1.0. The cosine decay
removes the epoch-to-epoch jitter of the last epochs, so the final model is not a lucky or unlucky draw.
The exported network's L2 Lipschitz bound L (about 1) makes every output a certificate: sign(f(x))
cannot change within an L2 radius |f(x)| / L. Reports clean accuracy (deel-lip: 98.89%) and
certified accuracy at radii 0.5, 1.0 and 1.58, from the training code and from robeval.certify on
the saved .keras file.

    python examples/keras/hkr_binary.py [--epochs 10] [--seed 0] [--quick]      # ROBEVAL_DATA=/path/to/mnist.npz
"""

from __future__ import annotations

import numpy as np
from _shared import Timer, mnist, parse_args, report

RADII = (0.5, 1.0, 1.58)


def binary(x: np.ndarray, y: np.ndarray, a: int = 0, b: int = 8):
    keep = (y == a) | (y == b)
    return x[keep], np.where(y[keep] == a, 1.0, -1.0).astype(np.float32)


def robeval_radii(model, x, y, radii) -> list[float] | None:
    """Certified accuracies by robeval's Lipschitz certifier (None when the Keras adapter is missing)."""
    try:
        import robeval
        from robeval.adapters.keras import KerasModel  # noqa: F401
    except ImportError:
        return None
    from robeval.training.keras import binary_as_two_logits

    result = robeval.certify(binary_as_two_logits(model), (x.transpose(0, 3, 1, 2), (y > 0).astype(int)),
                             method="lipschitz", norm="l2", eps=list(radii))
    return list(result.certified_accuracy)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], epochs=10, batch_size=(int, 128, "mini-batch size"),
                      lr=(float, 1e-3, "initial Adam learning rate"),
                      final_lr=(float, 1e-5, "learning rate reached by the cosine decay at the last step"),
                      alpha=(float, 50.0, "HKR alpha (deel-lip tutorial: 10)"),
                      min_margin=(float, 1.0, "HKR min_margin"))
    import keras

    from robeval.training.keras import (
        GroupSort,
        HingeMargin,
        HKRLoss,
        KREstimate,
        SignAccuracy,
        SpectralDense,
        certified_radius,
        export_model,
        lipschitz_bound,
    )

    timer = Timer()
    xtr, ytr, xva, yva, xte, yte = mnist(args.quick, n_train=6000)
    (xtr, ytr), (xva, yva), (xte, yte) = binary(xtr, ytr), binary(xva, yva), binary(xte, yte)
    model = keras.Sequential([
        keras.Input((28, 28, 1)), keras.layers.Flatten(),
        SpectralDense(32), GroupSort(2), SpectralDense(16), GroupSort(2), SpectralDense(1, use_bias=False),
    ], name="hkr_mlp")
    epochs = 1 if args.quick else args.epochs
    steps = epochs * -(-len(xtr) // args.batch_size)
    lr = keras.optimizers.schedules.CosineDecay(args.lr, steps, alpha=args.final_lr / args.lr)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=HKRLoss(args.alpha, args.min_margin),
                  metrics=[KREstimate(), HingeMargin(args.min_margin), SignAccuracy()])
    model.fit(xtr, ytr, validation_data=(xva, yva), batch_size=args.batch_size, epochs=epochs, shuffle=True,
              verbose=2)
    path = f"{args.out}/hkr_binary.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    plain = export_model(loaded)
    bound = lipschitz_bound(plain)
    f = np.asarray(plain.predict(xte, batch_size=1000, verbose=0))
    radius = np.asarray(certified_radius(yte, f, bound))
    rows: dict[str, float | str] = {
        "Lipschitz bound of the exported net": f"{bound:.6f}",
        "clean accuracy": float(np.mean(f[:, 0] * yte > 0)),
    }
    for r in RADII:
        rows[f"certified L2 accuracy, radius {r}"] = float(np.mean(radius > r))
    theirs = robeval_radii(loaded, xte, yte, RADII)
    for r, acc in zip(RADII, theirs or []):
        rows[f"robeval.certify lipschitz, radius {r}"] = float(acc)
    report(f"hkr_binary keras ({epochs} epochs, {len(xtr)} training images)", rows, timer())


if __name__ == "__main__":
    main()
