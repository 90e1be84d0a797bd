"""Which KV heads keep a full cache at sparsity ``sp``: global ranking, random and uniform-per-layer baselines."""

from __future__ import annotations

import math

import torch


def n_full_heads(n_heads: int, sparsity: float) -> int:
    """Heads kept full at ``sparsity`` (fraction compressed), the compressed count rounded half up (2 heads at 0.25
    and 0.75: 1 and 2 compressed; Python's ``round`` went to the even 0 and 2)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity {sparsity} is outside [0, 1]; it is the fraction of KV heads compressed")
    return n_heads - math.floor(sparsity * n_heads + 0.5)


def select_full_heads(scores: torch.Tensor, sparsity: float, seed: int = 0) -> torch.Tensor:
    """Bool ``[L, H_kv]``: the top heads by score over all layers at once (DuoAttention/RLKV rule, heads.md §2).

    Exact ties are broken at random (``seed``), as the reference code's Uniform(0, 1e-6) noise does for gates in
    [0, 1]; unequal scores keep their order however small they are (windowing-KL scores can be ~1e-7). The count
    is exact (``n_full_heads``) rather than a quantile threshold, so equal sparsities compare equal budgets.
    """
    if bool(scores.isnan().any()):
        bad = [tuple(i) for i in scores.isnan().nonzero().tolist()][:4]
        raise ValueError(f"head scores hold NaN at (layer, kv head) {bad}: re-run the scorer (a NaN would rank first)")
    k = n_full_heads(scores.numel(), sparsity)
    g = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(scores.numel(), generator=g)
    flat = scores.detach().float().cpu().flatten()[shuffled]
    full = torch.zeros(scores.numel(), dtype=torch.bool)
    full[shuffled[flat.argsort(descending=True, stable=True)[:k]]] = True
    return full.view(scores.shape)


def random_full_heads(n_layers: int, n_kv_heads: int, sparsity: float, seed: int) -> torch.Tensor:
    """Baseline: ``n_full_heads`` heads chosen uniformly at random."""
    g = torch.Generator().manual_seed(seed)
    return select_full_heads(torch.rand(n_layers, n_kv_heads, generator=g), sparsity)


def uniform_full_heads(n_layers: int, n_kv_heads: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """Baseline: the same number of full heads in every layer (remainder to the first layers), random within a layer."""
    k = n_full_heads(n_layers * n_kv_heads, sparsity)
    g = torch.Generator().manual_seed(seed)
    full = torch.zeros(n_layers, n_kv_heads, dtype=torch.bool)
    for layer in range(n_layers):
        per = k // n_layers + (1 if layer < k % n_layers else 0)
        full[layer, torch.randperm(n_kv_heads, generator=g)[:per]] = True
    return full
