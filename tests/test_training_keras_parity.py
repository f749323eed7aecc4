"""The Keras plugins against their PyTorch twins: same weights, same hyperparameters, same numbers.

Weights are copied across frameworks (torch Linear weight (out, in) -> Keras Dense kernel (in, out);
conv OIHW -> HWIO; NCHW inputs -> NHWC; the Dense after a Flatten gets its rows reordered from
(C, H, W) to (H, W, C)), then outputs, losses, Jacobian estimates (same projection vectors),
adversarial losses and IBP bounds are compared to 1e-5.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
torch = pytest.importorskip("torch", reason="the parity tests need PyTorch")
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
from torch import nn  # noqa: E402

from robeval import errors as rk_errors  # noqa: E402
from robeval.training import keras as rk  # noqa: E402
from robeval.training import torch as rt  # noqa: E402

torch.set_num_threads(1)
L = keras.layers
TOL = dict(rtol=1e-5, atol=1e-5)


def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().numpy()
    return np.asarray(keras.ops.convert_to_numpy(t))


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())


def _assign(var, value) -> None:
    var.assign(np.asarray(_np(value) if isinstance(value, torch.Tensor) else value, np.float32))


# ---------------------------------------------------------------- weight copies


def _copy_affine(tmodel: nn.Module, kmodel, chw_before_first_dense=None) -> None:
    """Copy Linear/Conv2d weights (plain or spectral) in order into the Keras model's Dense/Conv2D."""
    tl = [m for m in tmodel.modules() if isinstance(m, (nn.Linear, nn.Conv2d, rt.SpectralLinear, rt.SpectralConv2d))]
    kl = [m for m in rk.flat_layers(kmodel) if isinstance(m, (L.Dense, L.Conv2D, rk.SpectralDense, rk.SpectralConv2D))]
    assert len(tl) == len(kl)
    first_dense = True
    for t, k in zip(tl, kl):
        w = _np(t.weight)
        if w.ndim == 4:
            kernel = w.transpose(2, 3, 1, 0)
        elif first_dense and chw_before_first_dense is not None:
            c, h, wd = chw_before_first_dense
            kernel = w.reshape(w.shape[0], c, h, wd).transpose(2, 3, 1, 0).reshape(-1, w.shape[0])
            first_dense = False
        else:
            kernel = w.T
            first_dense = False
        _assign(k.kernel, kernel)
        if t.bias is not None:
            _assign(k.bias, t.bias)
        if hasattr(t, "_u"):
            _assign(k.u, t._u)


def _randomise_torch(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.1))


def _cnn_pair(seed=0, avg=False):
    """torch and Keras CNNs (1x8x8 inputs): conv-relu-pool-conv(stride 2)-relu-flatten-dense-relu-dense,
    with max-pooling (or average pooling when ``avg``)."""
    torch.manual_seed(seed)
    t = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2) if avg else nn.MaxPool2d(2),
                      nn.Conv2d(4, 6, 2, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(24, 16), nn.ReLU(),
                      nn.Linear(16, 5))
    k = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3, padding="same", activation="relu"),
                          L.AveragePooling2D(2) if avg else L.MaxPooling2D(2), L.Conv2D(6, 2, strides=2), L.ReLU(),
                          L.Flatten(),
                          L.Dense(16, activation="relu"), L.Dense(5)])
    _copy_affine(t, k, chw_before_first_dense=(6, 2, 2))
    return t.eval(), k


def _mlp_pair(seed=1):
    torch.manual_seed(seed)
    t = rt.ibp_init_(nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(),
                                   nn.Linear(20, 5)))
    k = keras.Sequential([keras.Input((8, 8, 1)), L.Flatten(), L.Dense(20), L.ReLU(), L.Dense(20, activation="relu"),
                          L.Dense(5)])
    _copy_affine(t, k)
    return t.eval(), k


def _spectral_pair(seed=2):
    torch.manual_seed(seed)
    t = nn.Sequential(rt.SpectralConv2d(1, 4, 3, padding=1), rt.GroupSort(2), nn.Flatten(),
                      rt.SpectralLinear(256, 16), rt.GroupSort(2), rt.SpectralLinear(16, 5))
    _randomise_torch(t, seed)
    k = keras.Sequential([keras.Input((8, 8, 1)), rk.SpectralConv2D(4, 3, padding="same"), rk.GroupSort(2),
                          L.Flatten(), rk.SpectralDense(16), rk.MaxMin(), rk.SpectralDense(5)])
    _copy_affine(t, k, chw_before_first_dense=(4, 8, 8))
    return t.eval(), k


