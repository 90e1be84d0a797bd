"""Batched generation of reasoning traces (left-padded, greedy or sampled)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .record import Trace


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 32
    seed: int = 0


def split_generation(handle, prompt_ids: list[int], new_ids: list[int], opened_think: bool) -> dict:
    """Cut generated ids into thinking / answer at the think markers; flag a missing ``</think>``."""
    start_id, end_id = handle.think_ids
    eos = handle.tokenizer.eos_token_id
    hit_eos = eos in new_ids
    if hit_eos:
        new_ids = new_ids[: new_ids.index(eos)]
    if not opened_think and start_id is not None and start_id in new_ids[:1]:
        opened_think, new_ids, prompt_ids = True, new_ids[1:], prompt_ids + new_ids[:1]
    n_prompt = len(prompt_ids)
    decode = lambda ids: handle.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    if not opened_think:
        return dict(thinking="", answer=decode(new_ids), token_ids=prompt_ids + new_ids, think_span=None,
                    truncated=not hit_eos)
    if end_id in new_ids:
        k = new_ids.index(end_id)
        return dict(thinking=decode(new_ids[:k]), answer=decode(new_ids[k + 1 :]), token_ids=prompt_ids + new_ids,
                    think_span=(n_prompt, n_prompt + k), truncated=False)
    return dict(thinking=decode(new_ids), answer="", token_ids=prompt_ids + new_ids,
                think_span=(n_prompt, n_prompt + len(new_ids)), truncated=True)


@torch.no_grad()
def generate_traces(
    handle,
    prompts: Sequence[str],
    cfg: GenerationConfig = GenerationConfig(),
    ids: Sequence[str] | None = None,
    golds: Sequence[str | None] | None = None,
    grader: str | None = None,
    source: str = "generated",
    progress: bool = False,
    min_chars: int = 10,
) -> list[Trace]:
    """Generate one trace per prompt (already chat-formatted, e.g. ``handle.chat_prompt(q)``).

    Prompts are sorted by length into batches to limit padding; output order equals input order.
    Thinking traces are segmented (sentences shorter than ``min_chars`` merge into the next) and
    their ``token_ids`` are the tokenization of their text, so spans always index real text
    (``meta["sampled_ids_differ"]`` marks the rare sample that was not the canonical tokenization).
    With ``grader`` and ``golds``, each trace is graded (see :mod:`reasonscope.traces.grading`).
    """
    from .segment import segment_trace

    tok, model = handle.tokenizer, handle.model
    ids = list(ids) if ids is not None else [f"trace-{i}" for i in range(len(prompts))]
    golds = list(golds) if golds is not None else [None] * len(prompts)
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[Trace | None] = [None] * len(prompts)
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="generate", unit="batch")
    sample = cfg.temperature > 0
    for b, idx in enumerate(batches):
        torch.manual_seed(cfg.seed + b)
        width = max(len(encoded[i]) for i in idx)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in idx], device=handle.device)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx],
                            device=handle.device)
        gen = model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens, do_sample=sample,
            temperature=cfg.temperature if sample else None, top_p=cfg.top_p if sample else None, top_k=None,
            pad_token_id=pad, eos_token_id=tok.eos_token_id,
        )
        for row, i in enumerate(idx):
            new = gen[row, width:].tolist()
            opened = prompts[i].rstrip().endswith(handle.think_start)
            parts = split_generation(handle, encoded[i], new, opened)
            t = Trace(id=ids[i], prompt=prompts[i], gold=golds[i], source=source, **parts)
            if t.think_span is not None:
                sampled = t.token_ids
                t.token_ids, t.think_span = [], None
                t = segment_trace(t, tok, min_chars=min_chars)
                t.meta["sampled_ids_differ"] = t.token_ids != sampled
            out[i] = t
    if grader is not None:
        from .grading import GRADERS

        g = GRADERS[grader]
        for t in out:
            if t.gold is not None:
                t.grade = bool(g.is_correct(g.extract(t.answer), t.gold)) if not t.truncated else False
    return out  # type: ignore[return-value]
