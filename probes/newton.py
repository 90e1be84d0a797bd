"""Full-batch logistic probes: a Gaussian sufficient-statistics start, then preconditioned L-BFGS to the optimum.

Every (label variant, layer) probe minimises, in standardised coordinates ``x~ = (x - mean) / std``::

    f(w, b) = sum_i c_i BCE(x~_i . w + b, y_i) / sum_i c_i + l2 / 2 |w|^2

over the training rows (``c_i = pos_weight`` for positives with class weighting, else 1; the intercept is not
penalised) -- scikit-learn's ``LogisticRegression`` objective with ``C = 1 / (l2 * n)``.

Pass 1 reads every training row once for the standardisation statistics, the per-class sums and a sample of rows
whose covariance (Ledoit-Wolf shrunk) is the preconditioner. The start is the linear-discriminant solution
(``w = Sigma_within^-1 (mu_1 - mu_0)``), the logistic optimum when the classes are Gaussian with a shared
covariance. Each further pass evaluates the loss, gradient and validation loss of all ``V x L`` probes at once (per
read batch and layer, a GEMM for the logits of every probe and one for their gradients, block by block of rows
on CPU so that the gradient reads rows the logits left in cache) and takes one L-BFGS step
(Armijo backtracking, initial inverse Hessian ``gamma * Sigma^-1``) for every probe not yet done. A probe is done
when ``max |grad| <= tol`` (scikit-learn's ``gtol``), when its validation loss has not improved by ``1e-5`` for
``patience`` steps, when the objective stops decreasing (float32 noise) or when its line search stalls; it keeps
the point of lowest validation loss (the last point when there is no validation split). A variant whose probes are
all done drops out of the passes (e.g. the shuffled-label control, often done at the start).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .data import Batches

HISTORY = 10
ROW_BLOCK = 256  # rows of one logits + gradient step on CPU (see _logits_and_gradient)


@dataclass
class Fit:
    """Result: standardisation (``mean``, ``std`` ``[L, d]``), weights ``w`` ``[V, L, d]`` and ``b`` ``[V, L]``."""

    mean: torch.Tensor
    std: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    passes: int
    converged: torch.Tensor


def _shifted_sums(x: torch.Tensor, shift: torch.Tensor, lhs: torch.Tensor) -> torch.Tensor:
    """``lhs @ [x - shift, (x - shift)^2]`` ``[k, 2d]`` for rows ``x`` ``[n, d]``: weighted sums of the shifted rows
    and of their squares, block by block of :data:`ROW_BLOCK` rows whose shifted copy stays in cache (one read of
    ``x`` from memory; whole-batch temporaries took 1.6x as long) on CPU, in one block on a GPU; accumulated in
    float32 within the batch."""
    n, d = x.shape
    block = ROW_BLOCK if x.device.type == "cpu" else n
    buf = torch.empty(min(block, n), 2 * d, device=x.device)
    acc = torch.zeros(lhs.shape[0], 2 * d, device=x.device)
    for s in range(0, n, block):
        b = min(block, n - s)
        t = buf[:b, :d]
        torch.sub(x[s : s + b], shift, out=t)
        torch.mul(t, t, out=buf[:b, d:])
        acc.addmm_(lhs[:, s : s + b], buf[:b])
    return acc


class _Problem:
    """Data shared by the passes: labels, class weights and masks over the labelled rows."""

    def __init__(self, ys: torch.Tensor, train: torch.Tensor, val: torch.Tensor, pos_weight: torch.Tensor):
        self.ys = ys.float()  # [V, M]
        self.train, self.val = train, val
        cw = torch.where(self.ys > 0.5, pos_weight[:, None].float(), torch.ones_like(self.ys))
        self.cw = cw * train[None].float()  # [V, M] training weight, 0 off the training rows
        self.csum = self.cw.sum(1).double()  # [V]

    def select(self, keep: torch.Tensor) -> _Problem:
        """The same rows for the variants ``keep`` ``[V]`` (bool) only."""
        sub, keep = copy.copy(self), keep.to(self.ys.device)  # the solver's flags may live on the GPU
        sub.ys, sub.cw, sub.csum = self.ys[keep], self.cw[keep], self.csum[keep]
        return sub


def _stats(stream: Batches, prob: _Problem, n_layers: int, width: int, sample: int, device: torch.device):
    """One pass: mean, std, per-class raw sums of the training rows, and the first ``sample`` training rows.

    Sums are GEMMs with a ones/label matrix (reductions over rows take slow paths on CPU), squares of rows shifted
    by the first batch's mean (no cancellation), per batch in float32 and across batches in float64.
    """
    v = prob.ys.shape[0]
    n = 0
    shift: torch.Tensor | None = None
    s0 = torch.zeros(n_layers, width, dtype=torch.float64, device=device)
    sq = torch.zeros_like(s0)
    s1 = torch.zeros(n_layers, v, width, dtype=torch.float64, device=device)
    rows: list[torch.Tensor] = []
    have = 0
    for idx, x in stream:
        keep = prob.train[idx]
        k = int(keep.sum())
        if k == 0:
            continue
        x = x.to(device)
        kept = keep.nonzero()[:, 0].to(device)
        mask = keep.to(device).float()
        # weights instead of a gather: rows off the training split count 0 (a gather would copy the batch)
        lhs_all = torch.cat([mask[None], prob.ys[:, idx].to(device) * mask])  # [1+V, n]
        if shift is None:
            shift = x[:, kept[:1024]].mean(1, keepdim=True)  # [L, 1, d]
        for i in range(n_layers):
            sums = _shifted_sums(x[i], shift[i], lhs_all)  # [1+V, 2d]
            s0[i] += sums[0, :width].double()
            s1[i] += sums[1:, :width].double()
            sq[i] += sums[0, width:].double()
        n += k
        if have < sample:
            take = x[:, kept[: sample - have]]  # a gather: a copy
            rows.append(take)
            have += take.shape[1]
    assert shift is not None, "no training rows"
    sh = shift[:, 0].double()
    mean = sh + s0 / n
    var = (sq / n - (s0 / n) ** 2).clamp_min(0)
    ny = prob.ys[:, prob.train].sum(1).double().to(device)  # [V]
    s1 = s1 + ny[None, :, None] * sh[:, None]  # raw per-class sums
    std = var.sqrt() + 1e-6
    sample_rows = rows[0] if len(rows) == 1 else torch.cat(rows, 1)  # one piece: no second copy (up to 1 GiB)
    return mean, std, s1, sample_rows, n


def _ledoit_wolf(xs: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrunk covariance ``[L, d, d]`` of standardised rows ``xs`` ``[L, m, d]`` (scikit-learn's)."""
    m, d = xs.shape[1], xs.shape[2]
    emp = torch.bmm(xs.transpose(1, 2), xs) / m
    x2 = xs * xs
    tr = x2.sum(1) / m  # [L, d]
    mu = tr.sum(1) / d  # [L]
    sq = x2.sum(2)  # [L, m] = |x_i|^2
    beta_ = (sq * sq).sum(1)  # sum_i |x_i|^4
    delta_ = (emp * emp).sum((1, 2))
    beta = (beta_ / m - delta_) / (d * m)
    delta = (delta_ - 2 * mu * tr.sum(1) + d * mu * mu) / d
    rho = torch.where(delta > 0, torch.minimum(beta, delta) / delta.clamp_min(1e-30), torch.ones_like(delta))
    rho = rho.clamp(0, 1)
    eye = torch.eye(d, dtype=xs.dtype, device=xs.device)
    return (1 - rho)[:, None, None] * emp + (rho * mu)[:, None, None] * eye


