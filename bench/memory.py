"""Peak host memory of the stages that read whole sequences' logits, on a 150k-token vocabulary.

Usage:
    python bench/memory.py [--n 16] [--tokens 512] [--stages window,gate-ig,duo,entropy,extract,kl,hybrid]
    python bench/memory.py --no-reference      # the budgeted runs only (the reference may need > 24 GiB)

A tiny random Qwen2 (2 layers, 32 wide) with the real R1-distill tokenizer (151,665 tokens, ../shared/data) makes
the logits, not the model, what fills memory. Each stage runs in a fresh subprocess on ``--n`` random-token
sequences of about ``--tokens`` tokens and reports its peak RSS and wall time: once as shipped (passes within
``reasonscope.budget.LOGIT_BUDGET``), and once with the budgets lifted (``LOGIT_BUDGET`` and ``CACHE_BUDGET`` set
to 2^62: every pass as large as the stage's batch size allows, reference logits kept), the reference of the same
run. A reference killed for memory shows its exit status. ``--threads`` sets torch's threads in each worker.
What is not a budget shows in both columns: ``run_with_cache`` stopping before the logits (extraction, the KL
bound's norms), gate-IG and RLKV holding one batch's graph, hybrid keeping greedy tokens, not logits, and the
stages reading hidden states (``run_hidden``) whose runs of positions are unembedded one at a time.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # bench/ holds probes.py and steering.py: import the packages, not those scripts

import torch

sys.path.append(str(Path(__file__).resolve().parent))  # after the packages: bench/shapes.py
from shapes import count

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("window", "gate-ig", "duo", "entropy", "extract", "kl", "hybrid")


def _model(path: Path) -> Any:
    from reasonscope.models import load_model
    from reasonscope.organisms.train import OrganismArch, make_model
    from reasonscope.traces import qwen2_tokenizer

    if not (path / "config.json").exists():
        tok = qwen2_tokenizer(ROOT.parent / "shared" / "data" / "tokenizers" / "qwen2")
        torch.manual_seed(0)
        arch = OrganismArch(hidden_size=32, num_hidden_layers=2, intermediate_size=64, max_position_embeddings=4096)
        make_model(len(tok), arch, tok.pad_token_id, tok.eos_token_id).save_pretrained(path)
        tok.save_pretrained(path)
    return load_model(path)


def _worker(stage: str, n: int, tokens: int, model_dir: Path, lifted: bool) -> dict[str, Any]:
    import reasonscope.budget as budget
    from reasonscope.traces.record import Trace

    if lifted:
        budget.LOGIT_BUDGET = budget.CACHE_BUDGET = 1 << 62
    h = _model(model_dir)
    rng = random.Random(0)
    seqs = [[rng.randrange(1000, 50000) for _ in range(tokens - 8 * (i % 3))] for i in range(n)]
    t0 = time.perf_counter()
    if stage in ("window", "gate-ig", "duo"):
        from reasonscope.heads.score import HeadConfig, score_heads

        traces = [Trace(f"t{i}", "q", "x", "a", token_ids=s, think_span=(20, len(s) - 5)) for i, s in enumerate(seqs)]
        score_heads(h, traces, HeadConfig(method=stage, sink=4, recent=16, ig_steps=2, duo_steps=4))  # type: ignore[arg-type]
    elif stage == "entropy":
        from probes.entropy import token_entropies

        token_entropies(h, [Trace(f"t{i}", "q", "x", "a", token_ids=s) for i, s in enumerate(seqs)])
    elif stage in ("extract", "kl"):
        texts = [h.tokenizer.decode(s) for s in seqs]
        if stage == "extract":
            from steering.extract import extract_vector

            extract_vector(h, texts[: n // 2], texts[n // 2 :], [0, 1], "mean")
        else:
            from steering.asc import kl_gamma
            from steering.vector import SteeringVector, VectorMeta

            vec = SteeringVector(torch.randn(1, 32), VectorMeta(d_model=32, layers=(1,)))
            kl_gamma(h, vec, texts, 1, 1e-3)
    else:
        from steering.hybrid import HybridConfig, Rollout, optimise_vectors, sentence_table

        rolls = [Rollout(s[:20], s[20:], [(a, a + 50) for a in range(0, len(s) - 70, 50)], []) for s in seqs]
        table = sentence_table(h, rolls, 1)
        labels = [[-1] * len(r.gen_ids) for r in rolls]
        for k, (i, j) in enumerate(table.owner):
            a, b = rolls[i].spans[j]
            labels[i][a:b] = [k % 3] * (b - a)
        targets = [torch.randint(1000, 50000, (len(r.gen_ids),)) for r in rolls]
        optimise_vectors(h, rolls, labels, targets, 3, HybridConfig(train_steps=2, steer_layer=0, sae_layer=1))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def _run(stage: str, args: argparse.Namespace, lifted: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", stage, "--n", str(args.n), "--tokens", str(args.tokens)]
    cmd += ["--model-dir", str(args.model_dir), "--threads", str(args.threads)] + (["--lifted"] if lifted else [])
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        if p.returncode > 0:  # an error, not a kill (out of memory): show it
            print(f"{stage}{' (budgets lifted)' * lifted} failed:\n{p.stderr[-2000:]}", file=sys.stderr)
        return {"status": f"exit {p.returncode}" + (" (killed)" if p.returncode < 0 else "")}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _cell(r: dict[str, Any]) -> str:
    return f"{r['peak_gb']:.2f} | {r['seconds']:.1f}" if "peak_gb" in r else f"{r['status']} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=count, default=16, help="sequences (traces, texts or rollouts) per stage")
    ap.add_argument("--tokens", type=count, default=512, help="tokens per sequence (about)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--no-reference", action="store_true", help="skip the runs with the budgets lifted")
    ap.add_argument("--threads", type=count, default=2)
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/reasonscope-bench-r1-tiny"))
    ap.add_argument("--worker", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--lifted", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.n < 2 or args.tokens < 96:
        ap.error("--n needs at least 2 sequences (extract splits them in two) and --tokens at least 96")
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.n, args.tokens, args.model_dir, args.lifted)))
        return
    _model(args.model_dir)  # build it once, outside the timed workers
    stages = [s for s in args.stages.split(",") if s]
    bad = sorted(set(stages) - set(STAGES))
    if bad:
        ap.error(f"unknown stage {bad[0]!r}; choose from {', '.join(STAGES)}")
    print(f"{args.n} sequences of ~{args.tokens} tokens, vocabulary 151,665, {args.threads} threads\n")
    print("| stage | budgeted peak GB | s | budgets lifted: peak GB | s | peak ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    ratios, failed = [], 0
    for stage in stages:
        got = _run(stage, args, lifted=False)
        ref = {"status": "not run"} if args.no_reference else _run(stage, args, lifted=True)
        failed += sum(str(r.get("status", "")).startswith("exit") for r in (got, ref))
        cells = [_cell(r) for r in (got, ref)]
        ratio = ref["peak_gb"] / got["peak_gb"] if "peak_gb" in got and "peak_gb" in ref else None
        if ratio is not None:
            ratios.append(ratio)
        print(f"| {stage} | {cells[0]} | {cells[1]} | {'' if ratio is None else f'{ratio:.1f}x'} |", flush=True)
    if ratios:
        print(f"\nmedian peak ratio (lifted / budgeted): {statistics.median(ratios):.1f}x")
    if failed:
        raise SystemExit(f"{failed} run(s) failed (errors above, or killed: out of memory)")


if __name__ == "__main__":
    main()
