"""Ground truth on the organisms: which KV heads read operands back from the question.

Every thinking step names a variable and writes its value (``c7; 3+7=...``). Both come from the question
(``given a3, c7, .... what is a + c - f?``), through two reads:

- **value** (the retrieval score): at the variable token in the thinking, whose next token is the value, the
  attention mass on that variable's definition tokens (the variable and its value);
- **name**: at the token before a variable's mention, whose next token is the name, the attention mass on that
  variable in the question's chain (mentions within :data:`RECENT` tokens of the same name are skipped: the name
  can be copied from nearby).

Per query head we average the mass over reads; a KV head's score is the **max** over the query heads of its
group (conventions: a group is retrieval-critical when any of its query heads retrieves).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..traces.segment import thinking_offset, token_offsets
from .gated import gated_attention
from .policy import CompressionPolicy

_DEFS = re.compile(r"given ((?:[a-p]\d, )*[a-p]\d)\.")
_PAIR = re.compile(r"([a-p])(\d)")
_CHAIN = re.compile(r"what is ([a-p](?: [+-] [a-p])*)\?")
_NAME = re.compile(r"(?<![a-z])([a-p])(?![a-z])")
_NO_READS = "no operand reads found: retrieval scores need organism-task traces (`given a3, c7, ... what is a + c?`)"
RECENT = 8  # tokens: a name mentioned this recently may be copied from the thinking, not read from the question


@dataclass(frozen=True)
class Read:
    """One operand read: the query token and the key tokens of the operand's definition."""

    query: int
    keys: tuple[int, ...]


def _locate(trace: Any, tokenizer: Any, pattern: re.Pattern) -> tuple[re.Match, Callable[[int], int | None]] | None:
    """``pattern``'s match in the prompt and a lookup from a character of the full text to its token (None: no
    match)."""
    m = pattern.search(trace.prompt)
    if m is None:
        return None
    _, offsets = token_offsets(trace, tokenizer)

    def token_at(char: int) -> int | None:
        return next((i for i, (s, e) in enumerate(offsets) if s <= char < e), None)

    return m, token_at


def operand_reads(trace: Any, tokenizer: Any) -> list[Read]:
    """The value reads of an organism trace (empty if its prompt has no ``given ...`` definitions)."""
    found = _locate(trace, tokenizer, _DEFS)
    if found is None:
        return []
    m, token_at = found
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


def name_reads(trace: Any, tokenizer: Any) -> list[Read]:
    """The name reads of an organism trace (empty if its prompt has no ``what is a + c ...?`` chain)."""
    found = _locate(trace, tokenizer, _CHAIN)
    if found is None:
        return []
    m, token_at = found
    chain = {p.group(1): token_at(m.start(1) + p.start(1)) for p in _NAME.finditer(m.group(1))}
    off = thinking_offset(trace)
    reads: list[Read] = []
    last: dict[str, int] = {}  # token of each name's latest mention in the thinking
    for p in _NAME.finditer(trace.thinking):
        name, tok = p.group(1), token_at(off + p.start(1))
        key = chain.get(name)
        if tok is None or key is None:
            continue
        if tok - last.get(name, -RECENT - 1) > RECENT and tok - 1 > key:
            reads.append(Read(tok - 1, (key,)))
        last[name] = tok
    return reads


READS = {"value": operand_reads, "name": name_reads}


@torch.no_grad()
def read_scores(handle: Any, traces: Sequence[Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per read kind (:data:`READS`): ``([L, H_kv] max over the group, [L, H] per query head)``, the mean
    attention mass of those reads on their keys in the question. One forward pass per trace."""
    g = handle.geometry
    per_q = {kind: torch.zeros(g.n_layers, g.n_heads) for kind in READS}
    n = dict.fromkeys(READS, 0)
    for t in traces:
        reads = {kind: fn(t, handle.tokenizer) for kind, fn in READS.items()}
        if not any(reads.values()):
            continue
        ids = torch.tensor([t.token_ids], device=handle.device)
        with gated_attention(handle, torch.ones(g.n_layers, g.n_kv_heads), CompressionPolicy(), record=True) as state:
            handle.run_hidden(ids)  # the patterns only: no logits
        if len(state.patterns) != g.n_layers:
            raise RuntimeError(
                "attention patterns were not recorded: this backend computes attention itself; "
                "load the model with backend='hf' or 'nnsight' for retrieval scores"
            )
        for kind, rs in reads.items():
            for layer, p in state.patterns.items():
                for r in rs:
                    per_q[kind][layer] += p[0, :, r.query, list(r.keys)].sum(-1).cpu()
            n[kind] += len(rs)
    if not any(n.values()):
        raise ValueError(_NO_READS)
    return {
        kind: ((q := per_q[kind] / n[kind]).view(g.n_layers, g.n_kv_heads, g.group_size).amax(-1), q)
        for kind in READS
        if n[kind]
    }


def retrieval_scores(handle: Any, traces: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``([L, H_kv] max over the group, [L, H] per query head)``: mean mass of value reads on definitions."""
    scores = read_scores(handle, traces)
    if "value" not in scores:
        raise ValueError(_NO_READS)
    return scores["value"]
