"""Training with robeval.training.keras through ``compile``/``fit``: each objective goes down in a few
steps, and trained models load back with ``keras.models.load_model(safe_mode=True)`` and certify
through robeval with the numbers seen in training (IBP certified accuracy, Lipschitz radii)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow", reason="robeval.training.keras needs TensorFlow (pip install tensorflow-cpu)")
keras = pytest.importorskip("keras", reason="robeval.training.keras needs Keras 3 (pip install keras)")
if int(keras.__version__.split(".")[0]) < 3 or keras.backend.backend() != "tensorflow":
    pytest.skip(f"needs Keras 3 on the TensorFlow backend (found keras {keras.__version__}, "
                f"backend {keras.backend.backend()})", allow_module_level=True)
try:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
except RuntimeError:
    pass

import robeval  # noqa: E402
from robeval.training import keras as rk  # noqa: E402

L = keras.layers


def _adapter_or_skip():
    try:
        from robeval.adapters.keras import KerasModel  # noqa: F401
    except ImportError as e:
        pytest.skip(f"robeval.adapters.keras.KerasModel is not available ({e}); the Keras adapter is missing")


def _blobs(n=96, classes=3, seed=0, shape=(6, 6, 1), noise=0.08):
    """Images near one of ``classes`` random prototypes in [0.2, 0.8]: NHWC x, int labels."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0.2, 0.8, (classes,) + shape)
    y = np.arange(n) % classes
    x = np.clip(protos[y] + noise * rng.standard_normal((n,) + shape), 0, 1).astype("float32")
    return x, y


def _nchw(x):
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _cnn(classes=3):
    return keras.Sequential([keras.Input((6, 6, 1)), L.Conv2D(4, 3, activation="relu"), L.Flatten(),
                             L.Dense(16, activation="relu"), L.Dense(classes)])


def _spectral(outputs):
    return keras.Sequential([keras.Input((6, 6, 1)), L.Flatten(), rk.SpectralDense(16), rk.GroupSort(2),
                             rk.SpectralDense(8), rk.MaxMin(), rk.SpectralDense(outputs)])


def _decreases(model, x, y, steps=12, **fit):
    h = model.fit(x, y, batch_size=len(x), epochs=steps, verbose=0, shuffle=False, **fit).history["loss"]
    assert h[-1] < h[0], h
    return h


def _eager_steps(model, loss_fn, x, y, steps=12, lr=1e-2) -> list[float]:
    """Plain Adam steps in eager mode (no graph tracing: quick for tiny models); the loss per step."""
    opt = keras.optimizers.Adam(lr)
    losses = []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_weights), model.trainable_weights))
        losses.append(float(loss))
    return losses


LIPSCHITZ_LOSSES = {"hkr": (rk.HKRLoss(10.0, 0.5), 1), "kr": (rk.KRLoss(), 1), "hinge": (rk.HingeMarginLoss(0.5), 1),
                    "tau_ce": (rk.TauCrossEntropyLoss(10.0), 3), "hkr_multiclass": (rk.HKRLoss(5.0, 0.3), 3)}


@pytest.mark.parametrize("name", sorted(LIPSCHITZ_LOSSES))
def test_lipschitz_losses_go_down(name):
    keras.utils.set_random_seed(0)
    loss_fn, outputs = LIPSCHITZ_LOSSES[name]
    x, y = _blobs(60, max(outputs, 2), seed=1)
    if outputs == 1:
        y = np.where(y == 1, 1.0, -1.0).astype("float32")
    losses = _eager_steps(_spectral(outputs), loss_fn, x, y)
    assert losses[-1] < losses[0], losses


WRAPPERS = {
    "adv_fgsm_linf": lambda b: rk.AdversarialRegularization(b, multiplier=0.2, adv_step_size=0.05),
    "adv_pgd_l2": lambda b: rk.AdversarialRegularization(b, multiplier=0.5, adv_step_size=0.3, adv_grad_norm="l2",
                                                         method="pgd", pgd_iterations=3),
    "jacobian": lambda b: rk.JacobianRegularization(b, coefficient=0.1, n_projections=2, seed=0),
    "ibp": lambda b: rk.IBPTraining(b, eps=0.02, kappa=0.5),
    "crown_ibp": lambda b: rk.IBPTraining(b, eps=0.02, kappa=0.5, bound="crown-ibp", beta=0.5),
}


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_wrapped_objectives_go_down_with_compile_and_fit(name, tmp_path):
    keras.utils.set_random_seed(2)
    x, y = _blobs(48, 3, seed=3)
    model = WRAPPERS[name](_cnn())
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    _decreases(model, x, y)
    path = tmp_path / "wrapped.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert type(loaded) is type(model)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))


