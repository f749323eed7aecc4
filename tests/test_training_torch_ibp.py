"""Tests of IBP certified training, the schedules and the Trainer in robeval.training.torch."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from robeval.errors import InvalidParameterError  # noqa: E402
from robeval.training import _common  # noqa: E402
from robeval.training.torch import (  # noqa: E402
    EpsilonSchedule,
    GroupSort,
    HKRLoss,
    IBPLoss,
    KappaSchedule,
    SpectralLinear,
    Trainer,
    certified_accuracy,
    export_onnx,
    ibp_init_,
    ibp_margin_bounds,
    interval_bounds,
    robust_cross_entropy,
)

torch.set_num_threads(1)

# float(loss) on a tensor that carries a graph is intended in these checks
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                         nn.Linear(12, 4))


def _cnn(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, stride=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 6),
        GroupSort(2), nn.Linear(6, 3),
    )
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(-1.5, 1.5)
    return net.eval()


def _samples_in_box(x, eps, n):
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    t = torch.rand(n, *x.shape)
    t[: n // 4] = t[: n // 4].round()  # vertices too
    return lo + t * (hi - lo)


@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_interval_bounds_enclose_sampled_outputs(make):
    net = make().eval()
    x = torch.rand(3, 1, 8, 8) if make is _cnn else torch.rand(3, 1, 4, 4)
    eps = 0.05
    lo, hi = interval_bounds(net, x, eps)
    with torch.no_grad():
        for i in range(x.shape[0]):
            out = net(_samples_in_box(x[i], eps, 400))
            assert torch.all(out >= lo[i] - 1e-5) and torch.all(out <= hi[i] + 1e-5)


@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_margin_bounds_enclose_sampled_margins_and_are_exact_at_zero(make):
    net = make().eval()
    x = torch.rand(4, 1, 8, 8) if make is _cnn else torch.rand(4, 1, 4, 4)
    with torch.no_grad():
        y = net(x).argmax(1)
        lb = ibp_margin_bounds(net, x, y, 0.03)
        assert torch.all(torch.isinf(lb.gather(1, y[:, None])))
        for i in range(x.shape[0]):
            z = net(_samples_in_box(x[i], 0.03, 400))
            margins = z[:, y[i]][:, None] - z
            finite = torch.arange(z.shape[1]) != y[i]
            assert torch.all(margins[:, finite] >= lb[i, finite] - 1e-5)
        exact = net(x).gather(1, y[:, None]) - net(x)
        lb0 = ibp_margin_bounds(net, x, y, 0.0)
        mask = ~torch.isinf(lb0)
        assert torch.allclose(lb0[mask], exact[mask], atol=1e-5)


def test_folded_margin_is_at_least_as_tight_as_logit_differences():
    net = _mlp(1).eval()
    x = torch.rand(16, 1, 4, 4)
    y = torch.randint(0, 4, (16,))
    lb = ibp_margin_bounds(net, x, y, 0.05)
    lo, hi = interval_bounds(net, x, 0.05)
    naive = lo.gather(1, y[:, None]) - hi
    mask = ~torch.isinf(lb)
    assert torch.all(lb[mask] >= naive[mask] - 1e-6)
    assert torch.any(lb[mask] > naive[mask] + 1e-3)  # strictly tighter somewhere


def test_input_box_is_clipped_to_the_domain():
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.eye(2))
        net[1].bias.zero_()
    lo, hi = interval_bounds(net, torch.tensor([[0.0, 1.0]]), 0.1)
    assert torch.allclose(lo, torch.tensor([[0.0, 0.9]])) and torch.allclose(hi, torch.tensor([[0.1, 1.0]]))
    lo, hi = interval_bounds(net, torch.tensor([[0.0, 1.0]]), 0.1, clip=None)
    assert torch.allclose(lo, torch.tensor([[-0.1, 0.9]]))


def test_closed_form_single_linear_layer():
    """One affine layer: the margin bound is (W_y - W_j) x + b_y - b_j - eps ||W_y - W_j||_1."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(5, 3))
    x, y = torch.rand(6, 5) * 0.5 + 0.25, torch.randint(0, 3, (6,))
    with torch.no_grad():
        lb = ibp_margin_bounds(net, x, y, 0.1)
    w, b = net[0].weight.detach(), net[0].bias.detach()
    for i in range(6):
        for j in range(3):
            if j == y[i]:
                continue
            d = w[y[i]] - w[j]
            ref = d @ x[i] + b[y[i]] - b[j] - 0.1 * d.abs().sum()
            assert float(lb[i, j]) == pytest.approx(float(ref), abs=1e-5)


