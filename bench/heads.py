"""Issue 9 on an organism: score heads with every method, then ``evaluate_heads`` on held-out problems.

    python bench/heads.py --model organism:thinking --n-train 64 --n-eval 300 --out runs/heads_bench.json

The scorers read the model's own greedy traces on training problems (seed ``--seed``); evaluation uses
other problems (seed ``--seed + 1``). The window is scaled to the traces (``window_for``) unless given.
``--single-heads`` adds the accuracy with each KV head windowed alone (a causal check of the rankings).
``--scores-out`` saves the head maps (and timings, the RLKV log) before the sweep; ``--scores-in`` reloads
them to rerun the sweep alone. Timings depend on the machine's load: say how loaded it was.

    python bench/heads.py --shape 1.5b --n-train 16 --n-eval 64 --rlkv-steps 10 --duo-steps 10   # GPU timing

``--shape 1.5b`` times the scorers and the evaluator on a random-init DeepSeek-R1-Distill-Qwen-1.5B / Qwen2-1.5B
(config from ../shared/data/tokenizers/qwen2; bf16 on CUDA, float32 on CPU; ``--layers`` keeps fewer layers for
a quick CPU check of the path). Random weights solve nothing and never stop, so that run is for time and memory
only: traces run to ``--trace-tokens``, they are marked solved so that RLKV has problems to train on (its reward
is then always 0, the same work per step), and there is no retrieval score or exhaustive ceiling (2^56 subsets).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, cast

import torch
from shapes import count, random_qwen2

from reasonscope.heads import CompressionPolicy, HeadConfig, score_heads
from reasonscope.heads.evaluate import EvalConfig, check_window, evaluate_heads, window_for
from reasonscope.heads.retrieval import read_scores
from reasonscope.heads.rlkv import RLKVConfig
from reasonscope.heads.score import Method
from reasonscope.heads.scorers import DuoLoss
from reasonscope.models import load_model
from reasonscope.organisms import task
from reasonscope.traces.generate import GenerationConfig, generate_traces

METHODS = ("retrieval", "window", "gate-ig", "duo", "duo-mse", "rlkv")  # duo-mse: Duo with DuoAttention's MSE


def single_heads(h: Any, held: list[Any], policy: CompressionPolicy, cfg: EvalConfig, timing: bool) -> dict:
    """Generated accuracy on ``held`` with one KV head windowed and every other head full, per head."""
    g = h.geometry
    n = g.n_layers * g.n_kv_heads
    maps = {}
    for i in range(n):
        full = torch.ones(n)
        full[i] = 0
        maps[f"L{i // g.n_kv_heads}H{i % g.n_kv_heads}"] = full
    one = dataclasses.replace(
        cfg, sparsities=(1 / n,), random_draws=0, uniform=False, exhaustive=False, timing_prompts=0
    )
    res = evaluate_heads(
        h,
        [h.chat_prompt(p.question, thinking=timing) for p in held],
        [str(p.answer) for p in held],
        {head: m.view(g.n_layers, g.n_kv_heads) for head, m in maps.items()},
        policy,
        one,
    )
    return {head: res["curves"][head][f"{1 / n:g}"]["accuracy"] for head in maps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism:thinking")
    ap.add_argument("--shape", choices=("organism", "1.5b"), default="organism", help="1.5b: GPU timing (see above)")
    ap.add_argument("--layers", type=count, default=None, help="1.5b: keep this many layers (a quick CPU check)")
    ap.add_argument("--n-train", type=count, default=64)
    ap.add_argument("--n-eval", type=count, default=300)
    ap.add_argument("--levels", default="3,4")
    ap.add_argument("--sink", type=int, default=None)
    ap.add_argument("--recent", type=int, default=None)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--duo-steps", type=count, default=60)
    ap.add_argument("--rlkv-steps", type=count, default=60)
    ap.add_argument("--rlkv-lr", type=float, default=0.05)
    ap.add_argument("--rlkv-beta", type=float, default=0.05)
    ap.add_argument("--rlkv-tau", type=float, default=0.5)
    ap.add_argument("--rlkv-temperature", type=float, default=0.0, help="0: greedy rollouts (sampling loops here)")
    ap.add_argument("--rlkv-prompts", type=count, default=16)
    ap.add_argument("--rlkv-samples", type=count, default=1)
    ap.add_argument("--rlkv-rollout-tokens", type=count, default=320)
    ap.add_argument("--rlkv-adv-norm", default="batch", choices=("batch", "group"))
    ap.add_argument("--rlkv-budget-s", type=float, default=840.0, help="RLKV wall-time budget (15 min incl. setup)")
    ap.add_argument("--rlkv-max-think", type=count, default=280, help="RLKV trains on problems solved within this")
    ap.add_argument("--draws", type=count, default=5)
    ap.add_argument("--sparsities", default="0,0.25,0.5,0.75")
    ap.add_argument("--max-new-tokens", type=count, default=384, help="Evaluation and RLKV rollout length")
    ap.add_argument("--trace-tokens", type=count, default=512, help="Length of the own traces the scorers read")
    ap.add_argument("--batch-size", type=count, default=256)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--scores-out", type=Path, default=None)
    ap.add_argument("--scores-in", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--single-heads", action="store_true", help="also: accuracy with each KV head windowed alone")
    args = ap.parse_args()
    bad = sorted(set(args.methods.split(",")) - set(METHODS))
    if bad:
        ap.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    try:
        levels = tuple(int(x) for x in args.levels.split(","))
    except ValueError:
        ap.error(f"--levels {args.levels!r}: give comma-separated levels, e.g. 3,4")
    if not set(levels) <= set(task.LEVELS):
        ap.error(f"--levels {args.levels}: the task's levels are {', '.join(map(str, task.LEVELS))}")
    try:
        sparsities = tuple(float(x) for x in args.sparsities.split(","))
    except ValueError:
        ap.error(f"--sparsities {args.sparsities!r}: give comma-separated fractions, e.g. 0,0.25,0.5")
    if not all(0 <= x <= 1 for x in sparsities):
        ap.error(f"--sparsities {args.sparsities}: each is a fraction in [0, 1]")
    for out in (args.out, args.scores_out):
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)  # written at the end: fail now, not after the run
    torch.manual_seed(0)
    timing = args.shape == "1.5b"
    h: Any = random_qwen2(args.layers) if timing else load_model(args.model)
    if timing and args.methods == ",".join(METHODS):
        args.methods = ",".join(m for m in METHODS if m != "retrieval")
    train = task.problems(args.n_train, seed=args.seed, levels=levels)
    t0 = time.time()
    traces = generate_traces(
        h,
        [h.chat_prompt(p.question, thinking=timing) for p in train],
        GenerationConfig(max_new_tokens=args.trace_tokens, batch_size=args.batch_size),
        golds=[str(p.answer) for p in train],
        grader="organism",
    )
    if timing:  # random weights solve nothing: mark the traces solved so that RLKV runs (timing only)
        traces = [dataclasses.replace(t, grade=True) for t in traces]
    generated = [len(t.token_ids) - t.think_span[0] for t in traces if t.think_span is not None]
    policy = window_for(generated) if args.sink is None else CompressionPolicy(args.sink, args.recent or 0)
    check_window(policy, generated)
    print(
        f"own traces: {time.time() - t0:.1f}s, accuracy {sum(bool(t.grade) for t in traces) / len(traces):.3f}, "
        f"window {policy}",
        flush=True,
    )
    if args.scores_in is not None:
        saved = json.loads(args.scores_in.read_text(encoding="utf-8"))
        scores = {m: torch.tensor(s) for m, s in saved["scores"].items()}
        seconds, rlkv_log = saved["scorer_seconds"], saved.get("rlkv_log", [])
        if tuple(saved["policy"]) != (policy.sink, policy.recent):
            raise ValueError(f"{args.scores_in} was scored with window {saved['policy']}, not {policy}")
    else:
        scores, seconds, rlkv_log = score_all(h, traces, policy, args)
        if args.scores_out is not None:
            blob = {
                "scores": {m: s.tolist() for m, s in scores.items()},
                "scorer_seconds": seconds,
                "rlkv_log": rlkv_log,
                "policy": [policy.sink, policy.recent],
            }
            args.scores_out.write_text(json.dumps(blob) + "\n", encoding="utf-8")
    held = task.problems(args.n_eval, seed=args.seed + 1, levels=levels)
    retrieval = scores.pop("retrieval", None)
    name_reads = read_scores(h, traces)["name"][0] if retrieval is not None else None
    t0 = time.time()
    cfg = EvalConfig(
        exhaustive=not timing,
        sparsities=sparsities,
        random_draws=args.draws,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    res = evaluate_heads(
        h,
        [h.chat_prompt(p.question, thinking=timing) for p in held],
        [str(p.answer) for p in held],
        scores,
        policy,
        cfg,
        own_traces=traces,
        retrieval=retrieval,
        name_reads=name_reads,
    )
    res["scorer_seconds"] = seconds
    res["eval_seconds"] = round(time.time() - t0, 1)
    res["scores"] = {m: [round(float(v), 4) for v in s.flatten()] for m, s in scores.items()}
    if retrieval is not None:
        res["scores"]["retrieval"] = [round(float(v), 4) for v in retrieval.flatten()]
    if name_reads is not None:
        res["scores"]["name_reads"] = [round(float(v), 4) for v in name_reads.flatten()]
    if args.single_heads:
        res["single_head_windowed"] = single_heads(h, held, policy, cfg, timing)
    text = json.dumps(res, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"\nheld-out problems {len(held)}, window {policy}; uniform, random and exhaustive are the references")
    print(table(res))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def table(res: dict[str, Any]) -> str:
    """Markdown: per method, the scorer's wall seconds and the generated accuracy at each sparsity."""
    levels = sorted({s for curve in res["curves"].values() for s in curve}, key=float)
    head = "| method | scorer s | " + " | ".join(f"acc @ {s}" for s in levels) + " |"
    rows = [head, "|---|---:|" + "---:|" * len(levels)]
    for method, curve in res["curves"].items():
        cells = [f"{curve[s]['accuracy']:.3f}" if s in curve else "" for s in levels]
        rows.append(f"| {method} | {res['scorer_seconds'].get(method, '')} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def score_all(
    h: object, traces: list, policy: CompressionPolicy, args: argparse.Namespace
) -> tuple[dict[str, torch.Tensor], dict[str, float], list[dict]]:
    """Every method's head map on the model's own traces, with wall seconds (and the RLKV training log)."""
    rlkv = RLKVConfig(
        steps=args.rlkv_steps,
        prompts_per_step=args.rlkv_prompts,
        samples_per_prompt=args.rlkv_samples,
        lr=args.rlkv_lr,
        beta=args.rlkv_beta,
        tau=args.rlkv_tau,
        temperature=args.rlkv_temperature,
        adv_norm=args.rlkv_adv_norm,
        max_new_tokens=args.rlkv_rollout_tokens,
        seed=args.seed,
        time_budget_s=args.rlkv_budget_s,
        max_think_tokens=None if args.shape == "1.5b" else args.rlkv_max_think,
    )
    scores, seconds, rlkv_log = {}, {}, []
    for method in args.methods.split(","):
        loss: DuoLoss = "mse" if method == "duo-mse" else "kl"
        cfg = HeadConfig(
            method=cast("Method", "duo" if method == "duo-mse" else method),
            sink=policy.sink,
            recent=policy.recent,
            duo_steps=args.duo_steps,
            duo_loss=loss,
            rlkv=rlkv,
        )
        _sync()
        t0 = time.time()
        hm = score_heads(h, traces, cfg)
        scores[method] = hm.scores
        _sync()  # CUDA works asynchronously: stop the clock when the scorer's kernels have finished
        seconds[method] = round(time.time() - t0, 1)
        if method == "rlkv":
            rlkv_log = hm.log
        print(f"{method}: {seconds[method]}s {[round(float(v), 4) for v in scores[method].flatten()]}", flush=True)
    return scores, seconds, rlkv_log


if __name__ == "__main__":
    main()
