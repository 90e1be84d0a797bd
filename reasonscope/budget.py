"""How many rows one forward pass may hold: a pass's ``[rows, tokens, vocab]`` logits stay within LOGIT_BUDGET.

On a 150k-token vocabulary the logits, not the activations, are a teacher-forced pass's largest tensors (one
1,000-token row: 0.6 GB in float32, and a loss holds several copies), so every stage that reads whole sequences'
logits groups its rows with :func:`passes` or :func:`rows_per_pass`, and a stage that reads a long row through its
hidden states unembeds it a run of positions at a time (:func:`position_runs`, :func:`sum_by_runs` where a loss
needs gradients). Small vocabularies keep their batch sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

__all__ = [
    "CACHE_BUDGET",
    "LOGIT_BUDGET",
    "passes",
    "position_runs",
    "rows_per_pass",
    "sum_by_runs",
    "vocab_size",
]

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


def position_runs(where: torch.Tensor, vocab: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Index tuples of the positions at ``where`` (a boolean mask, or listed positions of a ``[pos, ...]`` tensor), a
    run at a time: as many positions as fit the logit budget as float32 logits."""
    index = where.nonzero(as_tuple=True) if where.dtype == torch.bool else (where,)
    step = rows_per_pass(1, vocab)
    for a in range(0, len(index[0]), step):
        yield tuple(i[a : a + step] for i in index)


def sum_by_runs(
    hidden: torch.Tensor, where: torch.Tensor, n_vocab: int, part: Callable[[torch.Tensor, tuple], torch.Tensor]
) -> torch.Tensor:
    """``Σ part(hidden[at], at)`` over runs of the positions at ``where``, each run's logits freed before the next.

    Each run's gradient with respect to a detached copy of ``hidden`` is taken as soon as the run is computed (and
    only that one: weights ``part`` reads, e.g. the unembedding, get no ``.grad``); the result carries the sum of
    them to ``hidden``'s graph (value: the sum; gradient: the sum's), so autograd never holds more than one run's
    ``[positions, vocab]`` tensors."""
    leaf = hidden.detach().requires_grad_(hidden.requires_grad)
    total, grad = 0.0, None
    for at in position_runs(where, n_vocab):
        piece = part(leaf[at], at)
        if leaf.requires_grad:
            (g,) = torch.autograd.grad(piece, leaf, allow_unused=True)
            if g is not None:
                grad = g if grad is None else grad.add_(g)
        total += float(piece.detach())
    out = torch.tensor(total, device=hidden.device)
    if grad is not None:
        out = out + (hidden * grad).sum() - (hidden.detach() * grad).sum()
    return out
