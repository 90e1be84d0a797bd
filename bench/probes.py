"""Probe fitting speed: reasonscope's full-batch logistic probe vs scikit-learn's lbfgs, and all layers at once.

Usage: python bench/probes.py [--n 200000] [--d 1536] [--repeats 3] [--sk-repeats 3] [--layers 28 --layer-rows 8000]
       python bench/probes.py --n 1000000 --sk-repeats 1      # the headline figure (6 GB of float32 activations)

(1) One logistic probe on ``--n`` x ``--d`` synthetic activations with the anisotropy of LLM residuals
(log-normal column scales, 4 "massive" dimensions, ``--factors`` shared low-rank factors; labels from a linear rule
plus logistic noise). The rows are i.i.d., so the split is by position: the first 80% train both fitters, the last
20% are the test rows. Both fit the same objective on the same rows: standardised features, mean log-loss +
``1 / (2 C n)`` |w|^2 with scikit-learn's default ``C = 1`` (intercept unpenalised), no class weights, gradient
tolerance ``1e-4``. ``reasonscope`` = :func:`probes.train.fit` (:mod:`probes.newton`; standardisation included,
a control probe on shuffled labels fitted alongside, as ``fit_probes`` does); scikit-learn =
``make_pipeline(StandardScaler(copy=False), LogisticRegression())`` (lbfgs, float64 inside, its default), with
the threads both libraries get by default. Columns: median wall seconds of the fit over the repeats, passes or
iterations, test AUROC, speed-up (scikit-learn median / ours) and the coefficients' agreement. (2) ``fit_probes``
on an activation store of ``--layers`` hooks of width ``--d`` (1.5B shape: 28 x 1536): every layer in the same
passes over the store. Needs the
``bench`` extra (scikit-learn).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

# run as a script, this file's directory comes first on sys.path and its name would shadow the probes package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from shapes import count, count0

from probes import metrics
from probes.batched import BatchedProbe
from probes.data import TEST, TRAIN, VAL, Labelled
from probes.fit import fit_probes
from probes.labels import LabelTable
from probes.train import ProbeConfig, fit, predict
from reasonscope.store import ActivationStore, StoreManifest, StoreWriter


def synthetic(n: int, d: int, factors: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Anisotropic features and labels from a linear rule with logistic noise (Bayes AUROC well below 1)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(d, generator=g))
    scale[:4] *= 100.0  # massive activations
    w = torch.randn(d, generator=g) / d**0.5
    mix = torch.randn(factors, d, generator=g) * 2.0  # shared directions: correlated features
    x = torch.empty(n, d)
    y = torch.empty(n)
    for s in range(0, n, 65536):
        z = torch.randn(min(65536, n - s), d, generator=g)
        if factors:
            z = z + torch.randn(len(z), factors, generator=g) @ mix
        logit = 1.5 * (z @ w) / (z @ w).std() * 2 + torch.logit(torch.rand(len(z), generator=g).clamp(1e-6, 1 - 1e-6))
        x[s : s + len(z)] = z * scale
        y[s : s + len(z)] = (logit > 0).float()
    return x, y


def n_train(n: int) -> int:
    return int(0.8 * n)


def fit_ours(
    x: torch.Tensor, y: torch.Tensor, early: bool, device: torch.device
) -> tuple[float, float, int, torch.Tensor]:
    """Seconds, test AUROC, passes and standardised-space coefficients of :func:`probes.train.fit` (in memory,
    on ``device``: on a GPU the activations are placed there once, before the clock starts).

    ``early``: the last eighth of the training rows is the validation split, and the fit stops at the first pass
    that does not improve the validation loss (``patience=1``); otherwise it trains on all of them and stops at
    scikit-learn's criterion (``max |grad| <= 1e-4``).
    """
    n, nt = len(y), n_train(len(y))
    side = torch.full((n,), TEST)
    side[:nt] = TRAIN
    if early:
        side[nt - nt // 8 : nt] = VAL
    control = y.clone()
    control[:nt] = y[:nt][torch.randperm(nt, generator=torch.Generator().manual_seed(1))]
    data = Labelled(torch.arange(n), torch.arange(n), y, control, torch.arange(n), side, [])
    cfg = ProbeConfig(
        class_weight=False,
        weight_decay=1.0 / nt,  # scikit-learn's C = 1 on nt rows
        epochs=200,
        patience=1 if early else 5,
        tol=1e-4,
        device=str(device),
    )
    xd = x.to(device)
    batches = [(torch.arange(s, min(s + 65536, n)), xd[None, s : s + 65536]) for s in range(0, n, 65536)]
    _sync(device)
    t = time.perf_counter()
    probe = BatchedProbe(2, 1, x.shape[1], "logistic").to(device)
    passes = fit(probe, batches, data, cfg, device)
    _sync(device)
    seconds = time.perf_counter() - t
    p = predict(probe, batches, n, device, side == TEST)[0, 0]
    return seconds, metrics.auroc(p[nt:], y[nt:]), passes, probe.w.detach()[0, 0].cpu().clone()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fit_sklearn(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, int, torch.Tensor]:
    """Seconds, test AUROC, iterations and coefficients of scikit-learn's lbfgs; standardises ``x`` in place."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    nt = n_train(len(y))
    xn, yn = x.numpy(), y.numpy()
    lr = LogisticRegression()  # lbfgs, C=1, tol=1e-4, max_iter=100: the defaults
    model = make_pipeline(StandardScaler(copy=False), lr)
    t = time.perf_counter()
    model.fit(xn[:nt], yn[:nt])
    seconds = time.perf_counter() - t
    p = torch.from_numpy(model.predict_proba(xn[nt:])[:, 1])
    return seconds, metrics.auroc(p, y[nt:]), int(lr.n_iter_[0]), torch.from_numpy(lr.coef_[0]).float()


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def all_layers(layers: int, d: int, rows: int, root: Path, device: str) -> dict[str, float]:
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
    ps = fit_probes(store, table, ProbeConfig(bootstrap=0, device=device), root / "p")
    seconds = time.perf_counter() - t
    aurocs = [ps.report["layers"][h]["auroc"] for h in hooks]
    return {
        "layers": layers,
        "rows": rows,
        "seconds": seconds,
        "auroc_first": aurocs[0],
        "auroc_last": aurocs[-1],
        "best_layer": int(ps.best_hook.split(".")[1]),
        "passes": ps.report["epochs"],
    }


