"""Attacks (FGSM, PGD, APGD) checked against independent references: finite differences, a closed
form on one dense layer, torchattacks, IBP certificates, and the final re-check itself."""

from __future__ import annotations

import json
import warnings

import numpy
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from robeval.adapters.base import NetworkModel
from robeval.adapters.gradients import loss_and_cotangent
from robeval.certifiers import IBP
from robeval.certifiers.apgd import APGD, checkpoints
from robeval.certifiers.attacks import FGSM, PGD, Oracle, attack, get_attack
from robeval.certifiers.consistency import ConsistencyError, GradientMaskingWarning, check_certified
from robeval.errors import DataRangeError, InputShapeError, InvalidParameterError
from robeval.ir import Network, Node
from robeval.report.results import FALSIFIED, VERIFIED, CertificationResult

from nets import random_cnn, random_mlp

torch = pytest.importorskip("torch", reason="the torch comparisons need PyTorch")


# ---------------------------------------------------------------------------- a torch adapter
class _TorchTestModel:
    """Minimal adapter over an nn.Module (used until robeval.adapters.torch exists)."""

    channels_last = False
    outputs_probabilities = False

    def __init__(self, module, input_shape):
        self.module = module.eval()
        self.input_shape = tuple(input_shape)
        self.dtype = next(module.parameters()).dtype
        with torch.no_grad():
            self.num_classes = int(module(torch.zeros((1,) + self.input_shape, dtype=self.dtype)).shape[1])

    def predict(self, x):
        with torch.no_grad():
            return self.module(torch.as_tensor(numpy.asarray(x), dtype=self.dtype)).numpy()

    def logits_and_gradient(self, x, y, loss="ce"):
        xt = torch.as_tensor(numpy.asarray(x), dtype=self.dtype).requires_grad_(True)
        z = self.module(xt)
        yt = torch.as_tensor(numpy.asarray(y), dtype=torch.int64)
        if loss == "ce":
            value = torch.nn.functional.cross_entropy(z, yt, reduction="sum")
        else:
            others = z.detach().clone()
            others[torch.arange(len(yt)), yt] = -torch.inf
            j = others.argmax(1)
            idx = torch.arange(len(yt))
            value = (z[idx, j] - z[idx, yt]).sum()
        (g,) = torch.autograd.grad(value, xt)
        return z.detach().numpy(), g.numpy()

    def input_gradient(self, x, y, loss="ce"):
        return self.logits_and_gradient(x, y, loss)[1]


def torch_model(module, input_shape):
    try:
        from robeval.adapters.torch import TorchModel
    except ImportError:
        return _TorchTestModel(module, input_shape)
    return TorchModel(module, input_shape=tuple(input_shape))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: torch's thread pool only adds contention (100x here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits_mlp():
    """A small MLP trained for 300 full-batch Adam steps on scikit-learn digits (~91% test accuracy)."""
    from robeval.data import load_dataset

    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.as_tensor(train.x), torch.as_tensor(train.y)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    net.eval()
    return net, test.x[:300], test.y[:300]


def loss_of(model, x, y, loss):
    z = numpy.asarray(model.predict(x), dtype=numpy.float64)
    return loss_and_cotangent(numpy, z, y, loss)[0].sum()


def central_differences(model, x, y, loss, h=1e-6):
    g = numpy.zeros_like(x)
    for i in numpy.ndindex(x.shape):
        e = numpy.zeros_like(x)
        e[i] = h
        g[i] = (loss_of(model, x + e, y, loss) - loss_of(model, x - e, y, loss)) / (2 * h)
    return g


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("loss", ["ce", "margin"])
@pytest.mark.parametrize("make", [lambda r: random_mlp(r, act="tanh"), lambda r: random_cnn(r, hw=6)])
def test_network_gradients_match_finite_differences(make, loss):
    rng = numpy.random.default_rng(1)
    model = NetworkModel(make(rng))
    x = rng.uniform(size=(3,) + model.input_shape)
    y = numpy.array([0, 1, 2])
    fd = central_differences(model, x, y, loss)
    logits, fast = Oracle(model)(x, y, loss)
    numpy.testing.assert_allclose(fast, fd, rtol=1e-5, atol=1e-7)
    numpy.testing.assert_allclose(model.input_gradient(x, y, loss), fd, rtol=1e-5, atol=1e-7)
    numpy.testing.assert_allclose(logits, model.predict(x), rtol=1e-12)