@pytest.mark.parametrize("bound", ["ibp", "crown-ibp"])
def test_ibp_training_certifies_through_robeval_with_the_numbers_seen_in_training(bound, tmp_path):
    """The certified accuracy tracked in training (IBP, or CROWN-IBP with beta = 1) is what robeval's
    certifier of the same name finds on the saved and reloaded model."""
    _adapter_or_skip()
    keras.utils.set_random_seed(3)
    x, y = _blobs(120, 3, seed=4)
    base = keras.Sequential([keras.Input((6, 6, 1)), L.Conv2D(8, 3, activation="relu"), L.Flatten(),
                             L.Dense(32), L.ReLU(), L.Dense(3)])
    model = rk.IBPTraining(base, eps=0.0, kappa=1.0, bound=bound, beta=1.0)
    model.compile(optimizer=keras.optimizers.Adam(5e-3), metrics=["accuracy"])
    eps = 0.03
    sched = rk.EpsilonScheduler(rk.EpsilonSchedule(eps, warmup=2, ramp=6), rk.KappaSchedule(1.0, 0.5, 2, 6))
    hist = model.fit(x, y, batch_size=40, epochs=12, verbose=0, callbacks=[sched]).history
    assert hist["eps"][-1] == pytest.approx(eps)
    seen = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)["certified_accuracy"]
    assert seen > 0.5
    path = tmp_path / "ibp.keras"
    model.base_model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    result = robeval.certify(loaded, (_nchw(x), y), method=bound, eps=[eps])
    assert result.certified_accuracy[0] == pytest.approx(seen, abs=1e-6)
    assert rk.certified_accuracy(loaded, x, y, eps, bound=bound) == pytest.approx(seen, abs=1e-6)


def test_crown_ibp_beta_follows_the_scheduler_and_survives_saving(tmp_path):
    keras.utils.set_random_seed(4)
    x, y = _blobs(40, 3, seed=5)
    model = rk.IBPTraining(_cnn(), eps=0.0, kappa=1.0, bound="crown-ibp")
    model.compile(optimizer=keras.optimizers.Adam(5e-3))
    sched = rk.EpsilonScheduler(rk.EpsilonSchedule(0.02, warmup=1, ramp=2), beta=rk.KappaSchedule(1.0, 0.0, 1, 2))
    hist = model.fit(x, y, batch_size=20, epochs=4, verbose=0, callbacks=[sched]).history
    assert hist["beta"] == pytest.approx([1.0, 0.75, 0.25, 0.0])
    path = tmp_path / "crown_ibp.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert loaded.bound == "crown-ibp" and float(loaded.beta_variable.numpy()) == 0.0
    with pytest.raises(robeval.errors.InvalidParameterError, match="bound="):
        rk.IBPTraining(_cnn(), bound="crown")


def test_hkr_binary_radii_certify_through_robeval_exactly(tmp_path):
    _adapter_or_skip()
    keras.utils.set_random_seed(4)
    x, y = _blobs(80, 2, seed=5, noise=0.15)
    y = np.where(y == 1, 1.0, -1.0).astype("float32")
    model = _spectral(1)
    _eager_steps(model, rk.HKRLoss(10.0, 0.2), x, y, steps=20)
    path = tmp_path / "hkr.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    bound = rk.lipschitz_bound(loaded)
    assert 1.0 - 1e-3 < bound < 1.0 + 1e-3
    radii = [0.0, 0.05, 0.1, 0.2]
    loaded.compile(loss=rk.HKRLoss(), metrics=[rk.CertifiedAccuracy(r, lipschitz=bound) for r in radii])
    seen = loaded.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    result = robeval.certify(rk.binary_as_two_logits(loaded), (_nchw(x), (y > 0).astype(int)), method="lipschitz",
                             norm="l2", eps=radii)
    ours = [seen[f"certified_{r:g}"] for r in radii]
    assert ours[1] > 0.3
    np.testing.assert_allclose(result.certified_accuracy, ours, atol=1e-6)


def test_multiclass_lipschitz_certificate_of_robeval_is_at_least_the_metric():
    """robeval uses ||W_y - W_j|| per pair, never looser than the metric's sqrt(2) * L."""
    _adapter_or_skip()
    keras.utils.set_random_seed(5)
    x, y = _blobs(60, 3, seed=6)
    model = _spectral(3)
    _eager_steps(model, rk.TauCrossEntropyLoss(20.0), x, y, steps=15)
    bound = rk.lipschitz_bound(model)
    radii = [0.02, 0.05]
    model.compile(loss=rk.TauCrossEntropyLoss(20.0), metrics=[rk.CertifiedAccuracy(r, bound) for r in radii])
    seen = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    result = robeval.certify(model, (_nchw(x), y), method="lipschitz", norm="l2", eps=radii)
    for r, theirs in zip(radii, result.certified_accuracy):
        assert theirs >= seen[f"certified_{r:g}"] - 1e-6


@pytest.mark.parametrize("script", ["hkr_binary.py", "adversarial_cnn.py", "ibp_mlp.py"])
def test_keras_examples_run_in_quick_mode(script, tmp_path):
    """Each Keras tutorial script trains, reports percentages and saves a .keras file (tiny data)."""
    from example_runner import run_quick

    run_quick("keras", script, tmp_path, timeout=300)
    assert any(p.suffix == ".keras" for p in tmp_path.iterdir())
