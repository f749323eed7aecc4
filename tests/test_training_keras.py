"""Tests of robeval.training.keras layers, losses and metrics (no PyTorch needed).

Each compares against something independent: exact SVDs and dense Jacobian matrices, sampled pairs
of points, NumPy closed forms, or the layers' own plain exports after a ``.keras`` round trip.
Cross-framework checks are in test_training_keras_parity.py, training runs in test_training_keras_fit.py.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow", reason="robeval.training.keras needs TensorFlow (pip install tensorflow-cpu)")
keras = pytest.importorskip("keras", reason="robeval.training.keras needs Keras 3 (pip install keras)")
if int(keras.__version__.split(".")[0]) < 3 or keras.backend.backend() != "tensorflow":
    pytest.skip(f"needs Keras 3 on the TensorFlow backend (found keras {keras.__version__}, "
                f"backend {keras.backend.backend()})", allow_module_level=True)
try:  # one thread: the test machines are shared
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
except RuntimeError:  # TensorFlow already started in this process
    pass

from robeval.errors import InputShapeError, InvalidParameterError  # noqa: E402
from robeval.training import _common  # noqa: E402
from robeval.training import keras as rk  # noqa: E402

L = keras.layers


def _np(t) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(t), np.float64)


def _max_ratio(f, x, y) -> float:
    """Largest ||f(x) - f(y)|| / ||x - y|| over pairs (rows)."""
    num = np.linalg.norm((_np(f(x)) - _np(f(y))).reshape(len(x), -1), axis=1)
    den = np.linalg.norm((x - y).reshape(len(x), -1).astype(np.float64), axis=1)
    return float((num / den).max())


def _linear_map_norm(f, shape) -> float:
    """Spectral norm of a linear (bias-free) map f on per-sample ``shape``, from its dense matrix."""
    n = int(np.prod(shape))
    basis = np.eye(n, dtype=np.float32).reshape((n,) + tuple(shape))
    matrix = _np(f(basis)).reshape(n, -1)
    return float(np.linalg.svd(matrix, compute_uv=False)[0])


def _randomise(layer, seed=0):
    """Replace the free weights by standard normal ones (far from orthogonal)."""
    rng = np.random.default_rng(seed)
    for w in layer.trainable_weights:
        if len(w.shape) > 1:
            w.assign(rng.standard_normal(w.shape).astype("float32"))


def _built(layer, shape, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input(shape), layer])
    _randomise(layer, seed)
    return model


# ---------------------------------------------------------------- spectral layers

LAYERS = {
    "dense": (lambda: rk.SpectralDense(7), (12,)),
    "dense_wide": (lambda: rk.SpectralDense(20, activation="relu"), (6,)),
    "conv_valid": (lambda: rk.SpectralConv2D(3, 3), (6, 6, 2)),
    "conv_same": (lambda: rk.SpectralConv2D(4, 3, padding="same"), (5, 5, 2)),
    "conv_stride2": (lambda: rk.SpectralConv2D(3, (3, 2), strides=2, padding="same"), (7, 6, 2)),
    "groupsort2": (lambda: rk.GroupSort(2), (8,)),
    "groupsort4": (lambda: rk.GroupSort(4), (4, 4, 8)),
    "maxmin": (lambda: rk.MaxMin(), (6,)),
    "sandwich": (lambda: rk.SandwichLayer(9, scale=2.0), (5,)),
    "sandwich_dense": (lambda: rk.SandwichDense(4, scale=1.5), (9,)),
    "lbdn": (lambda: rk.LBDN((8, 8), 3, gamma=4.0), (4, 4, 1)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_bound_holds_on_random_pairs_and_export_reproduces_outputs(name):
    make, shape = LAYERS[name]
    layer = make()
    model = _built(layer, shape)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64,) + shape).astype("float32")
    y = x + 0.1 * rng.standard_normal(x.shape).astype("float32")
    bound = layer.lipschitz_bound()
    assert _max_ratio(model, x, y) <= bound * (1 + 1e-5)
    exported = layer.export()
    np.testing.assert_allclose(_np(exported(x)), _np(model(x)), rtol=1e-5, atol=1e-5)
    plain = rk.export_model(model)
    assert not any(type(layer).__module__.startswith("robeval") and not isinstance(layer, rk.GroupSort)
                   for layer in rk.flat_layers(plain))
    np.testing.assert_allclose(_np(plain(x)), _np(model(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dense", "conv_valid", "conv_same", "conv_stride2", "sandwich_dense"])
def test_bound_is_above_the_exact_operator_norm(name):
    """The linear part's exact norm (dense matrix of the map, SVD) never exceeds lipschitz_bound()."""
    make, shape = LAYERS[name]
    layer = make()
    _built(layer, shape)
    plain = layer.export()
    if getattr(plain, "use_bias", False):
        plain.bias.assign(np.zeros(plain.bias.shape, "float32"))
    exact = _linear_map_norm(plain, shape)
    assert exact <= layer.lipschitz_bound() * (1 + 1e-6)
    if name == "dense":  # orthonormalised: the bound is tight
        assert exact == pytest.approx(1.0, abs=1e-3)