@pytest.mark.parametrize("loss", ["ce", "margin"])
@pytest.mark.parametrize("local", [True, False], ids=["test-adapter", "robeval-adapter"])
def test_torch_gradients_match_finite_differences(loss, local):
    if not local and not _has_torch_adapter():
        pytest.skip("robeval.adapters.torch is not there yet")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    model = _TorchTestModel(net.double(), (1, 12)) if local else torch_model(net.double(), (1, 12))
    x = numpy.random.default_rng(2).uniform(size=(3, 1, 12))
    y = numpy.array([0, 3, 1])
    fd = central_differences(model, x, y, loss)
    _, g = Oracle(model)(x, y, loss)  # logits_and_gradient on the test adapter, input_gradient otherwise
    rtol = 1e-5 if numpy.asarray(model.predict(x)).dtype == numpy.float64 else 2e-2  # a float32 adapter
    numpy.testing.assert_allclose(g, fd, rtol=rtol, atol=rtol * 1e-2)


# ---------------------------------------------------------------------------- references
def test_pgd_matches_torchattacks(digits_mlp):
    torchattacks = pytest.importorskip("torchattacks", reason="torchattacks is a test-only dependency: "
                                       "pip install --no-deps torchattacks")
    net, x, y = digits_mlp
    model = torch_model(net, (1, 8, 8))
    eps, alpha, steps = 0.1, 0.025, 10
    ref = torchattacks.PGD(net, eps=eps, alpha=alpha, steps=steps, random_start=False)
    ref_adv = ref(torch.as_tensor(x), torch.as_tensor(y))
    with torch.no_grad():
        ref_robust = float((net(ref_adv).argmax(1).numpy() == y).mean())
    ours = PGD(steps=steps, step_size=alpha, random_start=False, early_stop=False)(model, x, y, eps)
    assert abs(ours.robust_accuracy - ref_robust) <= 0.01, (ours.robust_accuracy, ref_robust)
    assert 0.05 < ref_robust < ours.clean_accuracy  # the comparison is not vacuous
    stopped = PGD(steps=steps, step_size=alpha, random_start=False)(model, x, y, eps)
    assert stopped.robust_accuracy <= ours.robust_accuracy  # early stopping only freezes successes


def test_apgd_at_least_as_strong_as_pgd(digits_mlp):
    net, x, y = digits_mlp
    model = torch_model(net, (1, 8, 8))
    for norm, eps in (("linf", 0.08), ("l2", 0.8)):
        pgd = PGD(norm=norm, steps=20)(model, x, y, eps)
        apgd = APGD(norm=norm, steps=20)(model, x, y, eps)
        assert apgd.robust_accuracy <= pgd.robust_accuracy + 0.01, (norm, apgd.robust_accuracy, pgd.robust_accuracy)
        assert apgd.robust_accuracy < apgd.clean_accuracy


def test_targeted_pgd_reaches_targets(digits_mlp):
    net, x, y = digits_mlp
    model = torch_model(net, (1, 8, 8))
    r = PGD(steps=30, loss="margin")(model, x[:100], y[:100], 0.3, targets="random")
    assert (r.targets != r.labels).all()
    assert r.success.mean() > 0.8
    assert (r.adv_predictions[r.success] == r.targets[r.success]).all()


