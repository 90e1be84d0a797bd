"""Generation throughput: reasonscope.generation (continuous batching) beside HF ``generate`` (static batches).

Usage:
    python bench/generate.py --shape organism [--problems 500] [--repeats 5] [--batch 64] [--threads 2]  # CPU
    python bench/generate.py --shape organism-eval [--problems 500] [--repeats 3] [--batch 32 64 128]    # CPU
    python bench/generate.py --shape 1.5b [--problems 256] [--max-new 2048] [--batch 64]                 # GPU

Both methods decode the same prompts (greedily, or by pure sampling at the same temperature) in the same
run, alternating call by call (and which goes first, repeat by repeat) so that load on the machine hits both
alike. Sampled calls draw different random streams in the two methods, so their lengths (and padding) differ.
Columns: generated tokens (every one up to and including EOS) per second of the calls' summed wall time;
median, min and max over ``--repeats`` runs, and the median's ratio to HF ``generate``.
HF ``generate`` runs as ``generate_traces`` did: prompts sorted by length, left-padded static batches of
``--batch``, each decoding until its longest row ends. The footer gives the fraction of requests whose
greedy tokens are identical under both methods, and the fraction of HF's decoded row-steps that were real
tokens (the waste continuous batching removes). ``--batch 32 64 128`` runs both methods at each B and also
compares each at its best B; ``--span-groups 4 1`` adds the engine with one key span for all rows (no grouping,
see reasonscope.generation) as a further row.

Shapes: ``organism`` is the greedy thinking part of the organism eval (``organism:thinking`` on the eval
problems, chat prompts, ``organism eval``'s 1,024 new tokens, fp32 on CPU). ``organism-eval`` is every
generation call that ``reasonscope organism eval`` makes: the thinking organism greedy and at temperature 1
(seed 1), the base greedy on chat prompts and on ``{question} notes:`` prompts; sampled tokens differ between
the two methods (different random streams), so only the greedy calls count towards the identical-tokens
footer.
``1.5b`` is a random-init DeepSeek-R1-Distill-Qwen-1.5B / Qwen2-1.5B
(config from ../shared/data/tokenizers/qwen2, bf16 on CUDA) on random prompts of 32-512 tokens; random
weights never stop, so each request is forced to end (EOS) at a length drawn log-uniformly from
``--max-new``/16 to ``--max-new`` (a tenfold spread, as reasoning traces have), identically in both methods.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from shapes import count, random_qwen2

from reasonscope import generation
from reasonscope.generation import Batch, DecodeConfig, generate
from reasonscope.organisms.evaluate import EvalConfig


def organism_eval_workload(n: int, device: str) -> list[Part]:
    """Every generation ``reasonscope organism eval`` makes: the thinking organism greedy and at temperature 1
    (seed 1) on chat prompts, the base greedy on chat prompts and on ``{question} notes:`` prompts."""
    from reasonscope.models import load_model
    from reasonscope.organisms import evaluate, task

    thinking, base = load_model("organism:thinking", device=device), load_model("organism:base", device=device)
    problems = task.problems(n, evaluate.EVAL_SEED)
    tok = thinking.tokenizer

    def ids(texts: list[str]) -> list[list[int]]:
        return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    chat = ids([thinking.chat_prompt(p.question) for p in problems])  # ends with <think>
    base_chat = ids([base.chat_prompt(p.question) for p in problems])  # the base's own template, as the eval's
    notes = ids([task.notes_prompt(p) for p in problems])
    return [
        Part("thinking, greedy", thinking, chat, 0.0, 0),
        Part("thinking, temperature 1", thinking, chat, 1.0, 1),
        Part("base, greedy", base, base_chat, 0.0, 0),
        Part("base, notes prompt, greedy", base, notes, 0.0, 0),
    ]


@dataclass
class Part:
    """One generation call of a workload: model, prompts, temperature and sampling seed."""

    name: str
    handle: Any
    prompts: list[list[int]]
    temperature: float
    seed: int
    lengths: dict[int, int] | None = None  # forced EOS after lengths[i] tokens (random weights never stop)


def random_workload(
    n: int, max_new: int, layers: int | None, device: str
) -> tuple[Any, list[list[int]], int, dict[int, int]]:
    h = random_qwen2(layers, device)
    rng = random.Random(0)
    prompts = [[rng.randrange(150000) for _ in range(rng.randint(32, 512))] for _ in range(n)]
    lengths = {i: int(math.exp(rng.uniform(math.log(max(1, max_new // 16)), math.log(max_new)))) for i in range(n)}
    return h, prompts, max_new, lengths


def force_eos_engine(lengths: dict[int, int], eos: int, device: torch.device) -> Callable:
    limit = torch.tensor([lengths[i] for i in range(len(lengths))], device=device)

    def on_token(batch: Batch, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return torch.where(batch.n_generated + 1 >= limit[batch.rows], torch.full_like(tokens, eos), tokens)

    return on_token


class ForceEosHF:
    """HF logits processor: row ``i`` of the batch must emit EOS as its ``limits[i]``-th token."""

    def __init__(self, limits: list[int], width: int, eos: int, device: torch.device):
        self.limits, self.width, self.eos = torch.tensor(limits, device=device), width, eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        hit = input_ids.shape[1] - self.width + 1 >= self.limits
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.eos] = 0
        return torch.where(hit[:, None], forced, scores)


def hf_generate(
    h: Any,
    prompts: list[list[int]],
    max_new: int,
    batch: int,
    eos: int,
    lengths: dict[int, int] | None,
    temperature: float = 0.0,
) -> tuple[list[list[int]], int]:
    """HF ``generate`` in length-sorted left-padded batches (greedy, or pure sampling at ``temperature``);
    returns outputs and decoded row-steps."""
    from transformers import LogitsProcessorList

    pad = h.tokenizer.pad_token_id if h.tokenizer.pad_token_id is not None else eos
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    row_steps = 0
    for b in range(0, len(order), batch):
        idx = order[b : b + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx], device=h.device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=h.device)
        procs = LogitsProcessorList([ForceEosHF([lengths[i] for i in idx], width, eos, h.device)] if lengths else [])
        gen = h.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            **(
                {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
                if temperature > 0
                else {"do_sample": False}
            ),
            eos_token_id=eos,
            pad_token_id=pad,
            logits_processor=procs,
        )
        row_steps += len(idx) * (gen.shape[1] - width)
        for row, i in enumerate(idx):
            new = gen[row, width:].tolist()
            out[i] = new[: new.index(eos) + 1] if eos in new else new
    return out, row_steps


def timed(fn: Callable[[], Any], cuda: bool) -> tuple[Any, float]:
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    res = fn()
    if cuda:
        torch.cuda.synchronize()
    return res, time.perf_counter() - t


def run_hf(part: Part, max_new: int, batch: int) -> tuple[list[list[int]], int]:
    eos = part.handle.tokenizer.eos_token_id
    torch.manual_seed(part.seed)  # sampled lengths (and so HF's padding waste) alike in every repeat
    return hf_generate(part.handle, part.prompts, max_new, batch, eos, part.lengths, part.temperature)


def run_engine(part: Part, max_new: int, batch: int, span_groups: int = generation.SPAN_GROUPS) -> list[list[int]]:
    generation.SPAN_GROUPS = span_groups
    eos = part.handle.tokenizer.eos_token_id
    cfg = DecodeConfig(
        max_new_tokens=max_new,
        batch_size=batch,
        eos_token_ids=(eos,),
        temperature=part.temperature,
        seed=part.seed,
    )
    on_token = force_eos_engine(part.lengths, eos, part.handle.device) if part.lengths else None
    return [c.token_ids for c in generate(part.handle, part.prompts, cfg, on_token=on_token)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["organism", "organism-eval", "1.5b"], default="organism")
    p.add_argument("--problems", type=count, default=None, help="problems (default: 500 organism, 256 for 1.5b)")
    p.add_argument("--repeats", type=count, default=5, help="timed runs per method (median, min, max)")
    p.add_argument("--batch", type=count, nargs="+", default=[64], help="HF static batch sizes = engine slots (a grid)")
    p.add_argument("--max-new", type=count, default=2048, help="1.5b: longest forced generation")
    p.add_argument("--layers", type=count, default=None, help="1.5b: fewer layers (a quick check of the path)")
    p.add_argument(
        "--span-groups",
        type=count,
        nargs="+",
        default=[generation.SPAN_GROUPS],
        help="row groups of the engine's decode attention on CPU (1: every row reads the longest row's keys; CUDA "
        "always uses 1); more values add engine rows to the table",
    )
    p.add_argument("--threads", type=count, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    torch.set_num_threads(a.threads)
    cuda = a.device == "cuda"
    if a.shape in ("organism", "organism-eval"):
        n = 500 if a.problems is None else a.problems
        parts, max_new = organism_eval_workload(n, a.device), EvalConfig().max_new_tokens
        parts = parts[:1] if a.shape == "organism" else parts  # organism: the greedy thinking call alone
    else:
        n = 256 if a.problems is None else a.problems
        h, prompts, max_new, lengths = random_workload(n, a.max_new, a.layers, a.device)
        parts = [Part("random weights, forced lengths", h, prompts, 0.0, 0, lengths)]
    runners: dict[str, Callable] = {"HF generate": run_hf}
    for g in a.span_groups:
        extra = f", {g} span group{'s' * (g > 1)}" if g != a.span_groups[0] else ""
        name = "reasonscope.generation" + extra
        runners[name] = partial(run_engine, span_groups=g)
    for part in parts:  # allocator, kernels, lazy imports
        warm = Part(part.name, part.handle, part.prompts[:8], part.temperature, part.seed)
        for run in runners.values():
            run(warm, 8, a.batch[0])
    seconds: dict[tuple[str, int, str], list[float]] = {}
    outputs: dict[tuple[str, int, str], list[list[int]]] = {}
    row_steps: dict[tuple[int, str], int] = {}
    for rep in range(a.repeats):
        for b in a.batch:
            for part in parts:
                order = list(runners.items())
                for name, run in order[::-1] if rep % 2 else order:  # alternate which method runs first
                    res, t = timed(partial(run, part, max_new, b), cuda)
                    if name == "HF generate":
                        res, row_steps[b, part.name] = res
                    outputs[name, b, part.name] = res
                    seconds.setdefault((name, b, part.name), []).append(t)
                    rate = sum(map(len, res)) / t
                    print(f"  {part.name} | {name} @{b}: {t:.1f}s, {rate:,.0f} tokens/s", file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {a.threads} threads"
    print(
        f"\ngeneration benchmark: shape={a.shape} device={device} dtype={parts[0].handle.model.dtype} "
        f"problems={len(parts[0].prompts)} generation calls={len(parts)} max_new_tokens={max_new} repeats={a.repeats}"
    )
    print("HF generate: static batches of B, sorted by prompt length; reasonscope.generation: B slots, continuous")
    print("batching. tokens/s: generated tokens (up to and including EOS) of every call over the summed wall time of")
    print("the calls; median, min and max over the repeats; x HF best: the median's ratio to HF generate's best B")
    rates: dict[tuple[str, int], float] = {}
    table = []
    for name in runners:
        for b in a.batch:
            n = sum(sum(map(len, outputs[name, b, part.name])) for part in parts)
            runs = [n / sum(seconds[name, b, part.name][r] for part in parts) for r in range(a.repeats)]
            rates[name, b] = statistics.median(runs)
            table.append((name, b, min(runs), max(runs)))
    hf_b = max(a.batch, key=lambda b: rates["HF generate", b])
    ours_b = max(a.batch, key=lambda b: rates["reasonscope.generation", b])
    print("| method | B | tokens/s (median) | min | max | x HF best | x HF at this B |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, b, lo, hi in table:
        r = rates[name, b]
        print(
            f"| {name} | {b} | {r:,.0f} | {lo:,.0f} | {hi:,.0f} | {r / rates['HF generate', hf_b]:.2f} | "
            f"{r / rates['HF generate', b]:.2f} |"
        )
    print(
        f"\nbest of each: reasonscope.generation at B={ours_b} over HF generate at B={hf_b}: "
        f"{rates['reasonscope.generation', ours_b] / rates['HF generate', hf_b]:.2f}x"
    )
    if len(parts) > 1:
        print(
            f"\n| generation call (HF at B={hf_b}, ours at B={ours_b}) | tokens | HF real row-steps | HF s (median) "
            "| ours s (median) | x HF |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for part in parts:
            hs = statistics.median(seconds["HF generate", hf_b, part.name])
            es = statistics.median(seconds["reasonscope.generation", ours_b, part.name])
            real = 100 * sum(map(len, outputs["HF generate", hf_b, part.name])) / row_steps[hf_b, part.name]
            tokens = sum(map(len, outputs["reasonscope.generation", ours_b, part.name]))
            print(f"| {part.name} | {tokens:,} | {real:.1f}% | {hs:.2f} | {es:.2f} | {hs / es:.2f} |")
    greedy = [part for part in parts if part.temperature == 0]
    n_greedy = sum(len(part.prompts) for part in greedy)
    for b in a.batch:
        same = sum(
            x == y
            for part in greedy
            for x, y in zip(outputs["HF generate", b, part.name], outputs["reasonscope.generation", b, part.name])
        )
        hf_tokens = sum(sum(map(len, outputs["HF generate", b, part.name])) for part in parts)
        real = hf_tokens / sum(row_steps[b, part.name] for part in parts)
        print(
            f"B={b}: identical greedy tokens vs HF generate {same}/{n_greedy} ({100 * same / n_greedy:.1f}%) over the "
            f"greedy calls; HF static batches: {100 * real:.1f}% of decoded row-steps are real tokens"
        )


if __name__ == "__main__":
    main()
