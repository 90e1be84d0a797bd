"""Ground truth on the organisms: which KV heads read operands back from the question.

Every thinking step names a variable and writes its value (``c7; 3+7=...``), which the model can only
get from the question's definition (``given a3, c7, ...``). At each operand-read position (the
variable token in the thinking, whose next token is the value) we take, per query head, the
full-attention mass on that variable's definition tokens (the variable and its value) in the
question. A KV head's retrieval score is the **max** over the query heads of its group (conventions:
a group is retrieval-critical when any of its query heads retrieves).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..traces.segment import thinking_offset, token_offsets
from .gated import gated_attention
from .policy import CompressionPolicy

_DEFS = re.compile(r"given ((?:[a-p]\d, )*[a-p]\d)\.")
_PAIR = re.compile(r"([a-p])(\d)")


@dataclass(frozen=True)
class Read:
    """One operand read: the query token and the key tokens of the operand's definition."""

    query: int
    keys: tuple[int, ...]


def operand_reads(trace: Any, tokenizer: Any) -> list[Read]:
    """The operand-read positions of an organism trace (empty if its prompt has no ``given ...`` definitions)."""
    _, offsets = token_offsets(trace, tokenizer)
    m = _DEFS.search(trace.prompt)
    if m is None:
        return []

    def token_at(char: int) -> int | None:
        return next((i for i, (s, e) in enumerate(offsets) if s <= char < e), None)

    defs = {}
    for p in _PAIR.finditer(m.group(1)):
        var, val = token_at(m.start(1) + p.start(1)), token_at(m.start(1) + p.start(2))
        if var is not None and val is not None:
            defs[p.group(1)] = tuple(sorted({var, val}))
    off = thinking_offset(trace)
    reads = []
    for p in _PAIR.finditer(trace.thinking):
        if p.group(1) in defs and (p.start() == 0 or not trace.thinking[p.start() - 1].isalpha()):
            q = token_at(off + p.start(1))
            if q is not None and q not in defs[p.group(1)]:
                reads.append(Read(q, defs[p.group(1)]))
    return reads


@torch.no_grad()
def retrieval_scores(handle: Any, traces: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``([L, H_kv] max over the group, [L, H] per query head)``: mean mass of operand reads on definitions."""
    g = handle.geometry
    per_q = torch.zeros(g.n_layers, g.n_heads)
    n = 0
    for t in traces:
        reads = operand_reads(t, handle.tokenizer)
        if not reads:
            continue
        ids = torch.tensor([t.token_ids], device=handle.device)
        with gated_attention(handle, torch.ones(g.n_layers, g.n_kv_heads), CompressionPolicy(), record=True) as state:
            handle.run(ids)
        if len(state.patterns) != g.n_layers:
            raise RuntimeError(
                "attention patterns were not recorded: this backend computes attention itself; "
                "load the model with backend='hf' or 'nnsight' for retrieval scores"
            )
        for layer, p in state.patterns.items():
            for r in reads:
                per_q[layer] += p[0, :, r.query, list(r.keys)].sum(-1).cpu()
        n += len(reads)
    if n == 0:
        raise ValueError("no operand reads found: retrieval scores need organism-task traces (`given a3, c7, ...`)")
    per_q /= n
    return per_q.view(g.n_layers, g.n_kv_heads, g.group_size).amax(-1), per_q