def test_robust_cross_entropy_bounds_clean_cross_entropy():
    net = _mlp(3)
    x, y = torch.rand(32, 1, 4, 4), torch.randint(0, 4, (32,))
    with torch.no_grad():
        clean = nn.functional.cross_entropy(net(x), y)
        robust = robust_cross_entropy(ibp_margin_bounds(net, x, y, 0.02), y)
        at_zero = robust_cross_entropy(ibp_margin_bounds(net, x, y, 0.0), y)
    assert float(robust) >= float(clean) - 1e-6
    assert float(at_zero) == pytest.approx(float(clean), abs=1e-5)


def test_ibp_rejects_unsupported_layers_and_train_mode_batchnorm():
    with pytest.raises(InvalidParameterError, match=r"layer 1 \(Softplus\) has no IBP rule"):
        interval_bounds(nn.Sequential(nn.Linear(2, 2), nn.Softplus()), torch.rand(1, 2), 0.1)
    with pytest.raises(InvalidParameterError, match="BatchNorm1d in training mode"):
        interval_bounds(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train(), torch.rand(3, 2), 0.1)
    with pytest.raises(InvalidParameterError, match="must be nn.Linear"):
        ibp_margin_bounds(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), torch.rand(1, 2), torch.tensor([0]), 0.1)


def test_ibp_supports_spectral_linear():
    torch.manual_seed(4)
    net = nn.Sequential(SpectralLinear(6, 6), nn.ReLU(), SpectralLinear(6, 3)).eval()
    x, y = torch.rand(5, 6), torch.randint(0, 3, (5,))
    plain = nn.Sequential(net[0].export(), nn.ReLU(), net[2].export())
    assert torch.allclose(ibp_margin_bounds(net, x, y, 0.05), ibp_margin_bounds(plain, x, y, 0.05), atol=1e-5)


# ---------------------------------------------------------------- schedules and init


def test_epsilon_schedule_values():
    lin = EpsilonSchedule(target=0.01, warmup=2, ramp=8)
    assert [lin(t) for t in (0, 1.9, 2)] == [0.0, 0.0, 0.0]
    assert lin(3) == pytest.approx(0.00125) and lin(6) == pytest.approx(0.005)
    assert lin(10) == 0.01 and lin(100) == 0.01
    smooth = EpsilonSchedule(target=1.0, warmup=1, ramp=4, shape="smooth")
    ts = np.linspace(0, 6, 61)
    vals = np.array([smooth(t) for t in ts])
    assert vals[0] == 0 and smooth(5) == pytest.approx(1.0) and smooth(6) == 1.0
    assert np.all(np.diff(vals) >= 0)
    assert smooth(2) < 0.25  # a quarter into the ramp: below the linear ramp's 0.25
    # C1 at the switch point: slopes on both sides of mid = 0.25 agree
    h, mid = 1e-6, 1 + 0.25 * 4
    assert (smooth(mid) - smooth(mid - h)) / h == pytest.approx((smooth(mid + h) - smooth(mid)) / h, rel=1e-3)


def test_kappa_schedule_and_checks():
    k = KappaSchedule(start=1.0, end=0.5, warmup=2, ramp=8)
    assert k(0) == 1.0 and k(6) == pytest.approx(0.75) and k(20) == 0.5
    with pytest.raises(InvalidParameterError, match="end"):
        KappaSchedule(end=1.5)
    with pytest.raises(InvalidParameterError, match="shape"):
        EpsilonSchedule(0.1, shape="cosine")
    with pytest.raises(InvalidParameterError, match="target"):
        EpsilonSchedule(-0.1)


def test_ibp_init_std_and_last_layer_untouched():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Conv2d(1, 1, 1), nn.Linear(400, 10))
    last = net[4].weight.clone()
    ibp_init_(net)
    assert float(net[1].weight.detach().std()) == pytest.approx(math.sqrt(2 * math.pi) / 784, rel=0.02)
    assert float(net[3].weight.detach().abs().max()) < 10  # a 1x1 conv, fan_in 1: std sqrt(2 pi)
    assert torch.equal(net[4].weight, last)
    assert _common.ibp_init_std(100) == pytest.approx(math.sqrt(2 * math.pi) / 100)


