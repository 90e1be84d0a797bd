"""Forced answers (``probe labels --forced``): every cut of a trace shares its prefix, against running each whole.

Usage:
    python bench/forced.py [--organism 100] [--real 4] [--layers 2] [--repeats 3] [--threads 2]

Two workloads, each timed with ``share_prefixes`` on (as shipped) and off (every cut prefilled whole: the reference
of the same run), alternating within each repeat; prints the median seconds and the speed-up, and checks that both
give the same answers:

- ``organism``: ``--organism`` traces of the thinking organism, sampled at temperature 1, cut at every chunk end;
- ``real``: the ``--real`` shortest thought-anchors traces in ../shared/data with at least 4 chunks (R1-distill
  thinking, ~1-3k tokens), cut at every chunk end, on the random-init DeepSeek-R1-Distill-Qwen-1.5B shape with its
  first ``--layers`` blocks (bench/shapes.py; the real tokenizer and width, CPU-sized depth).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # bench/ holds probes.py: import the package, not that script

import torch

from probes.forced import forced_answers

sys.path.append(str(Path(__file__).resolve().parent))  # after the probes package: bench/shapes.py
from shapes import count, count0, random_qwen2

ROOT = Path(__file__).resolve().parents[1]


def _cuts(handle, traces) -> tuple[list, list[list[int]], list[str]]:
    """The traces tokenized, their chunk-end token positions (as ``probe labels`` cuts them) and their matchers."""
    from probes.answers import matcher_for
    from probes.labels import LabelConfig, build_labels
    from reasonscope.traces.segment import segment_trace

    traces = [t if t.token_ids and t.think_span else segment_trace(t, handle.tokenizer) for t in traces]
    table = build_labels(traces, LabelConfig(), tokenizer=handle.tokenizer)
    positions: dict[str, list[int]] = {t.id: [] for t in traces}
    for tid, pos in zip(table.trace_id, table.position):
        positions[tid].append(pos)
    return traces, [positions[t.id] for t in traces], [matcher_for(t, "auto") for t in traces]


def _workloads(args) -> dict[str, tuple]:
    from reasonscope.models import load_model
    from reasonscope.organisms import task
    from reasonscope.traces import load_thought_anchors
    from reasonscope.traces.generate import GenerationConfig, generate_traces

    out = {}
    if args.organism:
        h = load_model("organism:thinking")
        problems = task.problems(args.organism, seed=11)
        traces = generate_traces(
            h,
            [h.chat_prompt(p.question) for p in problems],
            GenerationConfig(max_new_tokens=400, temperature=1.0, seed=11),
            golds=[str(p.answer) for p in problems],
            grader="organism",
        )
        out["organism"] = (h, *_cuts(h, traces))
    if args.real:
        from probes.chunks import chunk_thinking

        h = random_qwen2(layers=args.layers, device="cpu")
        traces = load_thought_anchors(ROOT.parent / "shared" / "data" / "reasoning_traces" / "thought_anchors_math")
        traces = [t for t in traces if len(chunk_thinking(t.thinking)) >= 4]
        traces = sorted(traces, key=lambda t: len(t.thinking))[: args.real]
        out["real"] = (h, *_cuts(h, traces))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--organism", type=count0, default=100, help="organism traces (0: skip)")
    ap.add_argument("--real", type=count0, default=4, help="thought-anchors traces (0: skip)")
    ap.add_argument("--layers", type=count, default=2, help="blocks of the 1.5B shape for the real traces")
    ap.add_argument("--max-new", type=count, default=8, help="tokens decoded after each forced </think>")
    ap.add_argument("--repeats", type=count, default=3)
    ap.add_argument("--threads", type=count, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, (h, traces, cuts, kinds) in _workloads(args).items():
        times: dict[bool, list[float]] = {True: [], False: []}
        answers: dict[bool, list] = {}
        forced_answers(h, traces[:1], cuts[:1], kinds[:1], max_new_tokens=args.max_new)  # warm-up, untimed
        for rep in range(args.repeats):
            for share in (True, False) if rep % 2 == 0 else (False, True):
                t0 = time.perf_counter()
                answers[share] = forced_answers(
                    h, traces, cuts, kinds, max_new_tokens=args.max_new, share_prefixes=share
                )  # type: ignore[arg-type]
                times[share].append(time.perf_counter() - t0)
        cut_tokens = sum(p + 1 for per in cuts for p in per)
        trace_tokens = sum(len(t.token_ids) for t in traces)
        shared, whole = statistics.median(times[True]), statistics.median(times[False])
        rows.append(
            (
                name,
                len(traces),
                sum(map(len, cuts)),
                trace_tokens,
                cut_tokens,
                whole,
                shared,
                whole / shared,
                answers[True] == answers[False],
            )
        )
        print(f"{name}: shared {[round(t, 2) for t in times[True]]} whole {[round(t, 2) for t in times[False]]}")
    print()
    print("| traces | n | cuts | trace tokens | cut tokens (whole) | whole s | shared s | speed-up | same answers |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, n, c, tt, ct, w, s, x, same in rows:
        print(f"| {name} | {n} | {c} | {tt:,} | {ct:,} | {w:.2f} | {s:.2f} | {x:.1f}x | {same} |")


if __name__ == "__main__":
    main()
