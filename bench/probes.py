"""Probe fitting speed: reasonscope's batched torch logistic probe vs scikit-learn's lbfgs, and all layers at once.

Usage: python bench/probes.py [--n 1000000] [--d 1536] [--epochs 2] [--sklearn raw,std] [--layers 28 --layer-rows 8000]

(1) One logistic probe on ``--n`` x ``--d`` synthetic activations with the anisotropy of LLM residuals
(log-normal column scales, 4 "massive" dimensions; labels from a linear rule plus logistic noise), 80/20 split.
``reasonscope`` runs :mod:`probes.train` (standardisation, class-weighted BCE, Adam, early stopping on a 10%
validation split, a control probe trained alongside) in memory; scikit-learn's ``LogisticRegression(lbfgs,
max_iter=1000)`` runs on the raw float32 features (``raw``) and after ``StandardScaler`` (``std``). Columns: fit
wall seconds, test AUROC, speed-up over each sklearn run. (2) ``fit_probes`` on an activation store of ``--layers``
hooks of width ``--d`` (1.5B shape: 28 x 1536), every layer in one pass. Needs the ``bench`` extra (scikit-learn).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

# run as a script, this file's directory comes first on sys.path and its name would shadow the probes package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from probes import metrics
from probes.batched import BatchedProbe
from probes.data import TEST, TRAIN, VAL, Labelled
from probes.fit import fit_probes
from probes.labels import LabelTable
from probes.train import ProbeConfig, predict, standardize, train
from reasonscope.store import ActivationStore, StoreManifest, StoreWriter


def synthetic(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Anisotropic features and labels from a linear rule with logistic noise (Bayes AUROC well below 1)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(d, generator=g))
    scale[:4] *= 100.0  # massive activations
    w = torch.randn(d, generator=g) / d**0.5
    x = torch.empty(n, d)
    y = torch.empty(n)
    for s in range(0, n, 65536):
        z = torch.randn(min(65536, n - s), d, generator=g)
        logit = 1.5 * (z @ w) / w.norm() * 2 + torch.logit(torch.rand(len(z), generator=g).clamp(1e-6, 1 - 1e-6))
        x[s : s + len(z)] = z * scale
        y[s : s + len(z)] = (logit > 0).float()
    return x, y


def sides(n: int, seed: int = 0) -> torch.Tensor:
    r = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1))
    return torch.where(r < 0.2, TEST, torch.where(r < 0.3, VAL, TRAIN))


def fit_ours(x: torch.Tensor, y: torch.Tensor, side: torch.Tensor, epochs: int) -> tuple[float, float]:
    """Seconds and test AUROC of :mod:`probes.train` on the in-memory rows."""
    n = len(y)
    data = Labelled(torch.arange(n), torch.arange(n), y, y[torch.randperm(n)], torch.arange(n), side, [])
    cfg = ProbeConfig(epochs=epochs, patience=1, batch_size=1024, lr=1e-2, weight_decay=0.0, device="cpu")
    batches = [(torch.arange(s, min(s + 65536, n)), x[None, s : s + 65536]) for s in range(0, n, 65536)]
    t = time.perf_counter()
    probe = BatchedProbe(2, 1, x.shape[1], "logistic")
    standardize(probe, batches, side == TRAIN, torch.device("cpu"))
    train(probe, batches, data, cfg, torch.device("cpu"))
    seconds = time.perf_counter() - t
    p = predict(probe, batches, n, torch.device("cpu"))[0, 0]
    test = side == TEST
    return seconds, metrics.auroc(p[test], y[test])


def fit_sklearn(x: torch.Tensor, y: torch.Tensor, side: torch.Tensor, standardized: bool) -> tuple[float, float, int]:
    """Seconds, test AUROC and iterations of scikit-learn's lbfgs (train+val rows as training data)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tr, te = (side != TEST).numpy(), (side == TEST).numpy()
    xn, yn = x.numpy(), y.numpy()
    lr = LogisticRegression(solver="lbfgs", max_iter=1000)
    model = make_pipeline(StandardScaler(), lr) if standardized else lr
    t = time.perf_counter()
    model.fit(xn[tr], yn[tr])
    seconds = time.perf_counter() - t
    p = torch.from_numpy(model.predict_proba(xn[te])[:, 1])
    return seconds, metrics.auroc(p, y[te]), int(lr.n_iter_[0])