def test_fgsm_reaches_the_closed_form_on_one_dense_layer():
    rng = numpy.random.default_rng(3)
    w, b = rng.normal(size=(5, 7)), rng.normal(size=5)
    net = Network([Node("f", "flatten", ("input",)), Node("d", "dense", ("f",), {"weight": w, "bias": b})], (7,))
    model = NetworkModel(net)
    x = rng.normal(size=(6, 7))
    y = model.predict(x).argmax(1)
    eps = 0.05
    for j in range(5):
        keep = y != j
        t = numpy.full(int(keep.sum()), j)
        r = FGSM(loss="margin", domain=None)(model, x[keep], y[keep], eps, targets=t)
        z = model.predict(r.x_adv)
        got = z[numpy.arange(len(t)), y[keep]] - z[:, j]
        z0 = model.predict(x[keep])
        expected = z0[numpy.arange(len(t)), y[keep]] - z0[:, j] - eps * numpy.abs(w[y[keep]] - w[j]).sum(axis=1)
        numpy.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_ibp_certified_samples_are_never_broken(seed):
    rng = numpy.random.default_rng(seed)
    net = random_mlp(rng, sizes=(16, 20, 20, 4), input_shape=(1, 4, 4)) if seed % 2 else random_cnn(rng)
    model = NetworkModel(net)
    x = rng.uniform(size=(60,) + model.input_shape)
    y = model.predict(x).argmax(1)
    y[:5] = (y[:5] + 1) % 4  # a few wrong labels
    eps = (0.01, 0.03)
    cert = IBP().certify(net, x, y, eps)
    assert cert.counts(0)[VERIFIED] > 0
    for atk in (PGD(steps=20, restarts=2, loss="margin", seed=seed), APGD(steps=20, seed=seed)):
        for i, e in enumerate(eps):
            r = atk(model, x, y, e)
            assert not (r.success & (cert.verdicts[:, i] == VERIFIED)).any()
            check_certified(r, cert)  # raises on a contradiction


def test_consistency_error_names_the_samples(digits_mlp):
    net, x, y = digits_mlp
    model = torch_model(net, (1, 8, 8))
    r = PGD(steps=10)(model, x[:50], y[:50], 0.3)
    broken = numpy.flatnonzero(r.success & (r.clean_predictions == r.labels))
    assert broken.size
    lying = CertificationResult(method="liar", norm="linf", eps=(0.3,), domain=(0.0, 1.0), labels=r.labels,
                                predictions=r.clean_predictions,
                                verdicts=numpy.where(r.clean_predictions == r.labels, VERIFIED, FALSIFIED)[:, None],
                                bound=numpy.ones((50, 1)), seconds=(0.0,))
    with pytest.raises(ConsistencyError, match=str(broken[:3].tolist())[1:-1]):
        check_certified(r, lying)
    with pytest.raises(ConsistencyError):
        attack(model, (x[:50], y[:50]), attack="pgd", eps=0.3, steps=10, certification=lying, checks=False)
    check_certified(r, CertificationResult(**{**lying.__dict__, "eps": (0.1,)}))  # ball not covered: fine
    l2 = PGD(norm="l2", steps=10)(model, x[:50], y[:50], 1.0)  # the L2 ball lies in the L-inf ball of one radius
    assert (~l2.robust).sum() > (l2.clean_predictions != l2.labels).sum()
    with pytest.raises(ConsistencyError):
        check_certified(l2, CertificationResult(**{**lying.__dict__, "eps": (1.0,)}))
    check_certified(l2, CertificationResult(**{**lying.__dict__, "eps": (1.0,), "norm": "l2", "domain": (0.1, 1)}))


# ---------------------------------------------------------------------------- the template's guarantees
class _Liar(PGD):
    """Claims success everywhere without changing anything."""

    def perturb(self, oracle, x, y, eps, rng, targets=None):
        return x.copy(), numpy.ones(x.shape[0], dtype=bool)


class _Escaper(PGD):
    """Proposes points far outside the ball and the domain."""

    def perturb(self, oracle, x, y, eps, rng, targets=None):
        xa, found = super().perturb(oracle, x, y, eps, rng, targets)
        return xa + 5 * eps * numpy.sign(xa - x + 1e-3), found