PAIRS = {"cnn": _cnn_pair, "mlp": _mlp_pair, "spectral": _spectral_pair}


def _data(n=8, seed=3, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_copied_models_compute_the_same_outputs(name):
    t, k = PAIRS[name]()
    x, _ = _data()
    np.testing.assert_allclose(_np(k(_nhwc(x))), _np(t(x)), **TOL)


# ---------------------------------------------------------------- layers


def test_spectral_dense_matches_spectral_linear_in_eval_and_training():
    torch.manual_seed(0)
    t = rt.SpectralLinear(12, 7)
    _randomise_torch(t, 0)
    k = rk.SpectralDense(7)
    k.build((None, 12))
    _copy_affine(t, k)
    x = torch.randn(6, 12)
    np.testing.assert_allclose(_np(k(x.numpy(), training=False)), _np(t.eval()(x)), **TOL)
    yt = t.train()(x)
    yk = k(x.numpy(), training=True)
    np.testing.assert_allclose(_np(yk), _np(yt), **TOL)
    np.testing.assert_allclose(_np(k.u), _np(t._u), **TOL)
    assert k.lipschitz_bound() == pytest.approx(t.lipschitz_bound(), rel=1e-5)


@pytest.mark.parametrize("stride,size", [(1, 6), (2, 7)])
def test_spectral_conv_matches_torch(stride, size):
    torch.manual_seed(1)
    t = rt.SpectralConv2d(2, 4, 3, stride=stride, padding=1)
    _randomise_torch(t, 1)
    k = rk.SpectralConv2D(4, 3, strides=stride, padding="same")
    k.build((None, size, size, 2))
    _copy_affine(t, k)
    x = torch.randn(3, 2, size, size)
    np.testing.assert_allclose(_np(k(_nhwc(x))), _np(t.eval()(x)).transpose(0, 2, 3, 1), **TOL)
    assert k.lipschitz_bound() == pytest.approx(t.lipschitz_bound(), rel=1e-5)


def _copy_cayley(t, k):
    for name in ("weight", "alpha", "psi", "bias"):
        if hasattr(t, name) and getattr(t, name) is not None:
            _assign(getattr(k, name), getattr(t, name))


def test_sandwich_and_lbdn_match_torch():
    torch.manual_seed(2)
    t = rt.LBDN(16, (8, 6), 3, gamma=4.0)
    k = rk.LBDN((8, 6), 3, gamma=4.0)
    k.build((None, 4, 4, 1))
    for ts, ks in zip(t.layers, k.sandwiches):
        _copy_cayley(ts, ks)
    _copy_cayley(t.output, k.output_layer)
    x = torch.rand(5, 1, 4, 4)
    np.testing.assert_allclose(_np(k(_nhwc(x))), _np(t(x)), **TOL)
    assert k.lipschitz_bound() == pytest.approx(t.lipschitz_bound(), rel=1e-5)


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("k", [1, 4])
def test_hkr_kr_hinge_and_tau_ce_equal_torch(k):
    g = torch.Generator().manual_seed(k)
    out = torch.randn(16, k, generator=g) * 2
    y = (torch.randint(0, 2, (16,), generator=g) * 2 - 1) if k == 1 else torch.randint(0, k, (16,), generator=g)
    pairs = [(rt.HKRLoss(10.0, 1.0), rk.HKRLoss(10.0, 1.0)), (rt.HKRLoss(2.5, 0.3), rk.HKRLoss(2.5, 0.3)),
             (rt.KRLoss(), rk.KRLoss()), (rt.HingeMarginLoss(0.7), rk.HingeMarginLoss(0.7)),
             (rt.HKRLoss(math.inf), rk.HKRLoss(math.inf))]
    if k > 1:
        pairs.append((rt.TauCrossEntropyLoss(8.0), rk.TauCrossEntropyLoss(8.0)))
    for tl, kl in pairs:
        assert float(kl(y.numpy(), out.numpy())) == pytest.approx(float(tl(out, y)), abs=1e-5), type(kl).__name__
    assert float(rk.kr_estimate(y.numpy(), out.numpy())) == pytest.approx(float(rt.kr_estimate(out, y)), abs=1e-5)


# ---------------------------------------------------------------- Jacobian regularisation


@pytest.mark.parametrize("outputs", ["logits", "probabilities"])
def test_jacobian_estimate_equals_torch_with_the_same_projections(outputs):
    t, k = _cnn_pair(4)
    x, y = _data(6, 4)
    n_proj = 3
    if outputs == "logits":
        ours_t = rt.jacobian_frobenius_sq(t, x, n_proj, generator=torch.Generator().manual_seed(9))
    else:
        torch.manual_seed(9)
        reg = rt.JacobianRegularizer(t, coefficient=1.0, n_projections=n_proj, outputs="probabilities")
        ours_t = reg.penalty(x) * 2  # coefficient / 2 * mean; undone below
    g = torch.Generator().manual_seed(9) if outputs == "logits" else None
    if g is None:
        torch.manual_seed(9)
    dirs = [torch.randn((6, 5), generator=g).numpy() for _ in range(n_proj)]
    est = rk.jacobian_frobenius_sq(k, _nhwc(x), directions=dirs, outputs=outputs)
    ours_k = _np(est) if outputs == "logits" else float(tf.reduce_mean(est))
    np.testing.assert_allclose(ours_k, _np(ours_t), rtol=1e-5, atol=1e-6)


def test_jacobian_estimate_is_exact_for_a_linear_map_on_average():
    """For y = x W the Jacobian is W^T: the estimate averages to ||W||_F^2 over many directions."""
    k = keras.Sequential([keras.Input((6,)), L.Dense(4, use_bias=False)])
    w = k.layers[0].get_weights()[0]
    est = rk.jacobian_frobenius_sq(k, np.zeros((400, 6), "float32"), n_projections=4, seed=0)
    assert float(tf.reduce_mean(est)) == pytest.approx(float((w**2).sum()), rel=0.05)


# ---------------------------------------------------------------- adversarial regularisation


@pytest.mark.parametrize("norm,method", [("linf", "fgsm"), ("l2", "fgsm"), ("linf", "pgd")])
def test_adversarial_loss_equals_torch(norm, method):
    t, k = _cnn_pair(5)
    x, y = _data(8, 5)
    eps = 0.1 if norm == "linf" else 0.5
    torch_reg = rt.AdversarialRegularizer(t, multiplier=0.2, eps=eps, norm=norm, method=method, steps=4)
    expected = float(torch_reg(x, y).detach())
    cfg = rk.make_adv_reg_config(multiplier=0.2, adv_step_size=eps, adv_grad_norm=norm, method=method,
                                 pgd_iterations=4)
    _, clean, adv = rk.adversarial_losses(k, _nhwc(x), y.numpy(), cfg)
    assert float(clean) + 0.2 * float(adv) == pytest.approx(expected, abs=1e-5)
    wrapper = rk.AdversarialRegularization(k, cfg)
    wrapper.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    _, total = wrapper.objective(tf.constant(_nhwc(x)), tf.constant(y.numpy()), training=False)
    assert float(total) == pytest.approx(expected, abs=1e-5)
    x_adv = torch_reg.perturb(x, y)
    np.testing.assert_allclose(_np(wrapper.perturb_on_batch(_nhwc(x), y.numpy())), _nhwc(x_adv), atol=1e-5)


# ---------------------------------------------------------------- IBP


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_ibp_margin_bounds_and_robust_losses_equal_torch(name):
    t, k = PAIRS[name]()
    x, y = _data(8, 6)
    eps = 0.02
    xk, yk = _nhwc(x), y.numpy()
    lb_t, lb_k = _np(rt.ibp_margin_bounds(t, x, y, eps)), _np(rk.ibp_margin_bounds(k, xk, yk, eps))
    assert np.array_equal(np.isinf(lb_t), np.isinf(lb_k))
    finite = np.isfinite(lb_t)
    np.testing.assert_allclose(lb_k[finite], lb_t[finite], **TOL)
    rce_t = float(rt.robust_cross_entropy(rt.ibp_margin_bounds(t, x, y, eps), y).detach())
    assert float(rk.robust_cross_entropy(rk.ibp_margin_bounds(k, xk, yk, eps), yk)) == pytest.approx(rce_t, abs=1e-5)
    lo_t, hi_t = rt.interval_bounds(t, x, eps)
    lo_k, hi_k = rk.interval_bounds(k, xk, eps)
    np.testing.assert_allclose(_np(lo_k), _np(lo_t), **TOL)
    np.testing.assert_allclose(_np(hi_k), _np(hi_t), **TOL)
    for kappa in (0.0, 0.5, 1.0):
        expected = float(rt.IBPLoss(eps, kappa)(t, x, y).detach())
        assert float(rk.IBPLoss(eps, kappa)(k, xk, yk)) == pytest.approx(expected, abs=1e-5)
        wrapper = rk.IBPTraining(k, eps=eps, kappa=kappa)
        wrapper.compile(optimizer="adam")
        _, total = wrapper.objective(tf.constant(xk), tf.constant(yk), training=False)
        assert float(total) == pytest.approx(expected, abs=1e-5)


def _avgpool_cnn_pair(seed=8):
    """The CNN pair with average pooling (CROWN-IBP training relaxes ReLUs only)."""
    return _cnn_pair(seed, avg=True)


@pytest.mark.parametrize("make", [_avgpool_cnn_pair, _mlp_pair])
def test_crown_ibp_bounds_and_losses_equal_torch(make):
    t, k = make()
    x, y = _data(8, 9)
    xk, yk = _nhwc(x), y.numpy()
    eps = 0.03
    for beta in (1.0, 0.3):
        lb_t = _np(rt.mixed_margin_bounds(t, x, y, eps, beta))
        lb_k = _np(rk.mixed_margin_bounds(k, xk, yk, eps, beta))
        assert np.array_equal(np.isinf(lb_t), np.isinf(lb_k))
        finite = np.isfinite(lb_t)
        np.testing.assert_allclose(lb_k[finite], lb_t[finite], **TOL)
        expected = float(rt.IBPLoss(eps, 0.25, bound="crown-ibp", beta=beta)(t, x, y).detach())
        ours = float(rk.IBPLoss(eps, 0.25, bound="crown-ibp", beta=beta)(k, xk, yk))
        assert ours == pytest.approx(expected, abs=1e-5)
        wrapper = rk.IBPTraining(k, eps=eps, kappa=0.25, bound="crown-ibp", beta=beta)
        wrapper.compile(optimizer="adam")
        _, total = wrapper.objective(tf.constant(xk), tf.constant(yk), training=False)
        assert float(total) == pytest.approx(expected, abs=1e-5)
    crown = _np(rk.crown_ibp_margin_bounds(k, xk, yk, eps))
    ibp = _np(rk.ibp_margin_bounds(k, xk, yk, eps))
    assert not np.allclose(crown[finite], ibp[finite])


def test_keras_crown_ibp_rejects_layers_without_a_relaxation():
    k = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3, activation="tanh"), L.Flatten(), L.Dense(5)])
    x, y = _data(2)
    with pytest.raises(rk_errors.InvalidParameterError, match="activation 'tanh'.*bound='ibp'"):
        rk.crown_ibp_margin_bounds(k, _nhwc(x), y.numpy(), 0.1)


