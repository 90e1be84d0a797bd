"""Per-token generation latency with a steering vector applied vs without (issue 11 target: <= 1.02x).

Usage:
    python bench/steering.py [--model organism:thinking] [--problems 64] [--max-new 128] [--repeats 5] [--threads 2]
    python bench/steering.py --shape 1.5b [--problems 64] [--max-new 128]                                  # GPU

Every arm greedily decodes the same organism prompts through :func:`reasonscope.generation.generate`; the arms
run round-robin within each repeat (order rotated per repeat) so machine load hits all alike. The steered arms
apply a random vector with γ = 0 (``positions="last"``, the ASC rule), so every arm generates identical tokens and
a ratio is the hooks' cost alone: one layer (ASC's setting, ``--layer``) with one γ for all requests (ASC's use:
``x + γv``) and with one γ per request (a lookup through ``current_batch`` each pass), and every layer with one γ
per request (the most work per step). Prints a table of milliseconds per
generated token (median, min, max over repeats) with the ratio of medians to the plain reference of the same run,
and the median wall time of one decode step over every step of every repeat (``step ms``: robust to a slow repeat,
which moves the per-run figures by up to ±15% on a GPU machine). Every arm passes the same timing callback, so
every arm runs under ``no_grad``. The hooks are also timed alone (every layer's hook on one decode-step input, a new
batch per pass, median of repeats) and scaled by the run's forward passes per token.
``--shape 1.5b``: the random-init DeepSeek-R1-Distill-Qwen-1.5B shape (bf16 on CUDA; bench/shapes.py) on random
prompts of 32-256 tokens; its rows never stop, so each decodes ``--max-new`` tokens.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # this script shares the steering package's name: import the package, not this file

import random

import torch

from reasonscope.generation import Batch, DecodeConfig, generate, running
from reasonscope.models import load_model
from reasonscope.organisms import evaluate, task
from steering.vector import SteeringVector, VectorMeta

sys.path.append(str(Path(__file__).resolve().parent))  # after the steering package: bench/shapes.py
from shapes import count, count0, random_qwen2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism:thinking")
    ap.add_argument("--shape", choices=["organism", "1.5b"], default="organism", help="1.5b: ignore --model")
    ap.add_argument("--problems", type=count, default=64)
    ap.add_argument("--max-new", type=count, default=128)
    ap.add_argument("--batch", type=count, default=64)
    ap.add_argument("--repeats", type=count, default=5)
    ap.add_argument("--threads", type=count0, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--layer", type=int, default=2, help="the one-layer arm's block (ASC's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts: list[str] | list[list[int]]
    if args.shape == "1.5b":
        h, args.model = random_qwen2(), "random:qwen2-1.5b"
        rng = random.Random(0)
        prompts = [[rng.randrange(150000) for _ in range(rng.randint(32, 256))] for _ in range(args.problems)]
    else:
        h = load_model(args.model)
        prompts = [h.chat_prompt(p.question) for p in task.problems(args.problems, evaluate.EVAL_SEED)]
    g = h.geometry
    if not 0 <= args.layer < g.n_layers:
        ap.error(f"--layer {args.layer}: {args.model} has blocks 0..{g.n_layers - 1}")
    torch.manual_seed(0)
    meta = VectorMeta(d_model=g.d_model, layers=tuple(range(g.n_layers)), positions="last", n_layers=g.n_layers)
    vec = SteeringVector(torch.randn(g.n_layers, g.d_model), meta)
    cfg = DecodeConfig(max_new_tokens=args.max_new, batch_size=args.batch)
    gammas = [0.0] * len(prompts)

    arms: dict[str, tuple[list[int], bool] | None] = {  # (layers, one γ per request)
        "plain (reference)": None,
        f"steered, layer {args.layer} (ASC, one γ)": ([args.layer], False),
        f"steered, layer {args.layer}, γ per request": ([args.layer], True),
        f"steered, all {g.n_layers} layers, γ per req.": (list(range(g.n_layers)), True),
    }

    def run(arm: tuple[list[int], bool] | None) -> tuple[float, list[float], list[list[int]], int]:
        """Seconds per generated token, the wall time of each decode step, the tokens, and the forward passes."""
        stamps: list[tuple[bool, float]] = []

        def clock(batch: Batch, tokens: torch.Tensor, logits: torch.Tensor) -> None:
            stamps.append((batch.prefill, time.perf_counter()))  # each pass's tokens were synced before the next

        t = time.perf_counter()
        if arm is not None:
            layers, per_request = arm
            with vec.apply(h, gamma=gammas if per_request else 0.0, layers=layers):
                out = generate(h, prompts, cfg, on_token=clock)
        else:
            out = generate(h, prompts, cfg, on_token=clock)
        if h.device.type == "cuda":
            torch.cuda.synchronize()
        n = sum(len(c.token_ids) for c in out)
        steps = [b - a for (_, a), (prefill, b) in itertools.pairwise(stamps) if not prefill]
        return (time.perf_counter() - t) / n, steps, [c.token_ids for c in out], len(stamps)

    _, _, ref, passes = run(None)  # warm-up, and the tokens every arm must produce
    n = sum(map(len, ref))
    run((list(range(g.n_layers)), True))
    names = list(arms)
    times: dict[str, list[float]] = {k: [] for k in names}
    steps: dict[str, list[float]] = {k: [] for k in names}
    same = dict.fromkeys(names, 0)  # repeats whose tokens equal the warm-up's plain tokens (plain too: determinism)
    for r in range(args.repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            per_token, step_times, ids, _ = run(arms[k])
            times[k].append(per_token)
            steps[k] += step_times
            same[k] += ids == ref
    threads = torch.get_num_threads()
    print(f"model {args.model} on {h.device} ({threads} threads), {len(prompts)} prompts, {n} tokens per run")
    print(
        f"{'arm':40s} {'median ms/tok':>14s} {'min':>8s} {'max':>8s} {'ratio':>7s} {'step ms':>8s} {'ratio':>7s} "
        f"{'same tokens':>11s}"
    )
    ref_med, ref_step = statistics.median(times[names[0]]), statistics.median(steps[names[0]])
    for k in names:
        ts, step = times[k], statistics.median(steps[k])
        med = statistics.median(ts)
        print(
            f"{k:40s} {1e3 * med:14.4f} {1e3 * min(ts):8.4f} {1e3 * max(ts):8.4f} {med / ref_med:7.4f} "
            f"{1e3 * step:8.3f} {step / ref_step:7.4f} {same[k]:>5d} of {args.repeats:<2d}"
        )
    print(
        f"repeats {args.repeats}; same tokens: repeats equal to the first plain run's tokens (plain's own count shows "
        f"run-to-run determinism); step ms: median wall time of a decode step over every step of every repeat "
        f"({len(steps[names[0]])} per arm)"
    )
    width = min(args.batch, len(prompts))
    x = torch.randn(width, 1, g.d_model, device=h.device)
    for label, layers in ((f"layer {args.layer}", [args.layer]), (f"all {g.n_layers} layers", range(g.n_layers))):
        hooks = list(vec.hooks(h, gamma=gammas, layers=list(layers), positions="last").values())
        reps = []
        for _ in range(5):
            steps = [  # one Batch per forward pass, built by the engine anyway: not timed
                Batch(
                    torch.arange(width, device=h.device),
                    torch.zeros(width, 1, dtype=torch.long, device=h.device),
                    torch.zeros(width, dtype=torch.long, device=h.device),
                    False,
                    len(prompts),
                )
                for _ in range(500)
            ]
            if h.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for step in steps:
                with running(step):
                    for hook in hooks:
                        hook(x)
            if h.device.type == "cuda":
                torch.cuda.synchronize()
            reps.append((time.perf_counter() - t) / 500)
        per_token = statistics.median(reps) * passes / n
        print(
            f"hooks alone, {label}: {1e6 * statistics.median(reps):.1f} us per forward pass, {passes} passes for "
            f"{n} tokens: {1e3 * per_token:.4f} ms/token = {per_token / ref_med:.4f} of the plain median"
        )


if __name__ == "__main__":
    main()
