"""Tests of robeval.training.torch: Lipschitz layers, losses and regularisers.

Each test compares against something independent: exact SVDs, autograd Jacobians, closed
forms, or sampled pairs of points.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from robeval.errors import InputShapeError, InvalidParameterError  # noqa: E402
from robeval.training import _common  # noqa: E402
from robeval.training.torch import (  # noqa: E402
    LBDN,
    AdversarialRegularizer,
    GroupSort,
    HingeMarginLoss,
    HKRLoss,
    JacobianRegularizer,
    KRLoss,
    MaxMin,
    SandwichLayer,
    SpectralConv2d,
    SpectralLinear,
    TauCrossEntropyLoss,
    bjorck,
    cayley,
    export_model,
    jacobian_frobenius_sq,
    kr_estimate,
    lipschitz_bound,
)

torch.set_num_threads(1)

# float(loss) on a tensor that carries a graph is intended in these checks
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def _max_ratio(f, x, y):
    """Largest ||f(x) - f(y)|| / ||x - y|| over pairs (rows)."""
    with torch.no_grad():
        num = (f(x) - f(y)).flatten(1).norm(dim=1)
        den = (x - y).flatten(1).norm(dim=1)
    return float((num / den).max())


def _jacobian_norm(f, x):
    """Spectral norm of the Jacobian of f at one input x (no batch axis), in float64."""
    jac = torch.autograd.functional.jacobian(lambda z: f(z[None])[0], x)
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x.numel()).double(), 2))


# ---------------------------------------------------------------- spectral layers


def test_bjorck_orthonormalises_rows_and_columns():
    torch.manual_seed(0)
    for shape in [(8, 20), (20, 8), (12, 12)]:
        w = torch.randn(shape)
        w = bjorck(w / torch.linalg.matrix_norm(w, 2), iterations=30)
        gram = w @ w.t() if shape[0] <= shape[1] else w.t() @ w
        assert torch.allclose(gram, torch.eye(min(shape)), atol=1e-4)


def test_spectral_linear_bound_holds_and_weight_is_orthonormal():
    torch.manual_seed(0)
    layer = SpectralLinear(30, 10)
    with torch.no_grad():
        layer.weight.normal_()  # a non-orthogonal free weight
    layer.train()
    for _ in range(5):  # power iteration converges over steps
        layer(torch.zeros(1, 30))
    w = layer.export().weight.detach()
    assert torch.allclose(w @ w.t(), torch.eye(10), atol=1e-3)
    bound = layer.lipschitz_bound()
    exact = float(np.linalg.svd(w.double().numpy(), compute_uv=False)[0])
    assert exact <= bound <= exact * (1 + 1e-5)
    x, y = torch.randn(500, 30), torch.randn(500, 30)
    assert _max_ratio(layer.eval(), x, y) <= bound
    assert _jacobian_norm(layer, x[0]) <= bound


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0), (1, 0), (2, 1)])
def test_spectral_conv_bound_holds_against_exact_operator_norm(stride, padding):
    torch.manual_seed(1)
    layer = SpectralConv2d(3, 6, 3, stride=stride, padding=padding)
    with torch.no_grad():
        layer.weight.normal_()
    plain = layer.export()
    bound = layer.lipschitz_bound()
    # the operator norm of the exported conv by power iteration on A^T A (conv / conv-transpose)
    x = torch.randn(1, 3, 10, 10)
    with torch.no_grad():
        for _ in range(200):
            x = x / x.norm()
            y = plain(x) - plain.bias.reshape(1, -1, 1, 1)
            x = torch.nn.grad.conv2d_input(x.shape, plain.weight, y, stride=stride, padding=padding)
    sigma = float(x.norm().sqrt())
    assert sigma <= bound
    pairs = torch.rand(200, 3, 10, 10), torch.rand(200, 3, 10, 10)
    assert _max_ratio(layer.eval(), *pairs) <= bound


def test_conv_factor_bounds_random_plain_kernels():
    """The sqrt(overlap) * ||W_mat|| bound itself, on unnormalised kernels (the proof, not training)."""
    torch.manual_seed(2)
    for k, s, p in [(3, 1, 1), (5, 1, 2), (3, 2, 1), (4, 2, 0), (2, 2, 0)]:
        conv = nn.Conv2d(2, 4, k, stride=s, padding=p, bias=False)
        mat = conv.weight.detach().reshape(4, -1).double().numpy()
        bound = _common.conv_lipschitz_factor((k, k), (s, s)) * _common.spectral_norm(mat)
        x = torch.randn(1, 2, 9, 9)
        with torch.no_grad():
            for _ in range(300):
                x = x / x.norm()
                x = torch.nn.grad.conv2d_input(x.shape, conv.weight, conv(x), stride=s, padding=p)
        assert float(x.norm().sqrt()) <= bound


def test_spectral_layers_export_identical_outputs():
    torch.manual_seed(3)
    lin, conv = SpectralLinear(12, 7), SpectralConv2d(2, 4, 3, padding=1)
    x, xc = torch.randn(16, 12), torch.rand(4, 2, 8, 8)
    for layer, inp in [(lin, x), (conv, xc)]:
        layer.eval()
        assert torch.allclose(layer(inp), layer.export()(inp), atol=1e-6)
    assert type(lin.export()) is nn.Linear and type(conv.export()) is nn.Conv2d


def test_spectral_conv_rejects_wrong_input():
    with pytest.raises(InputShapeError, match=r"expected \(N, 2, H, W\)"):
        SpectralConv2d(2, 4, 3)(torch.rand(1, 3, 8, 8))


# ---------------------------------------------------------------- GroupSort


def test_groupsort_sorts_pairs_ascending_on_channel_axis():
    x = torch.tensor([[3.0, 1.0, -1.0, 2.0]])
    assert torch.equal(GroupSort(2)(x), torch.tensor([[1.0, 3.0, -1.0, 2.0]]))
    assert torch.equal(MaxMin()(x), GroupSort(2)(x))
    img = torch.randn(2, 4, 3, 3)
    out = GroupSort(2)(img)
    assert torch.equal(out[:, 0], torch.minimum(img[:, 0], img[:, 1]))
    assert torch.equal(out[:, 3], torch.maximum(img[:, 2], img[:, 3]))
    g4 = GroupSort(4)(torch.tensor([[4.0, 2.0, 3.0, 1.0]]))
    assert torch.equal(g4, torch.tensor([[1.0, 2.0, 3.0, 4.0]]))


def test_groupsort_is_one_lipschitz_and_exports():
    torch.manual_seed(4)
    x, y = torch.randn(500, 8), torch.randn(500, 8)
    for gs in (GroupSort(2), GroupSort(4), MaxMin()):
        assert _max_ratio(gs, x, y) <= 1.0 + 1e-6
        assert torch.equal(gs.export()(x), gs(x))
    with pytest.raises(InputShapeError, match="divisible by 2"):
        GroupSort(2)(torch.randn(2, 3))


def test_spectral_network_bound_and_export():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Flatten(), SpectralLinear(16, 8), GroupSort(2), SpectralLinear(8, 1))
    plain = export_model(net)
    x = torch.rand(64, 1, 4, 4)
    net.eval()
    assert torch.allclose(net(x), plain(x), atol=1e-6)
    assert all(type(m) in (nn.Flatten, nn.Linear, GroupSort) for m in plain)
    bound = lipschitz_bound(net)
    assert bound == pytest.approx(1.0, abs=1e-4)
    assert lipschitz_bound(plain) == pytest.approx(bound, rel=1e-6)
    assert _max_ratio(net, x, torch.rand(64, 1, 4, 4)) <= bound


def test_lipschitz_bound_counts_a_leaky_relu_slope_of_any_sign():
    """LeakyReLU(-2) is 2-Lipschitz, not 1: the product of layer bounds must include |slope|."""
    torch.manual_seed(6)
    net = nn.Sequential(nn.Flatten(), SpectralLinear(16, 8), nn.LeakyReLU(-2.0), SpectralLinear(8, 1))
    bound = lipschitz_bound(net)
    assert bound == pytest.approx(2.0, rel=1e-3)
    x = torch.rand(256, 1, 4, 4)
    assert _max_ratio(net.eval(), x, x + 1e-3 * torch.randn_like(x)) <= bound


# ---------------------------------------------------------------- sandwich / LBDN


def test_cayley_gives_orthonormal_rows():
    torch.manual_seed(6)
    for n, m in [(4, 6), (6, 4), (5, 5)]:
        q = cayley(torch.randn(n, n + m, dtype=torch.float64))
        assert torch.allclose(q @ q.t(), torch.eye(n, dtype=torch.float64), atol=1e-10)


def test_sandwich_layer_is_one_lipschitz_with_any_parameters():
    torch.manual_seed(7)
    layer = SandwichLayer(10, 6)
    with torch.no_grad():
        layer.psi.normal_(0, 2)  # Psi cancels in the Jacobian whatever its value
        layer.bias.normal_()
        layer.weight.normal_()
    bound = layer.lipschitz_bound()
    assert bound == pytest.approx(1.0, abs=1e-5)
    x = torch.randn(20, 10)
    assert max(_jacobian_norm(layer, xi) for xi in x) <= bound
    assert _max_ratio(layer, x, torch.randn(20, 10)) <= bound
    plain = layer.export()
    assert torch.allclose(plain(x), layer(x), atol=1e-5)


def test_lbdn_respects_gamma_and_exports_plain_mlp():
    torch.manual_seed(8)
    net = LBDN(20, (16, 16), 4, gamma=5.0)
    with torch.no_grad():
        for layer in net.layers:
            layer.psi.normal_()
            layer.bias.normal_()
    bound = net.lipschitz_bound()
    assert bound <= 5.0 * (1 + 1e-5)
    x = torch.randn(15, 20)
    jac = [_jacobian_norm(net, xi) for xi in x]
    assert max(jac) <= bound
    plain = net.export()
    assert [type(m) for m in plain] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert torch.allclose(plain(x), net(x), atol=1e-5)
    assert torch.allclose(net.export(merge=False)(x), net(x), atol=1e-5)


def test_lbdn_checks_parameters():
    with pytest.raises(InvalidParameterError, match="gamma"):
        LBDN(4, (4,), 2, gamma=0.0)
    with pytest.raises(InvalidParameterError, match="hidden"):
        LBDN(4, (), 2)


# ---------------------------------------------------------------- losses


def test_kr_and_hinge_closed_forms():
    f = torch.tensor([2.0, 0.5, -1.0, -3.0])
    y = torch.tensor([1, 1, -1, -1])
    assert float(kr_estimate(f, y)) == pytest.approx(1.25 - (-2.0))
    assert float(kr_estimate(f, (y > 0).long())) == pytest.approx(3.25)  # {0, 1} labels
    # hinge: relu(1 - [2, 0.5, 1, 3]) = [0, 0.5, 0, 0]
    assert float(HingeMarginLoss(1.0)(f, y)) == pytest.approx(0.125)
    assert float(KRLoss()(f[:, None], y)) == pytest.approx(-3.25)


def test_multiclass_one_vs_all():
    logits = torch.tensor([[1.0, -1.0, 0.0], [-2.0, 2.0, 1.0]])
    y = torch.tensor([0, 1])
    signs = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0]])
    expected_hinge = torch.relu(1.0 - signs * logits).mean()
    assert float(HingeMarginLoss(1.0)(logits, y)) == pytest.approx(float(expected_hinge))
    # class 0: 1 - (-2); class 1: 2 - (-1); class 2: no positive sample -> 0 - mean(0, 1)
    assert float(kr_estimate(logits, y)) == pytest.approx((3.0 + 3.0 - 0.5) / 3)
    onehot = torch.nn.functional.one_hot(y, 3)
    assert float(kr_estimate(logits, onehot)) == pytest.approx(float(kr_estimate(logits, y)))


def test_hkr_reduces_to_its_parts_at_the_limits():
    torch.manual_seed(9)
    f, y = torch.randn(32, 1), torch.randint(0, 2, (32,)) * 2 - 1
    kr, hinge = KRLoss()(f, y), HingeMarginLoss(0.7)(f, y)
    assert torch.equal(HKRLoss(alpha=0.0, min_margin=0.7)(f, y), kr)
    assert torch.equal(HKRLoss(alpha=math.inf, min_margin=0.7)(f, y), hinge)
    assert float(HKRLoss(alpha=3.0, min_margin=0.7)(f, y)) == pytest.approx(float(3.0 * hinge + kr))
    big = 1e6
    assert float(HKRLoss(alpha=big, min_margin=0.7)(f, y)) / big == pytest.approx(float(hinge), rel=1e-5)
    # every sample beyond the margin: the hinge term vanishes and HKR = -KR
    wide = y[:, None].float() * (1.0 + torch.rand(32, 1))
    assert torch.equal(HKRLoss(alpha=10.0, min_margin=1.0)(wide, y), KRLoss()(wide, y))
    multi, labels = torch.randn(16, 5), torch.randint(0, 5, (16,))
    assert torch.equal(HKRLoss(alpha=0.0)(multi, labels), KRLoss()(multi, labels))


def test_loss_label_checks():
    with pytest.raises(InvalidParameterError, match="binary labels"):
        HKRLoss()(torch.randn(4), torch.tensor([2, 1, 1, 1]))
    with pytest.raises(InvalidParameterError, match=r"integers in \[0, 3\)"):
        HKRLoss()(torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(InvalidParameterError, match="alpha"):
        HKRLoss(alpha=-1.0)


def test_tau_cross_entropy_scales_logits():
    logits, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    ref = torch.nn.functional.cross_entropy(5.0 * logits, y) / 5.0
    assert torch.allclose(TauCrossEntropyLoss(5.0)(logits, y), ref)
    assert torch.allclose(TauCrossEntropyLoss(1.0)(logits, y), torch.nn.functional.cross_entropy(logits, y))


def _few_steps(params, loss_fn, steps=30, lr=0.05):
    opt = torch.optim.Adam(params, lr=lr)
    first = float(loss_fn().detach())
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    return first, float(loss_fn().detach())


def test_optimisation_reduces_hkr_on_a_lipschitz_net():
    torch.manual_seed(10)
    x = torch.randn(64, 6)
    y = torch.where(x[:, 0] > 0, 1, -1)
    net = nn.Sequential(SpectralLinear(6, 8), GroupSort(2), SpectralLinear(8, 1))
    loss = HKRLoss(alpha=10.0, min_margin=0.5)
    first, last = _few_steps(net.parameters(), lambda: loss(net(x), y))
    assert last < first - 0.1


def test_optimisation_reduces_tau_ce_on_lbdn():
    torch.manual_seed(11)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    net = LBDN(6, (8,), 3, gamma=2.0)
    loss = TauCrossEntropyLoss(4.0)
    first, last = _few_steps(net.parameters(), lambda: loss(net(x), y))
    assert last < first


# ---------------------------------------------------------------- Jacobian regularisation


def test_jacobian_estimate_is_exact_in_expectation():
    """Mean of many draws vs the exact ||J||_F^2 from torch.autograd.functional.jacobian.

    Tolerance: the draws are i.i.d., so the mean's standard error is std / sqrt(n); 4 standard
    errors bound a false failure below 1e-4 (by the CLT), while a biased estimator (e.g. one
    missing the factor C) is off by far more.
    """
    torch.manual_seed(12)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    x = torch.randn(3, 5)
    exact = torch.stack([torch.autograd.functional.jacobian(net, xi).pow(2).sum() for xi in x])
    draws = torch.stack([jacobian_frobenius_sq(net, x) for _ in range(2000)])  # (2000, 3)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert torch.all((mean - exact).abs() <= 4 * se), (mean, exact, se)
    # more projections average the same draws: same expectation, smaller spread
    many = torch.stack([jacobian_frobenius_sq(net, x, n_projections=8) for _ in range(300)])
    assert torch.all(many.std(0) < draws.std(0))


def test_jacobian_estimate_linear_closed_form():
    torch.manual_seed(13)
    lin = nn.Linear(6, 3)
    exact = float(lin.weight.detach().pow(2).sum())
    est = torch.stack([jacobian_frobenius_sq(lin, torch.randn(50, 6)) for _ in range(100)])
    assert float(est.mean()) == pytest.approx(exact, rel=0.05)


def test_jacobian_regularizer_reduces_its_loss_and_the_norm():
    torch.manual_seed(14)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    reg = JacobianRegularizer(net, coefficient=1.0, n_projections=2)
    with torch.no_grad():
        net[0].weight.mul_(5)  # start with a steep network
    norm_before = float(jacobian_frobenius_sq(net, x, 16).mean())
    torch.manual_seed(0)
    first, last = _few_steps(net.parameters(), lambda: reg(x, y), steps=40, lr=0.02)
    assert last < first
    assert float(jacobian_frobenius_sq(net, x, 16).mean()) < norm_before
    assert float(reg.penalty(x).detach()) >= 0


def test_jacobian_regularizer_on_probabilities_matches_softmax_jacobian():
    torch.manual_seed(18)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
    x = torch.randn(1, 5)
    exact = float(torch.autograd.functional.jacobian(lambda z: net(z).softmax(-1), x[0]).pow(2).sum())
    reg = JacobianRegularizer(net, coefficient=2.0, outputs="probabilities")
    draws = torch.tensor([float(reg.penalty(x).detach()) for _ in range(800)])  # coefficient/2 = 1
    assert abs(float(draws.mean()) - exact) <= 4 * float(draws.std()) / math.sqrt(len(draws))
    with pytest.raises(InvalidParameterError, match="outputs"):
        JacobianRegularizer(net, outputs="softmax")


# ---------------------------------------------------------------- adversarial regularisation


def test_fgsm_never_lowers_a_convex_loss():
    """For a linear model, CE is convex in x: loss(x + eps sign g) >= loss(x) + eps ||g||_1."""
    torch.manual_seed(15)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
    x, y = torch.rand(40, 1, 2, 4), torch.randint(0, 3, (40,))
    reg = AdversarialRegularizer(lin, eps=0.1, clip=None)
    adv = reg.perturb(x, y)
    assert torch.allclose((adv - x).abs(), torch.full_like(x, 0.1), atol=1e-6)
    per_clean = nn.functional.cross_entropy(lin(x), y, reduction="none")
    per_adv = nn.functional.cross_entropy(lin(adv), y, reduction="none")
    assert torch.all(per_adv >= per_clean - 1e-6)
    clean, adv_loss = reg.losses(x, y)
    total = reg(x, y)
    assert float(total) == pytest.approx(float(clean + 0.2 * adv_loss), rel=1e-6)


@pytest.mark.parametrize("method,norm", [("fgsm", "linf"), ("pgd", "linf"), ("pgd", "l2"), ("fgsm", "l2")])
def test_adversarial_term_exceeds_clean_loss_on_average(method, norm):
    torch.manual_seed(16)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.rand(64, 1, 4, 4), torch.randint(0, 4, (64,))
    eps = 0.1 if norm == "linf" else 0.5
    reg = AdversarialRegularizer(net, eps=eps, norm=norm, method=method, steps=5)
    clean, adv_loss = reg.losses(x, y)
    assert float(adv_loss) > float(clean)
    adv = reg.perturb(x, y)
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    delta = (adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps + 1e-5


def test_adversarial_training_steps_reduce_the_regularised_loss():
    torch.manual_seed(17)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.rand(64, 1, 4, 4)
    y = (x.flatten(1)[:, :4].argmax(1))
    reg = AdversarialRegularizer(net, multiplier=0.2, eps=0.05)
    first, last = _few_steps(net.parameters(), lambda: reg(x, y), steps=40, lr=0.02)
    assert last < first


def test_adversarial_parameter_checks():
    net = nn.Linear(2, 2)
    with pytest.raises(InvalidParameterError, match="norm"):
        AdversarialRegularizer(net, norm="l1")
    with pytest.raises(InvalidParameterError, match="method"):
        AdversarialRegularizer(net, method="cw")
    with pytest.raises(InvalidParameterError, match="eps"):
        AdversarialRegularizer(net, eps=-0.1)


# ---------------------------------------------------------------- framework neutrality


def test_training_package_imports_no_framework():
    code = (
        "import sys, robeval.training, robeval.training._common as c; "
        "assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules, sorted(sys.modules); "
        "print(c.EpsilonSchedule(0.01, 2, 8)(6.0))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.005"
