"""The full-batch logistic fitter (probes.newton): the regularised optimum, all layers at once = each alone."""

from __future__ import annotations

import pytest
import torch

from probes import metrics
from probes.newton import fit_logistic
from probes.train import ProbeConfig

from conftest import required


def _problem(n: int = 3000, d: int = 24, layers: int = 3, seed: int = 0):
    """Correlated, anisotropic, shifted features per layer; labels from a linear rule plus logistic noise."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for _ in range(layers):
        mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
        x = (torch.randn(n, d, generator=g) @ mix) * torch.exp(torch.randn(d, generator=g)) + 3.0
        xs.append(x)
    x = torch.stack(xs)  # [L, n, d]
    w = torch.randn(d, generator=g)
    score = (x[1] - x[1].mean(0)) / x[1].std(0) @ w
    y = (2 * score / score.std() + torch.logit(torch.rand(n, generator=g)) > 0.8).float()  # imbalanced
    control = y[torch.randperm(n, generator=g)]
    return x, torch.stack([y, control])


def _batches(x: torch.Tensor, size: int):
    return [(torch.arange(s, min(s + size, x.shape[1])), x[:, s : s + size]) for s in range(0, x.shape[1], size)]


def _fit(x, ys, train, val, pos_weight, l2, size=700, tol=1e-5, passes=300):
    return fit_logistic(_batches(x, size), ys, train, val, x.shape[0], x.shape[2], pos_weight, l2, passes, 5, tol)


def _reference(xs: torch.Tensor, y: torch.Tensor, c: torch.Tensor, l2: float) -> torch.Tensor:
    """The optimum of sum c BCE / sum c + l2/2 |w|^2 by float64 Newton (closed-form gradient and Hessian)."""
    xs, y, c = xs.double(), y.double(), c.double() / c.sum()
    a = torch.cat([xs, torch.ones(len(xs), 1, dtype=torch.float64)], 1)
    theta = torch.zeros(a.shape[1], dtype=torch.float64)
    reg = torch.full((a.shape[1],), l2, dtype=torch.float64)
    reg[-1] = 0
    for _ in range(50):
        p = torch.sigmoid(a @ theta)
        grad = a.T @ (c * (p - y)) + reg * theta
        hess = (a * (c * p * (1 - p))[:, None]).T @ a + torch.diag(reg)
        theta = theta - torch.linalg.solve(hess, grad)
        if grad.abs().max() < 1e-12:
            break
    return theta.float()


def _standardised(x: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    xt = x[:, train]
    return (x - xt.mean(1, keepdim=True)) / (xt.std(1, unbiased=False, keepdim=True) + 1e-6)


@pytest.mark.parametrize("class_weight", [False, True])
def test_fit_reaches_the_regularised_optimum(class_weight):
    x, ys = _problem()
    n = x.shape[1]
    train = torch.arange(n) < 2400
    val = ~train
    pos = ys[:, train].sum(1)
    pw = (train.sum() - pos) / pos if class_weight else torch.ones(2)
    l2 = 1e-3
    res = _fit(x, ys, train, torch.zeros(n, dtype=torch.bool), pw, l2)
    assert res.passes < 60
    xs = _standardised(x, train)
    for v in range(2):
        c = torch.where(ys[v] > 0.5, pw[v], 1.0)[train]
        for layer in range(x.shape[0]):
            ref = _reference(xs[layer, train], ys[v, train], c, l2)
            assert torch.allclose(res.w[v, layer], ref[:-1], atol=2e-3), (v, layer)
            assert res.b[v, layer].item() == pytest.approx(ref[-1].item(), abs=2e-3)
    # the informative layer predicts the held-out rows
    score = xs[1, val] @ res.w[0, 1] + res.b[0, 1]
    assert metrics.auroc(score, ys[0, val]) > 0.8


def test_fit_matches_sklearn():
    if required():  # scripts/setup.sh installs the bench extra: CI runs this comparison
        import sklearn.linear_model as sklearn
    else:
        sklearn = pytest.importorskip("sklearn.linear_model")
    x, ys = _problem(layers=2)
    n = x.shape[1]
    train = torch.arange(n) < 2400
    test = ~train
    res = _fit(x, ys[:1], train, torch.zeros(n, dtype=torch.bool), torch.ones(1), l2=1.0 / 2400)
    xs = _standardised(x, train)
    for layer in range(2):
        sk = sklearn.LogisticRegression(C=1.0, tol=1e-8, max_iter=10_000)
        sk.fit(xs[layer, train].double().numpy(), ys[0, train].numpy())
        coef = torch.from_numpy(sk.coef_[0]).float()
        assert torch.allclose(res.w[0, layer], coef, atol=2e-3)
        assert res.b[0, layer].item() == pytest.approx(float(sk.intercept_[0]), abs=2e-3)
        ours = metrics.auroc(xs[layer, test] @ res.w[0, layer], ys[0, test])
        theirs = metrics.auroc(torch.from_numpy(sk.decision_function(xs[layer, test].double().numpy())), ys[0, test])
        assert ours == pytest.approx(theirs, abs=1e-3)


def test_all_layers_at_once_equal_each_layer_alone():
    x, ys = _problem()
    n = x.shape[1]
    train, val = torch.arange(n) < 2000, (torch.arange(n) >= 2000) & (torch.arange(n) < 2500)
    pw = torch.tensor([2.0, 2.0])
    together = _fit(x, ys, train, val, pw, 1e-3, tol=1e-5)
    for layer in range(x.shape[0]):
        alone = _fit(x[layer : layer + 1], ys, train, val, pw, 1e-3, tol=1e-5)
        assert torch.allclose(together.w[:, layer], alone.w[:, 0], atol=1e-5)
        assert torch.allclose(together.b[:, layer], alone.b[:, 0], atol=1e-5)
        assert torch.allclose(together.mean[layer], alone.mean[0]) and torch.allclose(together.std[layer], alone.std[0])


def test_each_variant_alone_equals_all_variants_together():
    """A variant whose probes finish first drops out of the later passes without changing the others."""
    x, ys = _problem(layers=2)
    n = x.shape[1]
    train = torch.arange(n) < 2400
    val = torch.zeros(n, dtype=torch.bool)
    together = _fit(x, ys, train, val, torch.ones(2), 1e-2, tol=1e-5)
    passes = []
    for v in range(2):
        alone = _fit(x, ys[v : v + 1], train, val, torch.ones(1), 1e-2, tol=1e-5)
        assert torch.allclose(together.w[v], alone.w[0], atol=1e-5) and torch.allclose(together.b[v], alone.b[0])
        passes.append(alone.passes)
    assert passes[0] != passes[1] and together.passes == max(passes)  # one variant did drop out first


def test_fit_does_not_depend_on_the_read_batches():
    x, ys = _problem(layers=2)
    n = x.shape[1]
    train = torch.arange(n) < 2400
    val = torch.zeros(n, dtype=torch.bool)
    a = _fit(x, ys, train, val, torch.ones(2), 1e-3, size=3000)
    b = _fit(x, ys, train, val, torch.ones(2), 1e-3, size=257)
    assert torch.allclose(a.w, b.w, atol=1e-3) and torch.allclose(a.b, b.b, atol=1e-3)


def test_solver_config():
    assert ProbeConfig().full_batch and not ProbeConfig(kind="mlp").full_batch
    assert not ProbeConfig(solver="adam").full_batch
    with pytest.raises(ValueError, match="logistic probes only"):
        ProbeConfig(kind="mlp", solver="lbfgs")
    with pytest.raises(ValueError, match="solver"):
        ProbeConfig(solver="sgd")


def test_a_bad_rate_names_that_setting_alone():
    with pytest.raises(ValueError, match=r"^lr must be > 0, got -1"):
        ProbeConfig(lr=-1)
    with pytest.raises(ValueError, match=r"^bootstrap must be >= 0, got -2"):
        ProbeConfig(bootstrap=-2)
