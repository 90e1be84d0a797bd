"""Generation under gated attention through :func:`reasonscope.generation.generate`, graded per request.

:func:`gated_rollouts` decodes every prompt with its own gate set (``alpha [requests, L, H_kv]``, read per
batch row through ``current_batch().rows``), so many selections share one continuously batched call.
Rollouts keep the token ids that were sampled (not a re-tokenization of their text), which the RLKV
policy gradient needs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..generation import DecodeConfig, generate
from ..traces.generate import split_generation
from ..traces.grading import get_grader
from .gated import gated_attention
from .policy import CompressionPolicy


@dataclass
class Rollout:
    """One generated sequence: ``token_ids`` = prompt + generated (EOS cut), ``think_span`` over the thinking."""

    prompt: str
    token_ids: list[int]
    think_span: tuple[int, int] | None
    answer: str
    truncated: bool  # never closed ``</think>`` or hit ``max_new_tokens``
    n_generated: int
    gold: str | None = None
    grade: bool | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def think_tokens(self) -> int:
        """Thinking tokens (between ``<think>`` and ``</think>``, or to the end when never closed)."""
        return 0 if self.think_span is None else self.think_span[1] - self.think_span[0]


def gated_rollouts(
    handle: Any,
    prompts: Sequence[str],
    alpha: torch.Tensor,
    policy: CompressionPolicy,
    cfg: DecodeConfig,
    golds: Sequence[str | None] | None = None,
    grader: str = "organism",
) -> tuple[list[Rollout], float]:
    """Generate ``prompts`` (chat-formatted, opening ``<think>``) under gates ``alpha`` ``[L, H_kv]`` or one set per
    prompt ``[len(prompts), L, H_kv]``; returns the graded rollouts and the wall seconds of generation."""
    g = handle.geometry
    if alpha.dim() == 2:
        alpha = alpha.expand(len(prompts), *alpha.shape)
    if alpha.shape[0] != len(prompts):
        raise ValueError(f"{alpha.shape[0]} gate sets for {len(prompts)} prompts; give one per prompt or one for all")
    golds = list(golds) if golds is not None else [None] * len(prompts)
    if len(golds) != len(prompts):
        raise ValueError(f"{len(golds)} golds for {len(prompts)} prompts; give one gold per prompt")
    grade = get_grader(grader)
    tok = handle.tokenizer
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    t0 = time.perf_counter()
    with gated_attention(handle, alpha.float().reshape(-1, g.n_layers, g.n_kv_heads), policy, per_request=True):
        completions = generate(handle, encoded, cfg)
    seconds = time.perf_counter() - t0
    out = []
    for prompt, ids, c, gold in zip(prompts, encoded, completions, golds):
        opened = prompt.rstrip().endswith(handle.think_start)
        parts = split_generation(handle, ids, c.token_ids, opened)
        truncated = bool(parts["truncated"]) or c.finish_reason == "length"
        r = Rollout(prompt, parts["token_ids"], parts["think_span"], parts["answer"], truncated, len(c.token_ids), gold)
        if gold is not None:
            r.grade = not truncated and bool(grade.is_correct(grade.extract(r.answer), gold))
        out.append(r)
    return out, seconds