def all_layers(layers: int, d: int, rows: int, root: Path) -> dict[str, float]:
    """Write a ``layers`` x ``d`` bf16 store of ``rows`` chunk rows and time ``fit_probes`` over every layer."""
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(layers)]
    per, chunks = 64, 8
    n_traces = rows // chunks
    ids = [f"t{i}" for i in range(n_traces)]
    m = StoreManifest(
        weight_hash="sha256:bench",
        hooks=dict.fromkeys(hooks, d),
        positions="segment_ends",
        dtype="bfloat16",
        trace_ids=ids,
        shard_size=per,
    )
    w = StoreWriter.create(root / "store", m)
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(d, generator=g)
    table = LabelTable([], [], [], [], [], [], {"correct": []})
    for s in range(w.n_shards):
        lo, hi = s * per, min((s + 1) * per, n_traces)
        n = (hi - lo) * chunks
        y = (torch.rand(n, generator=g) < 0.5).float()
        acts = {
            h: torch.randn(n, d, generator=g) + (0.02 * i) * (2 * y[:, None] - 1) * direction
            for i, h in enumerate(hooks)
        }
        trace = torch.arange(lo, hi).repeat_interleave(chunks)
        pos = torch.arange(chunks).repeat(hi - lo)
        rows_ = {"trace": trace, "position": pos, "token_id": torch.zeros(n, dtype=torch.long), "segment": pos.clone()}
        w.write_shard(s, acts, rows_)
        for t, k, v in zip(trace.tolist(), pos.tolist(), y.tolist()):
            table.trace_id.append(ids[t])
            table.problem.append(ids[t])
            table.chunk.append(k)
            table.position.append(k)
            table.share.append((k + 1) / chunks)
            table.text.append("")
            table.targets["correct"].append(v)
    w.finalize()
    store = ActivationStore.open(root / "store", check="size")
    t = time.perf_counter()
    ps = fit_probes(store, table, ProbeConfig(epochs=3, patience=1, batch_size=1024, bootstrap=0), root / "p")
    seconds = time.perf_counter() - t
    aurocs = [ps.report["layers"][h]["auroc"] for h in hooks]
    return {
        "layers": layers,
        "rows": rows,
        "seconds": seconds,
        "auroc_first": aurocs[0],
        "auroc_last": aurocs[-1],
        "best_layer": int(ps.best_hook.split(".")[1]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=1536)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--sklearn", default="raw,std", help="sklearn variants to run: raw, std (comma-separated)")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--layer-rows", type=int, default=8000)
    args = ap.parse_args()
    x, y = synthetic(args.n, args.d)
    side = sides(args.n)
    ours_s, ours_auc = fit_ours(x, y, side, args.epochs)
    report: dict[str, object] = {
        "n": args.n,
        "d": args.d,
        "threads": torch.get_num_threads(),
        "reasonscope": {"seconds": round(ours_s, 2), "auroc": round(ours_auc, 4)},
    }
    for variant in [v for v in args.sklearn.split(",") if v]:
        s, auc, it = fit_sklearn(x, y, side, variant == "std")
        report[f"sklearn_lbfgs_{variant}"] = {
            "seconds": round(s, 2),
            "auroc": round(auc, 4),
            "iterations": it,
            "speedup": round(s / ours_s, 1),
            "auroc_gap": round(ours_auc - auc, 4),
        }
    print(json.dumps(report), flush=True)
    del x, y
    if args.layers:
        with tempfile.TemporaryDirectory() as tmp:
            report["all_layers"] = {
                k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
                for k, v in all_layers(args.layers, args.d, args.layer_rows, Path(tmp)).items()
            }
    print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
