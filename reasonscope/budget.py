"""How many rows one forward pass may hold: a pass's ``[rows, tokens, vocab]`` logits stay within LOGIT_BUDGET.

On a 150k-token vocabulary the logits, not the activations, are a teacher-forced pass's largest tensors (one
1,000-token row: 0.6 GB in float32, and a loss holds several copies), so every stage that reads whole sequences'
logits groups its rows with :func:`passes` or :func:`rows_per_pass`. Small vocabularies keep their batch sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["CACHE_BUDGET", "LOGIT_BUDGET", "passes", "rows_per_pass", "vocab_size"]

LOGIT_BUDGET = 1 << 27  # logit elements of one pass (rows x tokens x vocab): 512 MiB in float32
CACHE_BUDGET = 1 << 30  # logit elements a stage may keep across passes (a reference model's): 4 GiB in float32


def vocab_size(handle: Any) -> int:
    """Rows of the model's unembedding (the width of its logits)."""
    return int(handle.model.get_output_embeddings().weight.shape[0])


def rows_per_pass(width: int, vocab: int) -> int:
    """Rows of ``width`` tokens whose logits fit LOGIT_BUDGET; at least 1."""
    return max(1, LOGIT_BUDGET // max(1, width * vocab))


def passes(widths: Sequence[int], vocab: int, max_rows: int | None = None) -> list[list[int]]:
    """Indices ``0..n-1`` in order, grouped into passes of at most ``max_rows`` rows whose rows x widest x vocab
    logits fit LOGIT_BUDGET (a row wider than the budget gets a pass of its own)."""
    out: list[list[int]] = []
    widest = 0
    for i, w in enumerate(widths):
        grow = max(widest, w)
        if out and (max_rows is None or len(out[-1]) < max_rows) and (len(out[-1]) + 1) * grow * vocab <= LOGIT_BUDGET:
            out[-1].append(i)
            widest = grow
        else:
            out.append([i])
            widest = w
    return out
