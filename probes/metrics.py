"""Probe metrics: AUROC (pooled and within-problem), AUPRC (average precision), ECE (10 equal-width bins), Brier,
accuracy, bootstrap CIs.

ECE = sum_b |B_b|/N * |mean(y in B_b) - mean(p in B_b)| with ``p = 1`` in the last bin (probes.md §2.1).
Within-problem AUROC = mean AUROC over the problems that have both classes (probes.md §5.1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def auroc(p: torch.Tensor, y: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN unless both classes occur."""
    y = y.bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = torch.argsort(p.double())
    ps = p.double()[order]
    ranks = torch.empty_like(ps)
    ranks[order] = torch.arange(1, len(ps) + 1, dtype=torch.float64)
    uniq, inverse, counts = torch.unique(ps, return_inverse=True, return_counts=True)
    if len(uniq) < len(ps):  # average the ranks of ties
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks[order])
        ranks[order] = (sums / counts)[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(p: torch.Tensor, y: torch.Tensor) -> float:
    """Average precision, Σ_k (R_k − R_{k−1})·P_k over the distinct scores from the highest (tied scores form one
    threshold); NaN without a positive."""
    y = y.bool()
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    uniq, inverse = torch.unique(-p.double(), return_inverse=True)  # ascending in -p: highest score first
    tp = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, y.double()).cumsum(0)
    seen = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(p, dtype=torch.float64))
    precision = tp / seen.cumsum(0)
    recall_step = torch.diff(tp, prepend=tp.new_zeros(1)) / n_pos
    return float((recall_step * precision).sum())


def auroc_within(p: torch.Tensor, y: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean AUROC over groups holding both classes; NaN when none does."""
    vals = [auroc(p[groups == g], y[groups == g]) for g in torch.unique(groups)]
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def ece(p: torch.Tensor, y: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error over ``bins`` equal-width bins."""
    p, y = p.double(), y.double()
    idx = torch.clamp((p * bins).long(), max=bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += float(m.sum()) / len(p) * abs(float(y[m].mean() - p[m].mean()))
    return total


def brier(p: torch.Tensor, y: torch.Tensor) -> float:
    return float(((p.double() - y.double()) ** 2).mean())


def accuracy(p: torch.Tensor, y: torch.Tensor, threshold: float = 0.5) -> float:
    return float(((p >= threshold) == y.bool()).double().mean())


def report(p: torch.Tensor, y: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    """Every metric of one probe on one labelled set."""
    return {
        "auroc": auroc(p, y),
        "auroc_within_problem": auroc_within(p, y, groups),
        "auprc": auprc(p, y),
        "ece": ece(p, y),
        "brier": brier(p, y),
        "accuracy": accuracy(p, y),
        "n": float(len(y)),
    }


def platt(z: torch.Tensor, y: torch.Tensor, steps: int = 100) -> tuple[float, float]:
    """Platt scaling (Platt 1999): ``(a, b)`` minimising the mean BCE of ``sigmoid(a·z + b)`` against ``y`` for
    logits ``z``, by Newton's method with step halving (float64; a 1e-6 ridge keeps separable data finite).
    ``(1, 0)``, the identity, when ``y`` lacks a class or the fit's slope is not positive (a probe that ranks the
    validation rows backwards is not flipped). Recalibrates a probe trained with class weights (probes.md §5.4):
    the ranking, hence AUROC, is kept."""
    z, y = z.double(), y.double()
    if len(y) == 0 or bool(y.min() == y.max()):
        return 1.0, 0.0
    x = torch.stack([z, torch.ones_like(z)], 1)
    ridge = 1e-6

    def loss(w: torch.Tensor) -> float:
        return float(torch.nn.functional.softplus(x @ w).sub(y * (x @ w)).mean() + ridge / 2 * (w @ w))

    w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    current = loss(w)
    for _ in range(steps):
        q = torch.sigmoid(x @ w)
        grad = x.T @ (q - y) / len(y) + ridge * w
        hess = (x.T * (q * (1 - q))) @ x / len(y) + ridge * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-8 and loss(w - t * step) > current:
            t /= 2
        if t <= 1e-8:
            break
        w = w - t * step
        new = loss(w)
        if current - new < 1e-12:
            break
        current = new
    return (float(w[0]), float(w[1])) if float(w[0]) > 0 else (1.0, 0.0)


def bootstrap_auroc(
    p: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, n: int = 200, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile CI of the pooled AUROC, resampling problems (not rows) with replacement."""
    uniq = torch.unique(groups)
    members: Sequence[torch.Tensor] = [torch.nonzero(groups == g).flatten() for g in uniq]
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(n):
        pick = torch.randint(len(uniq), (len(uniq),), generator=gen)
        idx = torch.cat([members[int(i)] for i in pick])
        v = auroc(p[idx], y[idx])
        if not math.isnan(v):
            vals.append(v)
    if not vals:
        return math.nan, math.nan
    t = torch.tensor(vals, dtype=torch.float64)
    a = (1 - level) / 2
    return float(t.quantile(a)), float(t.quantile(1 - a))
