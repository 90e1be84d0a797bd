"""Teacher-forced batches of traces: left-padded ids, prompt lengths, and which positions are scored."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..budget import passes, vocab_size
from .policy import CompressionPolicy


@dataclass
class TraceBatch:
    """Left-padded traces; ``prefill_lengths`` = real prompt tokens (through ``<think>``) per row.

    ``scored[b, p]``: the logits at ``p`` predict a generated token (``input_ids[b, p + 1]``) from a
    decode query that the window can change (real position past ``sink + recent`` and the prompt).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prefill_lengths: torch.Tensor
    scored: torch.Tensor
    traces: list[Any]

    def replicate(self, k: int) -> TraceBatch:
        """The batch repeated ``k`` times along rows (for one gate pattern per copy)."""
        rep = lambda t: t.repeat(k, *([1] * (t.dim() - 1)))  # noqa: E731
        return TraceBatch(
            rep(self.input_ids), rep(self.attention_mask), rep(self.prefill_lengths), rep(self.scored), self.traces * k
        )


def trace_batches(
    handle: Any, traces: Sequence[Any], policy: CompressionPolicy, batch_size: int = 16
) -> list[TraceBatch]:
    """Length-sorted teacher-forced batches of traces that have a think span, at most ``batch_size`` rows whose
    logits fit the logit budget (:mod:`reasonscope.budget`); refuses a window covering them all."""
    usable = [t for t in traces if t.think_span is not None and t.token_ids]
    if not usable:
        raise ValueError("no trace has thinking tokens (think_span); generate traces with a thinking model first")
    longest = max(len(t.token_ids) for t in usable)
    policy.check_context(longest)
    usable.sort(key=lambda t: len(t.token_ids))
    out = []
    for group in passes([len(t.token_ids) for t in usable], vocab_size(handle), batch_size):
        chunk = [usable[i] for i in group]
        ids, mask = handle.left_padded([t.token_ids for t in chunk])
        prefill = torch.tensor([t.think_span[0] for t in chunk])
        rank = mask.cumsum(-1) - 1
        n = mask.sum(-1, keepdim=True)
        scored = mask.bool() & (rank >= prefill[:, None]) & (rank > policy.kept) & (rank < n - 1)
        if policy.prefill == "window":
            scored = mask.bool() & (rank > policy.kept) & (rank < n - 1)
        out.append(TraceBatch(ids, mask, prefill, scored, list(chunk)))
    return out