def test_spectral_dense_is_orthonormal_and_its_vector_updates_only_in_training():
    layer = rk.SpectralDense(8)
    _built(layer, (30,))
    k = _np(layer.constrained_kernel())
    np.testing.assert_allclose(k.T @ k, np.eye(8), atol=1e-4)
    u0 = _np(layer.u)
    layer(np.ones((2, 30), "float32"), training=False)
    np.testing.assert_array_equal(_np(layer.u), u0)
    layer(np.ones((2, 30), "float32"), training=True)
    assert not np.array_equal(_np(layer.u), u0)


def test_bjorck_and_cayley_give_orthonormal_matrices():
    w = tf.constant(np.random.default_rng(0).standard_normal((5, 9)) / 4, tf.float32)
    q = _np(rk.bjorck(w / tf.norm(w, 2), 30))
    np.testing.assert_allclose(q @ q.T, np.eye(5), atol=1e-4)
    c = _np(rk.cayley(tf.constant(np.random.default_rng(1).standard_normal((4, 10)), tf.float64)))
    np.testing.assert_allclose(c @ c.T, np.eye(4), atol=1e-10)


def test_lbdn_bound_is_gamma_and_export_merges_into_a_plain_mlp():
    layer = rk.LBDN((16, 16), 5, gamma=5.0)
    model = _built(layer, (6, 6, 1))
    assert layer.lipschitz_bound() <= 5.0 * (1 + 1e-4)
    plain = layer.export()
    dense = [lay for lay in plain.layers if isinstance(lay, L.Dense)]
    assert [d.units for d in dense] == [16, 16, 5]
    x = np.random.default_rng(2).random((4, 6, 6, 1)).astype("float32")
    np.testing.assert_allclose(_np(plain(x)), _np(model(x)), rtol=1e-4, atol=1e-5)


def test_groupsort_sorts_groups_of_the_last_axis():
    x = np.array([[[3.0, 1.0, -1.0, 2.0, 5.0, 4.0, 0.0, 9.0]]], "float32")
    np.testing.assert_array_equal(_np(rk.GroupSort(4)(x)), [[[-1, 1, 2, 3, 0, 4, 5, 9]]])
    np.testing.assert_array_equal(_np(rk.MaxMin()(x)), [[[1, 3, -1, 2, 4, 5, 0, 9]]])
    assert rk.MaxMin().group_size == 2 and rk.MaxMin().export().group_size == 2


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_keras_file_round_trip_with_safe_mode(tmp_path):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((6, 6, 1)), rk.SpectralConv2D(4, 3, padding="same"), rk.GroupSort(2), L.Flatten(),
        rk.SpectralDense(16, spectral_config=rk.SpectralConfig(power_iterations=2, bjorck_iterations=10)),
        rk.MaxMin(), rk.LBDN((8,), 6, gamma=2.0), rk.SandwichLayer(6), rk.SpectralDense(3),
    ])
    model.compile(optimizer="adam", loss=rk.TauCrossEntropyLoss(tau=5.0),
                  metrics=[rk.CertifiedAccuracy(0.1), rk.SignAccuracy(), rk.KREstimate(), rk.HingeMargin(0.5)])
    x = np.random.default_rng(4).random((5, 6, 6, 1)).astype("float32")
    path = tmp_path / "lip.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(_np(loaded(x)), _np(model(x)))
    assert loaded.layers[3].spectral_config.bjorck_iterations == 10
    assert rk.lipschitz_bound(loaded) == pytest.approx(rk.lipschitz_bound(model), rel=1e-7)
    plain_path = tmp_path / "plain.keras"
    rk.export_model(loaded).save(plain_path)
    np.testing.assert_allclose(_np(keras.models.load_model(plain_path, safe_mode=True)(x)), _np(model(x)),
                               rtol=1e-5, atol=1e-6)