def _logits_and_gradient(
    x: torch.Tensor, wt: torch.Tensor, bt: torch.Tensor, y: torch.Tensor, cw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[L, V, n]`` of rows ``x`` ``[L, n, d]`` and the weighted BCE gradient sum ``[L, V, d]``.

    On CPU in blocks of :data:`ROW_BLOCK` rows, each read by the gradient GEMM while the logits GEMM has just left
    it in cache: a ``[V, n] @ [n, d]`` GEMM with few rows streams ``x`` from memory once per row of its left side
    (bench/probes.py); on a GPU in one block.
    """
    n_layers, n = x.shape[0], x.shape[1]
    block = ROW_BLOCK if x.device.type == "cpu" else n
    z = torch.empty(n_layers, wt.shape[1], n, device=x.device)
    g = torch.zeros(n_layers, wt.shape[1], x.shape[2], device=x.device)
    for i in range(n_layers):
        zs = []
        for s in range(0, n, block):
            xb = x[i, s : s + block]
            zb = torch.addmm(bt[i], wt[i], xb.T)  # [V, b]
            zs.append(zb)
            g[i].addmm_(torch.sigmoid(zb).sub_(y[:, s : s + block]).mul_(cw[:, s : s + block]), xb)
        z[i] = torch.cat(zs, -1)
    return z, g


def _evaluate(
    stream: Batches,
    prob: _Problem,
    theta: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    l2: float,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass: objective ``[V, L]``, gradient ``[V, L, d+1]``, mean curvature ``[V, L]``, validation loss."""
    v, n_layers, d1 = theta.shape
    w = theta[..., :-1] / std.float()  # raw-space weights [V, L, d]
    b = theta[..., -1] - (w.double() * mean).sum(-1).float()
    wt = w.transpose(0, 1).contiguous()  # [L, V, d]
    bt = b.T[..., None].contiguous()  # [L, V, 1]
    f = torch.zeros(n_layers, v, dtype=torch.float64, device=device)
    h = torch.zeros_like(f)
    rs = torch.zeros_like(f)
    vl = torch.zeros_like(f)
    g = torch.zeros(n_layers, v, d1 - 1, dtype=torch.float64, device=device)
    nv = 0
    for idx, x in stream:
        # whole read batches at a time: few large ops (each parallel op costs a wake-up of every thread)
        cw = prob.cw[:, idx]
        vm = prob.val[idx].float()
        nvc = int(vm.sum())
        if nvc == 0 and not bool((cw > 0).any()):
            continue
        x = x.to(device)
        y = prob.ys[:, idx].to(device)  # [V, n]
        cw, vm = cw.to(device), vm.to(device)
        z, gb = _logits_and_gradient(x, wt, bt, y, cw)
        g += gb.double()
        loss = F.binary_cross_entropy_with_logits(z, y.expand_as(z), reduction="none")
        p = torch.sigmoid(z)
        f += torch.einsum("lvn,vn->lv", loss.double(), cw.double())  # float64: the line search compares these
        h += torch.einsum("lvn,vn->lv", p * (1 - p), cw).double()
        if nvc:
            vl += torch.einsum("lvn,n->lv", loss, vm).double()
            nv += nvc
        rs += ((p - y) * cw).sum(-1).double()
    csum = prob.csum.to(device)[None]  # [1, V]
    gw = (g - mean[:, None] * rs[..., None]) / std[:, None].double() / csum[..., None]
    wst = theta[..., :-1].double().transpose(0, 1)  # [L, V, d]
    gw = gw + l2 * wst
    obj = f / csum + 0.5 * l2 * (wst * wst).sum(-1)
    grad = torch.cat([gw, (rs / csum)[..., None]], -1).transpose(0, 1).float()
    vloss = vl / max(nv, 1) if nv else torch.zeros_like(vl)
    return obj.T, grad, (h / csum).T.float(), vloss.T.float()


def fit_logistic(
    stream: Batches,
    ys: torch.Tensor,
    train: torch.Tensor,
    val: torch.Tensor,
    n_layers: int,
    width: int,
    pos_weight: torch.Tensor,
    l2: float,
    max_passes: int,
    patience: int,
    tol: float = 1e-4,
    sample: int = 8192,
    device: torch.device | None = None,
) -> Fit:
    """Fit ``V x L`` logistic probes (``ys`` ``[V, M]`` labels of the rows ``stream`` yields) on the ``train`` rows."""
    device = device or torch.device("cpu")
    prob = _Problem(ys, train, val, pos_weight)
    v = prob.ys.shape[0]
    # preconditioner rows: an eighth of the training rows within [4096, sample], and at most 1 GiB of them
    m_cap = min(max(4096, int(train.sum()) // 8), sample, max(256, (1 << 30) // max(1, n_layers * width * 4)))
    mean, std, s1, xs, n = _stats(stream, prob, n_layers, width, m_cap, device)
    passes = 1
    # preconditioner: Ledoit-Wolf covariance of the standardised sample (+ ridge), Cholesky per layer
    xs = xs.sub_(mean.float()[:, None]).div_(std.float()[:, None])  # standardised, in place (a gathered copy)
    sigma = _ledoit_wolf(xs).double()
    del xs
    ridge = max(4 * l2, 1e-6)
    eye = torch.eye(width, dtype=torch.float64, device=device)
    chol = torch.linalg.cholesky(sigma + ridge * eye)  # [L, d, d]
    # linear-discriminant start, per variant: total covariance + Sherman-Morrison -> within-class solution
    ytr = prob.ys[:, train]
    n1 = ytr.sum(1).double().to(device)  # [V]
    n0 = n - n1
    tot = mean * n  # raw sums [L, d]
    mu1 = (s1 / n1.clamp_min(1)[None, :, None] - mean[:, None]) / std[:, None]  # [L, V, d]
    mu0 = ((tot[:, None] - s1) / n0.clamp_min(1)[None, :, None] - mean[:, None]) / std[:, None]
    delta = mu1 - mu0
    u = torch.cholesky_solve(delta.transpose(1, 2), chol).transpose(1, 2)  # [L, V, d]
    pi1 = (n1 / max(n, 1))[None]
    denom = (1 - pi1 * (1 - pi1) * (delta * u).sum(-1)).clamp_min(0.1)
    w0 = u / denom[..., None]
    c1 = pos_weight.double().to(device) * n1
    prior = torch.log(c1.clamp_min(1e-12) / n0.clamp_min(1e-12))[None]  # weighted log prior odds [1, V]
    b0 = prior - 0.5 * ((mu1 + mu0) * w0).sum(-1)
    theta = torch.cat([w0, b0[..., None]], -1).transpose(0, 1).float().contiguous()  # [V, L, d+1]

    # the start must beat the constant (w = 0) probe; f and grad at w = 0 are closed-form from the class sums
    f, g, h, vloss = _evaluate(stream, prob, theta, mean, std, l2, device)
    passes += 1
    cw_pos = pos_weight.double().to(device)
    csum = prob.csum.to(device)
    p0 = torch.sigmoid(prior[0])  # [V]
    f_zero = -(cw_pos * n1 * torch.log(p0) + n0 * torch.log(1 - p0)) / csum  # [V]
    g_zero_w = (cw_pos * (p0 - 1) * n1)[None, :, None] * mu1 + (p0 * n0)[None, :, None] * mu0
    g_zero = torch.cat(
        [g_zero_w / csum[None, :, None], torch.zeros(n_layers, v, 1, device=device, dtype=torch.float64)], -1
    )
    worse = (f > f_zero[:, None]) | ~torch.isfinite(f)
    if bool(worse.any()):
        theta_zero = torch.zeros_like(theta)
        theta_zero[..., -1] = prior.float().T.expand(v, n_layers)
        theta = torch.where(worse[..., None], theta_zero, theta)
        f = torch.where(worse, f_zero[:, None].double().expand_as(f), f)
        g = torch.where(worse[..., None], g_zero.transpose(0, 1).float(), g)
        h = torch.where(worse, torch.full_like(h, 0.25), h)
        vloss = torch.where(worse, torch.full_like(vloss, math.inf), vloss)

    shape = (v, n_layers)
    has_val = bool(val.any())
    done = torch.zeros(shape, dtype=torch.bool, device=device)
    best_v = vloss.clone()
    best_sig = vloss.clone()
    best_theta = theta.clone()
    stale = torch.zeros(shape, dtype=torch.long, device=device)
    s_hist = torch.zeros(HISTORY, v, n_layers, width + 1, device=device)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros(HISTORY, v, n_layers, device=device)
    n_hist = torch.zeros(shape, dtype=torch.long, device=device)
    gamma = 1.0 / h.clamp_min(1e-4)

    def h0(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``scale * P^-1 q`` with ``P = blockdiag(Sigma + ridge, 1)``, for ``q`` ``[V, L, d+1]``."""
        qw = q[..., :-1].double().permute(1, 2, 0)  # [L, d, V]
        rw = torch.cholesky_solve(qw, chol).permute(2, 0, 1).float()
        return torch.cat([rw, q[..., -1:]], -1) * scale[..., None]

    def direction(g: torch.Tensor) -> torch.Tensor:
        q = g.clone()
        k = HISTORY
        alphas = torch.zeros(k, *shape, device=device)
        for j in range(k - 1, -1, -1):  # newest first; empty slots have rho = 0
            alphas[j] = rho[j] * (s_hist[j] * q).sum(-1)
            q = q - alphas[j][..., None] * y_hist[j]
        r = h0(q, gamma)
        for j in range(k):
            beta = rho[j] * (y_hist[j] * r).sum(-1)
            r = r + (alphas[j] - beta)[..., None] * s_hist[j]
        r = -r
        bad = (g * r).sum(-1) >= 0  # not a descent direction: fall back to the preconditioned gradient
        return torch.where(bad[..., None], -h0(g, 1.0 / h.clamp_min(1e-4)), r)

    def check(g: torch.Tensor) -> torch.Tensor:
        return g.abs().amax(-1) <= tol

    done |= check(g)
    p = direction(g)
    alpha = torch.ones(shape, device=device)
    while passes < max_passes and not bool(done.all()):
        trial = theta + alpha[..., None] * p
        live = ~done.all(1)  # variants with a layer still open; the others are not evaluated again
        ft, gt, ht, vt = f.clone(), g.clone(), h.clone(), best_v.clone()
        evaluated = _evaluate(stream, prob.select(live), trial[live], mean, std, l2, device)
        for full, part in zip((ft, gt, ht, vt), evaluated):
            full[live] = part
        passes += 1
        slope = (g * p).sum(-1)
        ok = torch.isfinite(ft) & (ft <= f + 1e-4 * alpha.double() * slope.double()) & ~done
        back = ~ok & ~done
        if bool(ok.any()):
            s = trial - theta
            yv = gt - g
            sy = (s * yv).sum(-1)
            push = ok & (sy > 1e-10)
            if bool(push.any()):
                s_hist = torch.where(push[None, ..., None], torch.cat([s_hist[1:], s[None]]), s_hist)
                y_hist = torch.where(push[None, ..., None], torch.cat([y_hist[1:], yv[None]]), y_hist)
                rho = torch.where(push[None], torch.cat([rho[1:], (1 / sy.clamp_min(1e-10))[None]]), rho)
                n_hist = n_hist + push.long()
                yhy = (yv * h0(yv, torch.ones(shape, device=device))).sum(-1)
                gamma = torch.where(push, sy / yhy.clamp_min(1e-12), gamma)
            flat = ok & (f - ft <= 1e-10 * ft.abs().clamp_min(1))  # float32 noise level: nothing left to gain
            theta = torch.where(ok[..., None], trial, theta)
            f, g, h = torch.where(ok, ft, f), torch.where(ok[..., None], gt, g), torch.where(ok, ht, h)
            improved = ok & (vt < best_v)
            best_v = torch.where(improved, vt, best_v)
            best_theta = torch.where(improved[..., None], theta, best_theta)
            sig = ok & (vt < best_sig - 1e-5)
            best_sig = torch.where(sig, vt, best_sig)
            stale = torch.where(sig, torch.zeros_like(stale), stale + ok.long())
            done |= ok & (check(gt) | flat | ((stale >= patience) & has_val))
        if bool(back.any()):
            alpha = torch.where(back, alpha * 0.5, alpha)
            done |= back & (alpha < 1e-4)  # the line search stalls (at float32 precision)
        if bool(ok.any()):
            p = torch.where(ok[..., None], direction(g), p)
            alpha = torch.where(ok, torch.ones_like(alpha), alpha)
    converged = check(g)
    final = best_theta if has_val else theta  # the point of lowest validation loss
    return Fit(mean.float(), std.float(), final[..., :-1].contiguous(), final[..., -1].contiguous(), passes, converged)
