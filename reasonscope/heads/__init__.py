"""Reasoning-critical KV heads (issue 9): gated attention, compressed caches, scorers and head maps.

- :func:`gated_attention` / :func:`gated_run`: ``α·full + (1−α)·window`` per KV head on any backend;
- :func:`compressed_cache`: a physically compressed KV cache for memory figures;
- :func:`score_heads` with :class:`HeadConfig` (``window``, ``gate-ig``, ``duo``, ``rlkv``, ``retrieval``)
  writes a :class:`HeadMap` artifact; :func:`select_full_heads` picks heads at a sparsity.
"""

from __future__ import annotations

from .gated import GATED_ATTN, GateState, gated_attention, gated_run
from .headmap import HeadMap, read_tsv
from .physical import HeadwiseCache, compressed_cache, kv_bytes
from .policy import CompressionPolicy
from .score import HeadConfig, score_heads
from .select import random_full_heads, select_full_heads, uniform_full_heads

__all__ = ["GATED_ATTN", "CompressionPolicy", "GateState", "HeadConfig", "HeadMap", "HeadwiseCache",
           "compressed_cache", "gated_attention", "gated_run", "kv_bytes", "random_full_heads", "read_tsv",
           "score_heads", "select_full_heads", "uniform_full_heads"]