def test_ibp_loss_schedule_and_training_step():
    torch.manual_seed(6)
    net = ibp_init_(_mlp(6))
    x = torch.rand(64, 1, 4, 4)
    y = x.flatten(1)[:, :4].argmax(1)
    loss = IBPLoss(EpsilonSchedule(0.05, warmup=1, ramp=1), KappaSchedule(1.0, 0.5, warmup=1, ramp=1))
    clean = nn.functional.cross_entropy(net(x), y)
    assert float(loss(net, x, y, 0.5)) == pytest.approx(float(clean))  # warm-up: clean only
    robust = robust_cross_entropy(ibp_margin_bounds(net, x, y, 0.05), y)
    assert float(loss(net, x, y, 5.0)) == pytest.approx(float(0.5 * clean + 0.5 * robust), rel=1e-5)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    first = float(loss(net, x, y, 5.0))
    for _ in range(30):
        opt.zero_grad()
        loss(net, x, y, 5.0).backward()
        opt.step()
    assert float(loss(net, x, y, 5.0)) < first
    assert 0.0 <= certified_accuracy(net, x, y, 0.05) <= 1.0


# ---------------------------------------------------------------- trainer and ONNX


def test_trainer_fits_checkpoints_and_exports_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(7)
    x = torch.rand(256, 1, 4, 4)
    y = x.flatten(1)[:, :4].argmax(1)
    net = nn.Sequential(nn.Flatten(), SpectralLinear(16, 16), GroupSort(2), SpectralLinear(16, 4))
    ckpt, onnx_file = tmp_path / "ckpt.pt", tmp_path / "net.onnx"
    trainer = Trainer(net, loss=IBPLoss(EpsilonSchedule(0.01, warmup=1, ramp=1)), epochs=3, batch_size=64,
                      lr=0.01, metrics={"certified": lambda m, a, b: certified_accuracy(m, a, b, 0.01)},
                      checkpoint=ckpt, onnx_path=onnx_file, progress=False)
    history = trainer.fit((x, y), val=(x, y))
    assert len(history) == 3 and history[-1].loss < history[0].loss
    assert set(history[-1].to_dict()) >= {"epoch", "loss", "accuracy", "certified", "seconds"}
    state = torch.load(ckpt, weights_only=True)
    fresh = nn.Sequential(nn.Flatten(), SpectralLinear(16, 16), GroupSort(2), SpectralLinear(16, 4))
    fresh.load_state_dict(state)
    net.eval()
    fresh.eval()
    assert torch.allclose(fresh(x), net(x), atol=1e-6)
    session = ort.InferenceSession(str(onnx_file))
    got = session.run(None, {"input": x[:10].numpy()})[0]
    assert np.allclose(got, net(x[:10]).detach().numpy(), atol=1e-5)


def test_trainer_accepts_criterion_and_regulariser_forms(tmp_path):
    torch.manual_seed(8)
    x = torch.randn(64, 4)
    y = torch.where(x[:, 0] > 0, 1, -1)
    net = nn.Sequential(SpectralLinear(4, 8), GroupSort(2), SpectralLinear(8, 1))
    hist = Trainer(net, loss=HKRLoss(10.0, 0.5), epochs=10, batch_size=16, lr=0.02, progress=False).fit(
        (x, y), val=(x, y))
    assert hist[-1].loss < hist[0].loss and hist[-1].metrics["accuracy"] > 0.8
    from robeval.training.torch import AdversarialRegularizer

    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    yc = (y > 0).long()
    reg = AdversarialRegularizer(mlp, eps=0.05, clip=None)
    hist = Trainer(mlp, loss=reg, epochs=2, batch_size=16, progress=True).fit([(x, yc)], val=(x, yc))
    assert len(hist) == 2
    path = export_onnx(mlp, tmp_path / "mlp.onnx", x[:1])
    assert path.exists()


# ---------------------------------------------------------------- example smoke tests


@pytest.mark.parametrize("script", ["ibp_mlp.py", "ibp_mlp.py --bound crown-ibp", "ibp_cnn.py", "lipschitz_mnist.py",
                                    "hkr_binary.py", "lbdn_mlp.py", "adversarial_cnn.py", "jacobian_cnn.py"])
def test_examples_run_in_quick_mode(script, tmp_path):
    from example_runner import run_quick

    out = run_quick("torch", script, tmp_path)
    assert any(p.suffix in (".onnx", ".pt") for p in tmp_path.iterdir())
    if "crown-ibp" in script:
        assert "CROWN-IBP-certified accuracy" in out