def test_recheck_refutes_false_claims(digits_mlp):
    net, x, y = digits_mlp
    model = torch_model(net, (1, 8, 8))
    r = _Liar(steps=5)(model, x, y, 0.1)
    assert r.robust_accuracy == r.clean_accuracy
    assert (r.success == (r.clean_predictions != r.labels)).all()
    assert any("refuted" in note for note in r.notes)
    e = _Escaper(steps=5)(model, x, y, 0.1)
    assert e.perturbation_norms.max() <= 0.1 and e.x_adv.min() >= 0 and e.x_adv.max() <= 1
    assert (model.predict(e.x_adv).argmax(1) == e.adv_predictions).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), name=st.sampled_from(["fgsm", "pgd", "apgd"]),
       norm=st.sampled_from(["linf", "l2"]), eps=st.floats(0.0, 2.0), domain=st.sampled_from([(0.0, 1.0), None]),
       dtype=st.sampled_from([numpy.float32, numpy.float64]))
@example(seed=0, name="fgsm", norm="l2", eps=0.015625, domain=(0.0, 1.0), dtype=numpy.float32)  # was 1e-8 outside
def test_attacks_stay_in_the_ball_and_the_domain(seed, name, norm, eps, domain, dtype):
    rng = numpy.random.default_rng(seed)
    model = NetworkModel(random_mlp(rng, sizes=(6, 8, 3), input_shape=(2, 3)))
    x = rng.uniform(size=(9, 2, 3)).astype(dtype)
    y = rng.integers(0, 3, size=9)
    options = {} if name == "fgsm" else {"steps": 3}
    r = get_attack(name, norm=norm, domain=domain, seed=seed, **options)(model, x, y, eps)
    d = (r.x_adv.astype(numpy.float64) - x).reshape(9, -1)
    size = numpy.abs(d).max(axis=1) if norm == "linf" else numpy.sqrt((d * d).sum(axis=1))
    assert (size <= eps).all(), size.max() - eps
    numpy.testing.assert_array_equal(size, r.perturbation_norms)
    if domain is not None:
        assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    assert r.x_adv.dtype == x.dtype
    numpy.testing.assert_array_equal(model.predict(r.x_adv).argmax(1), r.adv_predictions)


def test_apgd_checkpoints_follow_the_paper():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]  # the reference code's integers
    assert checkpoints(1) == [1]


def test_seeded_attacks_are_reproducible():
    rng = numpy.random.default_rng(5)
    model = NetworkModel(random_cnn(rng))
    x = rng.uniform(size=(20, 1, 8, 8)).astype(numpy.float32)
    y = model.predict(x).argmax(1)
    a, b = (APGD(steps=5, seed=4)(model, x, y, 0.05) for _ in range(2))
    numpy.testing.assert_array_equal(a.x_adv, b.x_adv)
    c = APGD(steps=5, seed=5)(model, x, y, 0.05)
    assert not numpy.array_equal(a.x_adv, c.x_adv)


class _Probabilities:
    """An adapter whose model ends in a softmax (gradients still of the loss on the logits)."""

    outputs_probabilities = True

    def __init__(self, inner):
        self.inner, self.input_shape, self.num_classes = inner, inner.input_shape, inner.num_classes

    def predict(self, x):
        z = self.inner.predict(x)
        e = numpy.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def input_gradient(self, x, y, loss="ce"):
        return self.inner.input_gradient(x, y, loss)


def test_probability_outputs_attack_like_logits():
    rng = numpy.random.default_rng(6)
    net = random_cnn(rng)
    soft = Network(net.nodes + [Node("sm", "softmax", (net.output_name,), attrs={"axis": 1})], net.input_shape)
    x = rng.uniform(size=(30, 1, 8, 8))
    y = NetworkModel(net).predict(x).argmax(1)
    plain = PGD(steps=10, loss="margin")(NetworkModel(net), x, y, 0.05)
    strong = APGD(steps=10)(NetworkModel(net), x, y, 0.05).robust_accuracy
    for model in (NetworkModel(soft), _Probabilities(NetworkModel(net))):
        other = PGD(steps=10, loss="margin")(model, x, y, 0.05)
        numpy.testing.assert_allclose(other.x_adv, plain.x_adv, atol=1e-12)
        assert APGD(steps=10)(model, x, y, 0.05).robust_accuracy == strong


