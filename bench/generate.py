"""Generation throughput: reasonscope.generation (continuous batching) beside HF ``generate`` (static batches).

Usage:
    python bench/generate.py --shape organism [--problems 500] [--repeats 5] [--batch 64] [--threads 2]   # CPU
    python bench/generate.py --shape 1.5b [--problems 256] [--max-new 2048] [--batch 64]                  # GPU

Both methods decode the same prompts greedily in the same run, alternating repeat by repeat so that load
on the machine hits both alike. Columns: generated tokens per second of wall time (every generated token up
to and including EOS; median, min and max over ``--repeats`` runs) and the median's ratio to HF ``generate``.
HF ``generate`` runs as ``generate_traces`` did: prompts sorted by length, left-padded static batches of
``--batch``, each decoding until its longest row ends. The footer gives the fraction of requests whose
greedy tokens are identical under both methods, and the fraction of HF's decoded row-steps that were real
tokens (the waste continuous batching removes).

Shapes: ``organism`` is the organism eval workload (``organism:thinking`` on the eval problems, chat
prompts, 640 new tokens, fp32 on CPU). ``1.5b`` is a random-init DeepSeek-R1-Distill-Qwen-1.5B / Qwen2-1.5B
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
from pathlib import Path
from typing import Any

import torch

from reasonscope.generation import Batch, DecodeConfig, generate

ROOT = Path(__file__).resolve().parents[1]
QWEN2 = ROOT.parent / "shared" / "data" / "tokenizers" / "qwen2"


def organism_workload(n: int) -> tuple[Any, list[list[int]], int, dict[int, int] | None]:
    from reasonscope.models import load_model
    from reasonscope.organisms import evaluate, task

    h = load_model("organism:thinking")
    prompts = [
        h.tokenizer(h.chat_prompt(p.question), add_special_tokens=False)["input_ids"]
        for p in task.problems(n, evaluate.EVAL_SEED)
    ]
    return h, prompts, 640, None


def random_workload(
    n: int, max_new: int, layers: int | None, device: str
) -> tuple[Any, list[list[int]], int, dict[int, int]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from reasonscope.models import ModelHandle
    from reasonscope.traces.loaders import qwen2_tokenizer

    cfg = AutoConfig.from_pretrained(QWEN2)
    if layers:
        cfg.num_hidden_layers, cfg.layer_types = layers, cfg.layer_types[:layers]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    h = ModelHandle(model=model, tokenizer=qwen2_tokenizer(QWEN2), source="random:qwen2-1.5b", path=str(QWEN2))
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
    h: Any, prompts: list[list[int]], max_new: int, batch: int, eos: int, lengths: dict[int, int] | None
) -> tuple[list[list[int]], int]:
    """Greedy HF ``generate`` in length-sorted left-padded batches; returns outputs and decoded row-steps."""
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
            do_sample=False,
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["organism", "1.5b"], default="organism")
    p.add_argument("--problems", type=int, default=None, help="requests (default: 500 organism, 256 for 1.5b)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per method (median, min, max)")
    p.add_argument("--batch", type=int, default=64, help="HF static batch size = engine slots")
    p.add_argument("--max-new", type=int, default=2048, help="1.5b: longest forced generation")
    p.add_argument("--layers", type=int, default=None, help="1.5b: fewer layers (a quick check of the path)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cuda = a.device == "cuda"
    if a.shape == "organism":
        h, prompts, max_new, lengths = organism_workload(a.problems or 500)
    else:
        h, prompts, max_new, lengths = random_workload(a.problems or 256, a.max_new, a.layers, a.device)
    eos = h.tokenizer.eos_token_id
    cfg = DecodeConfig(max_new_tokens=max_new, batch_size=a.batch, eos_token_ids=(eos,))
    on_token = force_eos_engine(lengths, eos, h.device) if lengths else None
    methods: dict[str, Callable[[], list[list[int]]]] = {
        f"HF generate (static batches of {a.batch}, sorted by prompt length)": lambda: hf_generate(
            h, prompts, max_new, a.batch, eos, lengths
        )[0],
        f"reasonscope.generation ({a.batch} slots, continuous batching)": lambda: [
            c.token_ids for c in generate(h, prompts, cfg, on_token=on_token)
        ],
    }
    warm = prompts[: min(len(prompts), 8)]  # allocator, kernels, lazy imports
    hf_generate(h, warm, 8, a.batch, eos, None)
    generate(h, warm, DecodeConfig(max_new_tokens=8, eos_token_ids=(eos,)))
    rates: dict[str, list[float]] = {m: [] for m in methods}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(a.repeats):
        for name, fn in methods.items():
            out, seconds = timed(fn, cuda)
            outputs[name] = out
            rates[name].append(sum(map(len, out)) / seconds)
            print(f"  {name}: {seconds:.1f}s, {rates[name][-1]:,.0f} tokens/s", file=sys.stderr, flush=True)
    hf_name, engine_name = list(methods)
    _, row_steps = hf_generate(h, prompts, max_new, a.batch, eos, lengths)
    real = sum(map(len, outputs[hf_name]))
    same = sum(x == y for x, y in zip(outputs[hf_name], outputs[engine_name]))
    device = torch.cuda.get_device_name() if cuda else f"CPU, {a.threads} threads"
    base = statistics.median(rates[hf_name])
    print(
        f"\ngeneration benchmark: shape={a.shape} device={device} dtype={h.model.dtype} requests={len(prompts)} "
        f"slots/batch={a.batch} max_new_tokens={max_new} repeats={a.repeats}, greedy"
    )
    print("| method | tokens/s (median) | min | max | x HF generate |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"| {name} | {med:,.0f} | {min(r):,.0f} | {max(r):,.0f} | {med / base:.2f} |")
    print(
        f"\nidentical greedy tokens vs HF generate: {same}/{len(prompts)} ({100 * same / len(prompts):.1f}%); "
        f"HF static batches: {100 * real / row_steps:.1f}% of decoded row-steps are real tokens"
    )


if __name__ == "__main__":
    main()
