"""A physically compressed KV cache: full KV heads keep every token, compressed ones sink + recent only.

For real memory figures (DuoAttention/RLKV deployment, ``../shared/research/heads.md`` §9.4): keys are
cached after RoPE, so dropping entries leaves positions intact. Each layer returns :class:`SplitKV`
to the gated attention function, which must be installed (:func:`compressed_cache` does both).
Rows must be unpadded (one sequence, or equal-length prompts).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .gated import GateState, SplitKV, gated_attention
from .policy import CompressionPolicy


class HeadwiseLayer(CacheLayerMixin):
    """One layer: ``full_k/v [b, n_full, T, d]`` and ``stream_k/v [b, n_stream, <= sink + recent, d]``."""

    is_sliding = False
    is_compileable = False

    def __init__(self, full: torch.Tensor, policy: CompressionPolicy) -> None:
        super().__init__()
        self.full_heads = [int(j) for j in torch.nonzero(full).flatten()]
        self.stream_heads = [int(j) for j in torch.nonzero(~full).flatten()]
        self.policy = policy
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, _, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device

        def empty(n: int) -> torch.Tensor:
            return key_states.new_zeros(b, n, 0, d)

        self.full_k, self.full_v = empty(len(self.full_heads)), empty(len(self.full_heads))
        self.stream_k, self.stream_v = empty(len(self.stream_heads)), empty(len(self.stream_heads))
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(  # type: ignore[override]
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[SplitKV, SplitKV]:
        """Append the new tokens; returns the layer's :class:`SplitKV` twice (as keys and as values)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        new_pos = torch.arange(self.length, self.length + q, device=self.device)
        self.length += q
        f, s = self.full_heads, self.stream_heads
        self.full_k = torch.cat([self.full_k, key_states[:, f]], 2)
        self.full_v = torch.cat([self.full_v, value_states[:, f]], 2)
        sk = torch.cat([self.stream_k, key_states[:, s]], 2)
        sv = torch.cat([self.stream_v, value_states[:, s]], 2)
        pos = torch.cat([self.positions, new_pos])
        kv = SplitKV(f, s, self.full_k, self.full_v, sk, sv, pos)
        keep = (pos < self.policy.sink) | (pos >= self.length - self.policy.recent)  # what the next query reads
        self.stream_k, self.stream_v, self.positions = sk[:, :, keep], sv[:, :, keep], pos[keep]
        return kv, kv

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.full_k, self.full_v, self.stream_k, self.stream_v))


class HeadwiseCache(Cache):
    """Per-layer :class:`HeadwiseLayer` for a full-head mask ``[L, H_kv]`` (True = keep full)."""

    def __init__(self, full_mask: torch.Tensor, policy: CompressionPolicy) -> None:
        self.headwise = [HeadwiseLayer(row.bool(), policy) for row in full_mask]
        super().__init__(layers=list(self.headwise))

    def nbytes(self) -> int:
        """Bytes of keys and values held now."""
        return sum(layer.nbytes() for layer in self.headwise)


def kv_bytes(
    full_mask: torch.Tensor,
    length: int,
    policy: CompressionPolicy,
    head_dim: int,
    batch: int = 1,
    bytes_per_value: int = 2,
) -> int:
    """KV-cache bytes after ``length`` tokens: ``2·d·b·Σ_layers(n_full·T + n_stream·min(T, S+R))`` (heads.md §9.4)."""
    n_full = int(full_mask.sum())
    n_stream = full_mask.numel() - n_full
    return 2 * head_dim * bytes_per_value * batch * (n_full * length + n_stream * min(length, policy.kept))


@contextmanager
def compressed_cache(
    handle: Any, full_mask: torch.Tensor, policy: CompressionPolicy = CompressionPolicy()
) -> Iterator[tuple[HeadwiseCache, GateState]]:
    """Yield a fresh :class:`HeadwiseCache` with the gated attention installed (pass the cache to the model through
    :func:`reasonscope.models.cache_kwargs`)."""
    g = handle.geometry
    if tuple(full_mask.shape) != (g.n_layers, g.n_kv_heads):
        raise ValueError(
            f"full_mask has shape {tuple(full_mask.shape)}; this model needs [{g.n_layers}, "
            f"{g.n_kv_heads}] (layers x KV heads)"
        )
    full_mask = full_mask.bool().cpu()
    with gated_attention(handle, full_mask.float(), policy) as state:
        yield HeadwiseCache(full_mask, policy), state
