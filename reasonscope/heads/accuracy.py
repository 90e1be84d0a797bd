"""Teacher-forced answer accuracy under a head selection, and the exhaustive best subset (small models)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from ..budget import rows_per_pass, vocab_size
from .batches import TraceBatch
from .policy import CompressionPolicy
from .scorers import gated_hidden
from .select import n_full_heads


@torch.no_grad()
def teacher_forced_accuracy(
    handle: Any, batches: Sequence[TraceBatch], full_masks: torch.Tensor, policy: CompressionPolicy
) -> torch.Tensor:
    """Per selection ``[k, L, H_kv]``: fraction of traces that are correct and whose every generated token is
    still the argmax under the compression (so greedy decoding would reproduce the same correct answer)."""
    k = full_masks.shape[0]
    vocab = vocab_size(handle)
    hits, n = torch.zeros(k), 0
    for batch in batches:
        b = len(batch.traces)
        n += b
        per_pass = max(1, rows_per_pass(batch.input_ids.shape[1], vocab) // b)  # selections (batch copies) a pass
        for lo in range(0, k, per_pass):
            masks = full_masks[lo : lo + per_pass]
            rows = batch.replicate(len(masks))
            hidden = gated_hidden(handle, rows, masks.float().repeat_interleave(b, 0), policy)
            ids, mask = rows.input_ids, rows.attention_mask
            rank = mask.cumsum(-1) - 1
            gen = mask.bool() & (rank >= rows.prefill_lengths[:, None] - 1) & (rank < mask.sum(-1, keepdim=True) - 1)
            step = rows_per_pass(len(rows.traces), vocab)  # positions of every row whose logits fit the budget
            runs = range(0, ids.shape[1], step)
            greedy = torch.cat([handle.unembed(hidden[:, a : a + step]).argmax(-1).cpu() for a in runs], 1)
            wrong = (greedy != torch.roll(ids, -1, dims=1)) & gen
            good = torch.tensor([bool(t.grade) for t in rows.traces]) & ~wrong.any(-1)
            hits[lo : lo + len(masks)] += good.view(len(masks), b).float().sum(-1)
    return hits / max(n, 1)


def exhaustive_best(
    handle: Any,
    batches: Sequence[TraceBatch],
    sparsity: float,
    policy: CompressionPolicy,
    max_subsets: int = 5000,
    chunk: int = 16,
) -> tuple[torch.Tensor, float]:
    """Try every set of full heads at ``sparsity``; returns the best mask and its teacher-forced accuracy."""
    g = handle.geometry
    n = g.n_layers * g.n_kv_heads
    k = n_full_heads(n, sparsity)
    subsets = list(itertools.combinations(range(n), k))
    if len(subsets) > max_subsets:
        raise ValueError(
            f"{len(subsets)} subsets of {n} heads at sparsity {sparsity}; exhaustive search is for small "
            f"models (raise max_subsets to {len(subsets)} to force it)"
        )
    best, best_acc = None, -1.0
    for lo in range(0, len(subsets), chunk):
        masks = torch.zeros(len(subsets[lo : lo + chunk]), n, dtype=torch.bool)
        for i, s in enumerate(subsets[lo : lo + chunk]):
            masks[i, list(s)] = True
        masks = masks.view(-1, g.n_layers, g.n_kv_heads)
        acc = teacher_forced_accuracy(handle, batches, masks, policy)
        i = int(acc.argmax())
        if float(acc[i]) > best_acc:
            best, best_acc = masks[i], float(acc[i])
    if best is None:
        raise ValueError("no subset was tried; pass at least one batch of traces")
    return best, best_acc
