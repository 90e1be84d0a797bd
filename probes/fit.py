"""Fitting probes on every selected layer at once, streaming from an activation store.

Per layer, a task probe and a control probe (labels shuffled within each problem; Hewitt & Liang 2019,
arXiv 1909.03368) are trained together on BCE with ``pos_weight = N_neg/N_pos`` (Zhang et al. 2025) on
standardised features, early-stopped on the validation problems' loss: logistic probes full-batch
(:mod:`probes.newton`, every layer in the same few passes over the store), MLP probes by minibatch Adam. The
best layer is chosen on validation AUROC (pooled, or within problems: ``ProbeConfig.select_on``); test metrics
(pooled and within-problem AUROC, ECE, Brier, accuracy, bootstrap CI over problems) and selectivity (task AUROC -
control AUROC) are reported per layer, beside baselines (:mod:`probes.baselines`). The class weights skew the raw
probabilities, so each layer is recalibrated by Platt scaling on the validation problems (probes.md §5.4):
:meth:`ProbeSet.predict` returns calibrated probabilities, and ECE, Brier and accuracy are theirs.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from reasonscope.store import ActivationStore

from . import metrics
from .baselines import baseline_report
from .batched import BatchedProbe
from .data import TEST, TRAIN, VAL, Labelled, Stream, join_labels, store_hooks
from .labels import LabelTable
from .probeset import ProbeSet, write_probeset
from .train import ProbeConfig, fit, predict


def _calibrate(logits: torch.Tensor, data: Labelled) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """Per layer, Platt scaling of the task probe fitted on the validation problems (the class weights skew its raw
    probabilities toward balanced classes): the calibrated probabilities ``[L, n]`` and each layer's ``(a, b)``, on
    the probe's own logits (those :meth:`ProbeSet.predict` applies them to)."""
    val = data.side == VAL
    z = logits[0].double()
    ab = [metrics.platt(z[i, val], data.y[val]) for i in range(len(z))]
    q = torch.stack([torch.sigmoid(a * z[i] + b) for i, (a, b) in enumerate(ab)]).float()
    return q, ab


def _layer_reports(
    p: torch.Tensor, q: torch.Tensor, data: Labelled, hooks: list[str], cfg: ProbeConfig
) -> dict[str, dict]:
    """Per hook: validation AUROC (pooled and within problems), test metrics with a bootstrap CI, control AUROC and
    selectivity; ECE, Brier and accuracy of the calibrated probabilities ``q`` (``*_raw``: of ``p``)."""
    val, test = data.side == VAL, data.side == TEST
    out = {}
    for i, hook in enumerate(hooks):
        r: dict[str, Any] = dict(metrics.report(p[0, i, test], data.y[test], data.group[test]))
        yt = data.y[test]
        r.update(ece_raw=r["ece"], brier_raw=r["brier"], accuracy_raw=r["accuracy"])
        r.update(
            ece=metrics.ece(q[i, test], yt),
            brier=metrics.brier(q[i, test], yt),
            accuracy=metrics.accuracy(q[i, test], yt),
        )
        lo, hi = metrics.bootstrap_auroc(p[0, i, test], data.y[test], data.group[test], cfg.bootstrap, cfg.seed)
        control = metrics.auroc(p[1, i, test], data.control[test])
        r.update(
            val_auroc=metrics.auroc(p[0, i, val], data.y[val]),
            val_auroc_within_problem=metrics.auroc_within(p[0, i, val], data.y[val], data.group[val]),
            auroc_ci=[lo, hi],
            control_auroc=control,
            selectivity=r["auroc"] - control,
        )
        out[hook] = r
    return out


def fit_probes(
    store: ActivationStore, labels: LabelTable, cfg: ProbeConfig, out: str | Path, replace: bool = False
) -> ProbeSet:
    """Fit ``cfg.target`` probes on every selected hook of ``store``; write the ``probe_set`` at ``out``."""
    hooks = store_hooks(store, cfg.hooks)
    data = join_labels(store, labels, cfg.target, cfg.test_fraction, cfg.val_fraction, cfg.seed)
    device = cfg.torch_device()
    width = store.manifest.hooks[hooks[0]]
    stream = Stream(store, hooks, data.row, cfg.read_batch, cfg.cache_bytes)
    probe = BatchedProbe(2, len(hooks), width, cfg.kind, cfg.hidden if cfg.kind == "mlp" else 0, cfg.seed).to(device)
    epochs = fit(probe, stream, data, cfg, device)
    z = predict(probe, stream, len(data.y), device, logits=True)
    p = torch.sigmoid(z)
    q, platt = _calibrate(z, data)
    layers = _layer_reports(p, q, data, hooks, cfg)
    key = next(
        (k for k in (f"val_{cfg.select_on}", "val_auroc") if any(not math.isnan(layers[h][k]) for h in hooks)), None
    )
    if key is None:
        raise ValueError(
            f"no layer's validation AUROC is defined for target {cfg.target!r}: the validation problems hold one "
            "class only; label more traces (in Python, or raise ProbeConfig.val_fraction)"
        )
    best = max(hooks, key=lambda h: -math.inf if math.isnan(layers[h][key]) else layers[h][key])
    report = {
        "target": cfg.target,
        "best_hook": best,
        "selected_on": key,
        "best": layers[best],
        "layers": layers,
        "epochs": epochs,
        "n_rows": {k: int((data.side == s).sum()) for k, s in (("train", TRAIN), ("val", VAL), ("test", TEST))},
        "test_problems": [data.problems[g] for g in sorted(set(data.group[data.side == TEST].tolist()))],
        "fit_problems": [data.problems[g] for g in sorted(set(data.group[data.side != TEST].tolist()))],
        "baselines": baseline_report(labels, data, cfg),
    }
    calibration = {h: list(ab) for h, ab in zip(hooks, platt)}
    return write_probeset(out, probe.select(0), asdict(cfg), hooks, width, store, report, calibration, replace)
