"""Per-token generation latency with a steering vector applied vs without (issue 11 target: <= 1.02x).

Usage:
    python bench/steering.py [--model organism:thinking] [--problems 64] [--max-new 128] [--repeats 5] [--threads 2]

Both arms greedily decode the same organism prompts through :func:`reasonscope.generation.generate`,
alternating repeat by repeat so machine load hits both alike. The steered arm applies a random vector at every
layer with per-request γ = 0 (``positions="last"``, the ASC rule, the most work per call: a per-request lookup
through ``current_batch``), so both arms generate identical tokens and the ratio is the hooks' cost alone.
Prints seconds per generated token (median, min, max over repeats) and the ratio of medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # this script shares the steering package's name: import the package, not this file

import torch

from reasonscope.generation import DecodeConfig, generate
from reasonscope.models import load_model
from reasonscope.organisms import evaluate, task
from steering.vector import SteeringVector, VectorMeta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism:thinking")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    h = load_model(args.model)
    g = h.geometry
    prompts = [h.chat_prompt(p.question) for p in task.problems(args.problems, evaluate.EVAL_SEED)]
    torch.manual_seed(0)
    meta = VectorMeta(d_model=g.d_model, layers=tuple(range(g.n_layers)), positions="last", n_layers=g.n_layers)
    vec = SteeringVector(torch.randn(g.n_layers, g.d_model), meta)
    cfg = DecodeConfig(max_new_tokens=args.max_new, batch_size=args.batch)
    gammas = [0.0] * len(prompts)

    def run(steer: bool) -> tuple[float, int, list[list[int]]]:
        t = time.perf_counter()
        if steer:
            with vec.apply(h, gamma=gammas):
                out = generate(h, prompts, cfg)
        else:
            out = generate(h, prompts, cfg)
        if h.device.type == "cuda":
            torch.cuda.synchronize()
        n = sum(len(c.token_ids) for c in out)
        return (time.perf_counter() - t) / n, n, [c.token_ids for c in out]

    _, n, ref = run(False)  # warm-up, and the tokens both arms must produce
    times: dict[bool, list[float]] = {False: [], True: []}
    same = True
    for _ in range(args.repeats):
        for steer in (False, True):
            per_token, _, ids = run(steer)
            times[steer].append(per_token)
            same = same and ids == ref
    print(f"model {args.model} on {h.device}, {len(prompts)} prompts, {n} generated tokens per run")
    for steer, label in ((False, "plain"), (True, "steered (all layers, per-request gamma)")):
        ts = times[steer]
        print(
            f"{label:42s} {1e3 * statistics.median(ts):.4f} ms/token (min {1e3 * min(ts):.4f}, max {1e3 * max(ts):.4f})"
        )
    print(f"ratio steered/plain (medians): {statistics.median(times[True]) / statistics.median(times[False]):.4f}")
    print(f"identical tokens: {same}")


if __name__ == "__main__":
    main()