def test_model_bound_is_the_product_and_names_unsupported_layers():
    model = keras.Sequential([keras.Input((4,)), rk.SpectralDense(6), L.ReLU(), L.Dense(3, activation="sigmoid")])
    dense = model.layers[-1].get_weights()[0]
    expected = model.layers[0].lipschitz_bound() * _common.spectral_norm(dense) * 0.25
    assert rk.lipschitz_bound(model) == pytest.approx(expected, rel=1e-9)
    bad = keras.Sequential([keras.Input((4, 4, 1)), L.Conv2D(2, 3), L.Flatten(), L.Dense(2)])
    with pytest.raises(InvalidParameterError, match="conv2d.*Conv2D"):
        rk.lipschitz_bound(bad)


def test_functional_branches_are_refused_with_the_layer_named():
    inp = keras.Input((4,))
    a, b = L.Dense(3, name="left")(inp), L.Dense(3, name="right")(inp)
    model = keras.Model(inp, L.Add(name="join")([a, b]))
    with pytest.raises(InvalidParameterError, match="right"):
        rk.flat_layers(model)


def test_layer_parameters_are_checked():
    with pytest.raises(InvalidParameterError, match="units"):
        rk.SpectralDense(0)
    with pytest.raises(InvalidParameterError, match="padding"):
        rk.SpectralConv2D(2, 3, padding="causal")
    with pytest.raises(InvalidParameterError, match="activation 'gelu'"):
        rk.SpectralDense(3, activation="gelu")
    with pytest.raises(InputShapeError, match="divisible by 4"):
        keras.Sequential([keras.Input((6,)), rk.GroupSort(4)])
    with pytest.raises(InvalidParameterError, match="hidden"):
        rk.LBDN((), 3)


# ---------------------------------------------------------------- losses and metrics (NumPy closed forms)


def _np_signs(y, k):
    if k == 1:
        return np.where(np.asarray(y).reshape(-1, 1) > 0, 1.0, -1.0)
    return np.eye(k)[np.asarray(y)] * 2 - 1


@pytest.mark.parametrize("k", [1, 4])
def test_hkr_kr_and_hinge_match_numpy(k):
    rng = np.random.default_rng(k)
    out = rng.standard_normal((12, k)).astype("float32")
    y = rng.choice([-1.0, 1.0], 12) if k == 1 else rng.integers(0, k, 12)
    s = _np_signs(y, k)
    kr = np.mean([out[s[:, j] > 0, j].mean() - out[s[:, j] < 0, j].mean() for j in range(k)])
    hinge = np.maximum(0.7 - s * out, 0).mean()
    assert float(rk.KRLoss()(y, out)) == pytest.approx(-kr, abs=1e-5)
    assert float(rk.HingeMarginLoss(0.7)(y, out)) == pytest.approx(hinge, abs=1e-6)
    assert float(rk.HKRLoss(3.0, 0.7)(y, out)) == pytest.approx(3.0 * hinge - kr, abs=1e-5)
    assert float(rk.HKRLoss(0.0, 0.7)(y, out)) == pytest.approx(-kr, abs=1e-5)
    assert float(rk.HKRLoss(math.inf, 0.7)(y, out)) == pytest.approx(hinge, abs=1e-6)


def test_binary_labels_zero_one_equal_minus_one_one_and_bad_labels_are_named():
    out = np.array([[0.5], [-2.0], [1.5]], "float32")
    assert float(rk.HKRLoss()(np.array([1, 0, 1]), out)) == float(rk.HKRLoss()(np.array([1, -1, 1]), out))
    with pytest.raises(InvalidParameterError, match="binary labels"):
        rk.HKRLoss()(np.array([2, 0, 1]), out)
    with pytest.raises(InvalidParameterError, match=r"integers in \[0, 3\)"):
        rk.KRLoss()(np.array([0, 3]), np.zeros((2, 3), "float32"))
    with pytest.raises(InvalidParameterError, match="sample_weight"):
        rk.HKRLoss()(np.array([1, 0, 1]), out, sample_weight=np.ones(3))


def test_tau_cross_entropy_is_scaled_cross_entropy_for_indices_and_one_hot():
    rng = np.random.default_rng(5)
    z, y = rng.standard_normal((6, 3)).astype("float32"), rng.integers(0, 3, 6)
    tau = 4.0
    logp = tau * z - np.log(np.exp(tau * z).sum(1, keepdims=True))
    expected = -logp[np.arange(6), y].mean() / tau
    assert float(rk.TauCrossEntropyLoss(tau)(y, z)) == pytest.approx(expected, rel=1e-5)
    assert float(rk.TauCrossEntropyLoss(tau)(np.eye(3)[y], z)) == pytest.approx(expected, rel=1e-5)