def _threads() -> str:
    try:
        from threadpoolctl import threadpool_info

        blas = ",".join(f"{i['internal_api']}:{i['num_threads']}" for i in threadpool_info())
    except ImportError:  # pragma: no cover
        blas = "?"
    return f"torch:{torch.get_num_threads()} numpy/sklearn:{blas}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=count, default=200_000)
    ap.add_argument("--d", type=count, default=1536)
    ap.add_argument("--factors", type=count0, default=0, help="shared low-rank factors in the features (0: none)")
    ap.add_argument("--repeats", type=count, default=3, help="timed fits of ours")
    ap.add_argument("--no-early", dest="early", action="store_false", help="skip ours with early stopping")
    ap.add_argument("--no-to-tol", dest="to_tol", action="store_false", help="skip ours to scikit-learn's tol")
    ap.add_argument("--sk-repeats", type=count0, default=3, help="timed fits of scikit-learn (0: skip it)")

    ap.add_argument("--device", default="cpu", help="where our fitter runs (cuda: the GPU figure; sklearn: CPU)")
    ap.add_argument("--layers", type=count, default=28)
    ap.add_argument("--layer-rows", type=count, default=8000)
    args = ap.parse_args()
    x, y = synthetic(args.n, args.d, args.factors)
    fit_ours(x[:2048], y[:2048], True, torch.device(args.device))  # warm-up, untimed (allocator, kernels)
    rows: list[dict[str, object]] = []
    coefs = {}
    for early, name in ((True, "reasonscope (early stop)"), (False, "reasonscope (tol 1e-4)")):
        if not (args.early if early else args.to_tol):
            continue
        ours = [fit_ours(x, y, early, torch.device(args.device)) for _ in range(args.repeats)]
        coefs[name] = ours[0][3]
        rows.append(
            {
                "fitter": name,
                "seconds": _median([r[0] for r in ours]),
                "runs": [r[0] for r in ours],
                "steps": ours[0][2],
                "auroc": ours[0][1],
            }
        )
    sk = []
    for i in range(args.sk_repeats):
        if i:
            x, y = synthetic(args.n, args.d, args.factors)  # scikit-learn standardised the last copy in place
        sk.append(fit_sklearn(x, y))
    if sk:
        sk_s = _median([r[0] for r in sk])
        sk_coef = sk[0][3]
        rows.append(
            {
                "fitter": "sklearn lbfgs",
                "seconds": sk_s,
                "runs": [r[0] for r in sk],
                "steps": sk[0][2],
                "auroc": sk[0][1],
            }
        )
        for r in rows[:-1]:
            r["speedup"] = sk_s / float(r["seconds"])  # type: ignore[arg-type]
            r["auroc_gap"] = float(r["auroc"]) - sk[0][1]  # type: ignore[arg-type]
        for r in rows[:-1]:
            coef = coefs[str(r["fitter"])]
            r["coef_cosine"] = float(torch.nn.functional.cosine_similarity(coef, sk_coef, 0))
            r["coef_max_abs_diff"] = float((coef - sk_coef).abs().max())
    del x, y
    print(
        f"n={args.n} (train {n_train(args.n)}, test {args.n - n_train(args.n)})  d={args.d}  "
        f"factors={args.factors}  ours on {args.device}  threads {_threads()}"
    )
    print(f"{'fitter':<26}{'median s':>10}{'steps':>7}{'AUROC':>8}{'speed-up':>10}{'AUROC gap':>11}{'cos(w)':>9}  runs")
    for r in rows:
        sp = f"{r['speedup']:.1f}x" if "speedup" in r else ""
        gap = f"{r['auroc_gap']:+.4f}" if "auroc_gap" in r else ""
        runs = " ".join(f"{t:.2f}" for t in r["runs"])  # type: ignore[attr-defined]
        cos = f"{r['coef_cosine']:.4f}" if "coef_cosine" in r else ""
        print(
            f"{r['fitter']:<26}{r['seconds']:>10.2f}{r['steps']:>7}{r['auroc']:>8.4f}{sp:>10}{gap:>11}{cos:>9}  {runs}"
        )
    report: dict[str, object] = {"n": args.n, "d": args.d, "factors": args.factors, "fits": rows}
    if args.layers:
        with tempfile.TemporaryDirectory() as tmp:
            report["all_layers"] = {
                k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
                for k, v in all_layers(args.layers, args.d, args.layer_rows, Path(tmp), args.device).items()
            }
        print(json.dumps(report["all_layers"]), flush=True)
    print(json.dumps(report, default=lambda v: round(v, 4) if isinstance(v, float) else str(v)), flush=True)


if __name__ == "__main__":
    main()
