"""Issue 9 on an organism: score heads with every method, then ``evaluate_heads`` on held-out problems.

    python bench/heads.py --model organism:thinking --n-train 48 --n-eval 300 --out runs/heads_bench.json

The scorers read the model's own greedy traces on training problems (seed ``--seed``); evaluation uses
other problems (seed ``--seed + 1``). The window is scaled to the traces (``window_for``) unless given.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from reasonscope.heads import CompressionPolicy, HeadConfig, score_heads
from reasonscope.heads.evaluate import EvalConfig, check_window, evaluate_heads, window_for
from reasonscope.heads.rlkv import RLKVConfig
from reasonscope.models import load_model
from reasonscope.organisms import task
from reasonscope.traces.generate import GenerationConfig, generate_traces


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="organism:thinking")
    ap.add_argument("--n-train", type=int, default=48)
    ap.add_argument("--n-eval", type=int, default=300)
    ap.add_argument("--levels", default="3,4")
    ap.add_argument("--sink", type=int, default=None)
    ap.add_argument("--recent", type=int, default=None)
    ap.add_argument("--duo-steps", type=int, default=60)
    ap.add_argument("--rlkv-steps", type=int, default=20)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    h = load_model(args.model)
    levels = tuple(int(x) for x in args.levels.split(","))
    train = task.problems(args.n_train, seed=args.seed, levels=levels)
    t0 = time.time()
    traces = generate_traces(
        h,
        [h.chat_prompt(p.question) for p in train],
        GenerationConfig(max_new_tokens=args.max_new_tokens),
        golds=[str(p.answer) for p in train],
        grader="organism",
    )
    generated = [len(t.token_ids) - t.think_span[0] for t in traces if t.think_span is not None]
    policy = window_for(generated) if args.sink is None else CompressionPolicy(args.sink, args.recent or 0)
    check_window(policy, generated)
    print(
        f"own traces: {time.time() - t0:.1f}s, accuracy {sum(bool(t.grade) for t in traces) / len(traces):.3f}, "
        f"window {policy}",
        flush=True,
    )
    scores, seconds = {}, {}
    rlkv = RLKVConfig(steps=args.rlkv_steps, max_new_tokens=args.max_new_tokens, seed=args.seed)
    for method in ("retrieval", "window", "gate-ig", "duo", "rlkv"):
        cfg = HeadConfig(method=method, sink=policy.sink, recent=policy.recent, duo_steps=args.duo_steps, rlkv=rlkv)
        t0 = time.time()
        scores[method] = score_heads(h, traces, cfg).scores
        seconds[method] = round(time.time() - t0, 1)
        print(f"{method}: {seconds[method]}s {[round(float(v), 4) for v in scores[method].flatten()]}", flush=True)
    held = task.problems(args.n_eval, seed=args.seed + 1, levels=levels)
    retrieval = scores.pop("retrieval")
    t0 = time.time()
    res = evaluate_heads(
        h,
        [h.chat_prompt(p.question) for p in held],
        [str(p.answer) for p in held],
        scores,
        policy,
        EvalConfig(random_draws=args.draws, max_new_tokens=args.max_new_tokens),
        own_traces=traces,
        retrieval=retrieval,
    )
    res["scorer_seconds"] = seconds
    res["eval_seconds"] = round(time.time() - t0, 1)
    res["scores"] = {
        m: [round(float(v), 4) for v in s.flatten()] for m, s in {**scores, "retrieval": retrieval}.items()
    }
    text = json.dumps(res, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
