"""The training loop shared by probes and baselines: standardisation, class-weighted BCE, early stopping.

Inputs come as :data:`probes.data.Batches`; two label variants (task and control) train side by side, one probe
per variant and layer (:class:`probes.batched.BatchedProbe`). Logistic probes are fitted full-batch
(:mod:`probes.newton`: a sufficient-statistics start, then preconditioned L-BFGS, a few passes over the data);
MLP probes (and logistic ones with ``solver="adam"``) by minibatch Adam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .batched import PROBE_KINDS, BatchedProbe, ProbeKind
from .data import TRAIN, VAL, Batches, Labelled
from .newton import fit_logistic

SOLVERS = ("auto", "lbfgs", "adam")
SELECT_ON = ("auroc", "auroc_within_problem")  # the validation metric that picks the best layer


@dataclass(frozen=True)
class ProbeConfig:
    """What to fit: ``target`` (a binary label of the table) on ``hooks`` (patterns over the store's hooks).

    ``solver``: ``lbfgs`` (full batch; logistic only; ``epochs`` caps its passes over the data, ``tol`` is its
    gradient tolerance, ``weight_decay`` its L2 strength on the mean loss), ``adam`` (minibatches of
    ``batch_size`` at ``lr``), ``auto`` (lbfgs for logistic probes, adam for MLPs). ``select_on``: the validation
    metric that picks the best layer, pooled AUROC or the mean AUROC within problems (for targets, such as
    confidence across samples of one problem, where the within-problem contrast is what counts).
    """

    target: str = "correct"
    hooks: str = "hook_resid_post"
    kind: ProbeKind = "logistic"
    hidden: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 50
    patience: int = 5
    batch_size: int = 1024
    class_weight: bool = True
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    bootstrap: int = 200
    seed: int = 0
    device: str = "auto"
    read_batch: int = 8192
    cache_bytes: int = 2 << 30
    solver: str = "auto"
    tol: float = 1e-4
    select_on: str = "auroc"

    def __post_init__(self) -> None:
        if self.kind not in PROBE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(PROBE_KINDS)}, got {self.kind!r}")
        for name in ("hidden", "epochs", "patience", "batch_size", "read_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("test_fraction", "val_fraction"):
            v = getattr(self, name)
            if not 0 < v < 1:
                raise ValueError(f"{name} must be in (0, 1), got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("weight_decay", "bootstrap", "cache_bytes"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.select_on not in SELECT_ON:
            raise ValueError(f"select_on must be one of {', '.join(SELECT_ON)}, got {self.select_on!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.solver == "lbfgs" and self.kind != "logistic":
            raise ValueError("the lbfgs solver fits logistic probes only; use solver='adam' for MLPs")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol!r}")
        if not self.target or not self.hooks:
            raise ValueError("target and hooks must be non-empty")

    @property
    def full_batch(self) -> bool:
        """Whether :func:`train` fits full-batch (:mod:`probes.newton`) rather than by Adam."""
        return self.kind == "logistic" and self.solver != "adam"

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def standardize(probe: BatchedProbe, stream: Batches, train: torch.Tensor, device: torch.device) -> None:
    """Set the probe's mean/std from the rows where ``train`` is True (float64 sums)."""
    n = 0
    s = torch.zeros(probe.mean.shape, dtype=torch.float64, device=device)
    ss = torch.zeros_like(s)
    for idx, x in stream:
        x = x[:, train[idx]].to(device, torch.float64)
        n += x.shape[1]
        s = s + x.sum(1)
        ss = ss + (x * x).sum(1)
    mean = s / n
    var = (ss / n - mean * mean).clamp_min(0)
    probe.mean.copy_(mean.float())
    probe.std.copy_((var.sqrt() + 1e-6).float())


def predict(
    probe: BatchedProbe,
    stream: Batches,
    m: int,
    device: torch.device,
    rows: torch.Tensor | None = None,
    logits: bool = False,
) -> torch.Tensor:
    """Probabilities ``[V, L, M]`` (``logits``: the probe's logits) for every labelled row (only where ``rows`` is
    True when given; 0 elsewhere)."""
    v, n = probe.b.shape
    out = torch.zeros(v, n, m)
    with torch.no_grad():
        for idx, x in stream:
            if rows is not None:
                keep = rows[idx]
                idx, x = idx[keep], x[:, keep]
            if len(idx):
                z = probe(x.to(device))
                out[:, :, idx] = (z if logits else torch.sigmoid(z)).cpu()
    return out


def fit(probe: BatchedProbe, stream: Batches, data: Labelled, cfg: ProbeConfig, device: torch.device) -> int:
    """Standardise and train ``probe`` (the full-batch solver standardises in its own first pass)."""
    if not cfg.full_batch:
        standardize(probe, stream, data.side == TRAIN, device)
    return train(probe, stream, data, cfg, device)


def _pos_weight(ys: torch.Tensor, train: torch.Tensor, cfg: ProbeConfig) -> torch.Tensor:
    pos = ys[:, train].sum(1)
    return ((train.sum() - pos) / pos.clamp_min(1)) if cfg.class_weight else torch.ones(len(ys))


def _train_full_batch(
    probe: BatchedProbe, stream: Batches, data: Labelled, cfg: ProbeConfig, device: torch.device
) -> int:
    ys = torch.stack([data.y, data.control])  # [V, M]
    train = data.side == TRAIN
    n_layers, width = probe.mean.shape
    res = fit_logistic(
        stream,
        ys,
        train,
        data.side == VAL,
        n_layers,
        width,
        _pos_weight(ys, train, cfg),
        l2=cfg.weight_decay,
        max_passes=cfg.epochs,
        patience=cfg.patience,
        tol=cfg.tol,
        device=device,
    )
    with torch.no_grad():
        probe.mean.copy_(res.mean)
        probe.std.copy_(res.std)
        probe.w.copy_(res.w)
        probe.b.copy_(res.b)
    return res.passes


def train(probe: BatchedProbe, stream: Batches, data: Labelled, cfg: ProbeConfig, device: torch.device) -> int:
    """Fit with per-probe early stopping on validation loss; returns the epochs (passes over the data) run.

    The full-batch solver (logistic probes) also sets the probe's standardisation; Adam uses the one set before.
    """
    if cfg.full_batch:
        return _train_full_batch(probe, stream, data, cfg, device)
    ys = torch.stack([data.y, data.control])  # [V, M]
    train = data.side == TRAIN
    pw = _pos_weight(ys, train, cfg).to(device)[:, None, None]
    opt = torch.optim.Adam(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    best = torch.full(probe.b.shape, math.inf)
    best_state = {k: v.detach().clone() for k, v in probe.named_parameters()}
    stale = torch.zeros(probe.b.shape, dtype=torch.long)
    val = data.side == VAL
    epochs = 0
    for _ in range(cfg.epochs):
        epochs += 1
        for idx, x in stream:
            keep = train[idx]
            if not bool(keep.any()):
                continue
            xi, yi = x[:, keep], ys[:, idx[keep]]
            order = torch.randperm(xi.shape[1], generator=gen)
            for s in range(0, len(order), cfg.batch_size):
                b = order[s : s + cfg.batch_size]
                logits = probe(xi[:, b].to(device))
                target = yi[:, b].to(device)[:, None].expand_as(logits)
                loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw, reduction="none")
                opt.zero_grad()
                loss.mean(-1).sum().backward()
                opt.step()
        p = predict(probe, stream, len(data.y), device, val)[:, :, val].clamp(1e-7, 1 - 1e-7)
        yv = ys[:, val][:, None].expand_as(p)
        vloss = -(yv * p.log() + (1 - yv) * (1 - p).log()).mean(-1)
        better = vloss < best - 1e-5
        best = torch.where(better, vloss, best)
        stale = torch.where(better, torch.zeros_like(stale), stale + 1)
        with torch.no_grad():
            for k, v in probe.named_parameters():
                mask = better.to(device).reshape(*better.shape, *([1] * (v.dim() - 2)))
                best_state[k] = torch.where(mask, v.detach(), best_state[k])
        if bool((stale >= cfg.patience).all()):
            break
    with torch.no_grad():
        for k, v in probe.named_parameters():
            v.copy_(best_state[k])
    return epochs