def test_certified_radius_closed_forms():
    out = np.array([[2.0], [-0.5], [0.3]], "float32")
    np.testing.assert_allclose(_np(rk.certified_radius(np.array([1, -1, -1]), out, 2.0)), [1.0, 0.25, 0.0])
    z = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 2.5]], "float32")
    np.testing.assert_allclose(_np(rk.certified_radius(np.array([0, 1]), z, 1.0)), [2 / math.sqrt(2), 0.0],
                               rtol=1e-6)
    metric = rk.CertifiedAccuracy(0.5, lipschitz=2.0)
    metric.update_state(np.array([1, -1, -1]), out)
    assert float(metric.result()) == pytest.approx(1 / 3)


def test_adversarial_config_speaks_nsl():
    cfg = rk.make_adv_reg_config(multiplier=0.2, adv_step_size=0.2, adv_grad_norm="infinity")
    assert (cfg.norm, cfg.method, cfg.clip) == ("linf", "fgsm", (0.0, 1.0))
    assert rk.make_adv_reg_config(adv_step_size=0.1, method="pgd", pgd_iterations=5).step_size == pytest.approx(0.05)
    with pytest.raises(InvalidParameterError, match="norm"):
        rk.make_adv_reg_config(adv_grad_norm="l1")
    with pytest.raises(InvalidParameterError, match="method"):
        rk.make_adv_reg_config(method="cw")


def test_epsilon_scheduler_follows_the_common_schedules_per_batch():
    base = keras.Sequential([keras.Input((3,)), L.Dense(2)])
    model = rk.IBPTraining(base)
    cb = rk.EpsilonScheduler(rk.EpsilonSchedule(0.1, warmup=1, ramp=2), rk.KappaSchedule(1.0, 0.5, 1, 2))
    cb.set_model(model)
    cb.set_params({"steps": 4, "epochs": 4})
    cb.on_train_begin()
    seen = []
    for epoch in range(4):
        cb.on_epoch_begin(epoch)
        for batch in range(4):
            cb.on_train_batch_begin(batch)
            seen.append((float(model.eps_variable.numpy()), float(model.kappa_variable.numpy())))
    ts = [e + b / 4 for e in range(4) for b in range(4)]
    np.testing.assert_allclose([s[0] for s in seen], [rk.EpsilonSchedule(0.1, 1, 2)(t) for t in ts], rtol=1e-6)
    np.testing.assert_allclose([s[1] for s in seen], [rk.KappaSchedule(1.0, 0.5, 1, 2)(t) for t in ts], rtol=1e-6)
    plain = keras.Sequential([keras.Input((3,)), L.Dense(2)])
    cb.set_model(plain)
    with pytest.raises(InvalidParameterError, match="eps_variable"):
        cb.on_train_begin()


def test_ibp_init_draws_kernels_with_the_common_std_and_keeps_the_last_layer():
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(16, 3), L.Flatten(), L.Dense(300), L.ReLU(),
                              L.Dense(10)])
    last = model.layers[-1].get_weights()[0].copy()
    rk.ibp_init(model, seed=0)
    conv, dense = model.layers[0].get_weights()[0], model.layers[2].get_weights()[0]
    assert conv.std() == pytest.approx(_common.ibp_init_std(9), rel=0.1)
    assert dense.std() == pytest.approx(_common.ibp_init_std(6 * 6 * 16), rel=0.05)
    np.testing.assert_array_equal(model.layers[-1].get_weights()[0], last)


def test_saved_plugin_model_certifies_in_a_fresh_process(tmp_path):
    """A .keras file with robeval layers loads (safe_mode) and certifies in a process that never
    imported the plugin itself: the adapter registers the layers before loading."""
    import subprocess
    import sys

    path = tmp_path / "lip.keras"
    save = ("import sys, keras\n"
            "from robeval.training.keras import SpectralDense, GroupSort\n"
            "m = keras.Sequential([keras.Input((1, 8, 8)), keras.layers.Flatten(), SpectralDense(16), GroupSort(2),"
            " SpectralDense(10)])\n"
            "m.save(sys.argv[1])\n")
    subprocess.run([sys.executable, "-c", save, str(path)], check=True, capture_output=True)
    check = ("import sys, robeval\nfrom robeval.data import load_dataset\n"
             "r = robeval.certify(sys.argv[1], load_dataset('digits', limit=20), method='lipschitz', norm='l2',"
             " eps=[0.1])\nprint(r.lipschitz_bound)\n")
    out = subprocess.run([sys.executable, "-c", check, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 0.99 < float(out.stdout.strip().splitlines()[-1]) < 1.01