# ---------------------------------------------------------------------------- masking checks and the API
class _Masked:
    """A model whose gradients are all zero (as behind a quantiser or a saturated softmax)."""

    def __init__(self, inner):
        self.inner = inner
        self.input_shape, self.num_classes = inner.input_shape, inner.num_classes
        self.outputs_probabilities = False

    def predict(self, x):
        return self.inner.predict(x)

    def input_gradient(self, x, y, loss="ce"):
        return numpy.zeros_like(x)

    def to_network(self):
        raise NotImplementedError


def test_masked_gradients_warn(digits_mlp):
    net, x, y = digits_mlp
    model = _Masked(torch_model(net, (1, 8, 8)))
    with pytest.warns(GradientMaskingWarning):
        report = attack(model, (x[:100], y[:100]), attack="pgd", eps=[0.1, 0.3], steps=5)
    text = " ".join(report.warnings)
    assert "zero or NaN" in text and "whole domain" in text and "random noise" in text
    assert report.results[1].warnings


def test_attack_api_runs_several_eps(digits_mlp):
    net, x, y = digits_mlp
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientMaskingWarning)  # a healthy model raises none
        model = net if _has_torch_adapter() else torch_model(net, (1, 8, 8))
        report = attack(model, (x[:100], y[:100]), attack="apgd", eps=[0.0, 0.05, 0.1], steps=10, seed=1,
                        input_shape=(1, 8, 8))
    acc = report.robust_accuracy
    assert acc[0] == report.clean_accuracy and acc[0] >= acc[1] >= acc[2]
    out = json.loads(json.dumps(report.to_dict(samples=True)))
    assert [r["eps"] for r in out["results"]] == [0.0, 0.05, 0.1]
    assert out["results"][2]["params"]["steps"] == 10


def _has_torch_adapter() -> bool:
    try:
        import robeval.adapters.torch  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------- bad input
def test_bad_parameters_raise_project_errors():
    rng = numpy.random.default_rng(0)
    model = NetworkModel(random_mlp(rng, sizes=(6, 4, 3), input_shape=(1, 6)))
    x, y = rng.uniform(size=(4, 1, 6)), numpy.array([0, 1, 2, 0])
    with pytest.raises(InvalidParameterError, match="eps"):
        PGD()(model, x, y, -0.1)
    with pytest.raises(InvalidParameterError, match="eps"):
        attack(model, (x, y), eps=[0.1, float("nan")])
    with pytest.raises(InvalidParameterError, match="norm"):
        PGD(norm="l3")
    with pytest.raises(InvalidParameterError, match="norm"):
        FGSM(norm="l1")
    with pytest.raises(InvalidParameterError, match="steps"):
        APGD(steps=0)
    with pytest.raises(InvalidParameterError, match="loss"):
        PGD(loss="hinge")
    with pytest.raises(InvalidParameterError, match="attack"):
        attack(model, (x, y), attack="deepfool")
    with pytest.raises(InvalidParameterError, match="FGSM takes no"):
        attack(model, (x, y), attack="fgsm", steps=10)
    bad = x.copy()
    bad[1, 0, 2] = numpy.nan
    with pytest.raises(DataRangeError, match="NaN"):
        PGD()(model, bad, y, 0.1)
    with pytest.raises(DataRangeError, match="outside"):
        PGD()(model, x + 2, y, 0.1)
    with pytest.raises(InputShapeError):
        PGD()(model, x[:, 0], y, 0.1)
    with pytest.raises(InvalidParameterError, match="target"):
        PGD()(model, x, y, 0.1, targets=y)