def test_keras_crown_ibp_gradients_match_torch():
    """Gradients of the summed CROWN-IBP bounds with respect to the first Dense kernel agree."""
    t, k = _mlp_pair(10)
    x, y = _data(6, 11)
    eps = 0.02
    lb_t = rt.crown_ibp_margin_bounds(t, x, y, eps)
    (g_t,) = torch.autograd.grad(lb_t.masked_fill(torch.isinf(lb_t), 0.0).sum(), t[1].weight)
    kernel = k.layers[1].kernel
    with tf.GradientTape() as tape:
        lb_k = rk.crown_ibp_margin_bounds(k, _nhwc(x), y.numpy(), eps)
        total = tf.reduce_sum(tf.where(tf.math.is_inf(lb_k), tf.zeros_like(lb_k), lb_k))
    g_k = tape.gradient(total, kernel)
    np.testing.assert_allclose(np.asarray(g_k).T, _np(g_t), rtol=1e-4, atol=1e-4 * float(np.abs(_np(g_t)).max()))


def test_ibp_schedules_give_the_same_loss_at_the_same_time():
    t, k = _mlp_pair(7)
    x, y = _data(8, 7)
    eps, kappa = rk.EpsilonSchedule(0.05, warmup=1, ramp=4), rk.KappaSchedule(1.0, 0.5, 1, 4)
    for when in (0.5, 2.25, 9.0):
        expected = float(rt.IBPLoss(eps, kappa)(t, x, y, when).detach())
        assert float(rk.IBPLoss(eps, kappa)(k, _nhwc(x), y.numpy(), when)) == pytest.approx(expected, abs=1e-5)
