"""Reasoning-critical KV heads (issue 9): gated attention, compressed caches, scorers and head maps.

- :func:`gated_attention` / :func:`gated_run`: ``α·full + (1−α)·window`` per KV head on any backend;
- :func:`compressed_cache`: a physically compressed KV cache for memory figures;
- :func:`score_heads` with :class:`HeadConfig` (``window``, ``gate-ig``, ``duo``, ``rlkv``, ``retrieval``)
  writes a :class:`HeadMap` artifact; :func:`select_full_heads` picks heads at a sparsity;
- :func:`evaluate_heads` (``heads eval``), :func:`emergent_heads` (``heads diff``), figures in ``.figures``.

Names load on first use (the CLI imports :mod:`reasonscope.heads.cli` without torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .emergent import emergent_heads
    from .evaluate import EvalConfig, evaluate_heads
    from .gated import GATED_ATTN, GateState, gated_attention, gated_run
    from .headmap import HeadMap, read_tsv
    from .physical import HeadwiseCache, compressed_cache, kv_bytes
    from .policy import CompressionPolicy
    from .score import HeadConfig, score_heads
    from .select import random_full_heads, select_full_heads, uniform_full_heads

_WHERE = {
    "emergent_heads": "emergent",
    "EvalConfig": "evaluate",
    "evaluate_heads": "evaluate",
    "GATED_ATTN": "gated",
    "GateState": "gated",
    "gated_attention": "gated",
    "gated_run": "gated",
    "HeadMap": "headmap",
    "read_tsv": "headmap",
    "HeadwiseCache": "physical",
    "compressed_cache": "physical",
    "kv_bytes": "physical",
    "CompressionPolicy": "policy",
    "HeadConfig": "score",
    "score_heads": "score",
    "random_full_heads": "select",
    "select_full_heads": "select",
    "uniform_full_heads": "select",
}
__all__ = [
    "GATED_ATTN",
    "CompressionPolicy",
    "EvalConfig",
    "GateState",
    "HeadConfig",
    "HeadMap",
    "HeadwiseCache",
    "compressed_cache",
    "emergent_heads",
    "evaluate_heads",
    "gated_attention",
    "gated_run",
    "kv_bytes",
    "random_full_heads",
    "read_tsv",
    "score_heads",
    "select_full_heads",
    "uniform_full_heads",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
