"""Head scorers on an organism: timings, teacher-forced accuracy at each sparsity, agreement with retrieval.

    python bench/heads.py --model organism:thinking --n 48 --sink 4 --recent 12
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from scipy.stats import spearmanr

from reasonscope.heads import CompressionPolicy, random_full_heads, select_full_heads, uniform_full_heads
from reasonscope.heads.accuracy import exhaustive_best, teacher_forced_accuracy
from reasonscope.heads.batches import trace_batches
from reasonscope.heads.retrieval import retrieval_scores
from reasonscope.heads.scorers import duo_scores, gate_ig_scores, windowing_scores
from reasonscope.models import load_model
from reasonscope.organisms import task
from reasonscope.traces.generate import GenerationConfig, generate_traces


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="organism:thinking")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--levels", default="3,4")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--recent", type=int, default=12)
    ap.add_argument("--duo-steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    torch.manual_seed(0)
    h = load_model(args.model)
    probs = task.problems(args.n, seed=args.seed, levels=tuple(int(x) for x in args.levels.split(",")))
    t0 = time.time()
    traces = generate_traces(h, [h.chat_prompt(p.question) for p in probs], GenerationConfig(max_new_tokens=400),
                             golds=[str(p.answer) for p in probs], grader="organism")
    print(f"generate: {time.time() - t0:.1f}s, accuracy {sum(bool(t.grade) for t in traces) / len(traces):.3f}, "
          f"mean tokens {sum(len(t.token_ids) for t in traces) / len(traces):.0f}")
    policy = CompressionPolicy(args.sink, args.recent)
    batches = trace_batches(h, traces, policy, batch_size=16)
    scores, times = {}, {}
    for name, fn in [("retrieval", lambda: retrieval_scores(h, traces)[0]),
                     ("window", lambda: windowing_scores(h, batches, policy)),
                     ("gate-ig", lambda: gate_ig_scores(h, batches, policy, steps=8)),
                     ("duo", lambda: duo_scores(h, batches, policy, steps=args.duo_steps))]:
        t0 = time.time()
        scores[name] = fn()
        times[name] = round(time.time() - t0, 1)
    g = h.geometry
    curves: dict = {}
    for sp in (0.25, 0.5, 0.75):
        masks = {m: select_full_heads(s, sp) for m, s in scores.items()}
        masks["uniform"] = uniform_full_heads(g.n_layers, g.n_kv_heads, sp)
        rand = torch.stack([random_full_heads(g.n_layers, g.n_kv_heads, sp, seed) for seed in range(5)])
        names = list(masks)
        acc = teacher_forced_accuracy(h, batches, torch.stack([masks[m] for m in names] + list(rand)), policy)
        row = {m: round(float(a), 3) for m, a in zip(names, acc)}
        ra = acc[len(names):]
        row["random_mean"], row["random_std"] = round(float(ra.mean()), 3), round(float(ra.std()), 3)
        row["exhaustive_best"] = round(exhaustive_best(h, batches, sp, policy)[1], 3)
        curves[sp] = row
    full = float(teacher_forced_accuracy(h, batches, torch.ones(1, g.n_layers, g.n_kv_heads, dtype=torch.bool),
                                         policy)[0])
    retr = scores["retrieval"].flatten()
    agreement = {m: round(float(spearmanr(s.flatten(), retr).statistic), 3) for m, s in scores.items()
                 if m != "retrieval"}
    top = {m: int(s.flatten().argmax()) for m, s in scores.items()}
    print(json.dumps({"policy": [args.sink, args.recent], "full_accuracy": round(full, 3), "seconds": times,
                      "curves": curves, "retrieval_spearman": agreement, "top_head_flat_index": top,
                      "retrieval_top2": retr.argsort(descending=True)[:2].tolist(),
                      "scores": {m: [round(float(v), 4) for v in s.flatten()] for m, s in scores.items()}}, indent=1))


if __name__ == "__main__":
    main()
