"""The KV compression policy: which keys a compressed (streaming) KV head keeps.

A compressed head keeps the first ``sink`` tokens and the ``recent`` tokens before the query
(StreamingLLM / DuoAttention / RLKV, see ``../shared/research/heads.md`` §2): a decode query at real
position ``t`` reads keys ``{j < sink} ∪ {t - recent <= j <= t}``. With ``prefill="full"`` the
prompt is read with full attention and the window applies to generated positions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Prefill = Literal["full", "window"]


@dataclass(frozen=True)
class CompressionPolicy:
    """Sink + recent window of a compressed KV head; defaults are RLKV's evaluation setting (16 + 64)."""

    sink: int = 16
    recent: int = 64
    prefill: Prefill = "full"

    def __post_init__(self) -> None:
        for name in ("sink", "recent"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"CompressionPolicy.{name} must be a non-negative int, got {v!r}")
        if self.sink + self.recent == 0:
            raise ValueError("CompressionPolicy keeps no token (sink = recent = 0); give sink or recent > 0")
        if self.prefill not in ("full", "window"):
            raise ValueError(f"CompressionPolicy.prefill must be 'full' or 'window', got {self.prefill!r}")

    @property
    def kept(self) -> int:
        """Tokens a compressed head holds between decode steps (sink + recent)."""
        return self.sink + self.recent

    def window(self, key_pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """Bool ``[..., q, k]``: key in the sink or the recent window of the query (causality not included).

        ``key_pos`` is ``[..., k]`` and ``query_pos`` ``[..., q]``, both real token positions.
        """
        k, q = key_pos.unsqueeze(-2), query_pos.unsqueeze(-1)
        return (k < self.sink) | (k >= q - self.recent)

    def check_context(self, length: int) -> None:
        """Refuse a window that covers the whole context (nothing would be compressed)."""
        if self.kept + 1 >= length:
            raise ValueError(
                f"the window (sink {self.sink} + recent {self.recent}) covers the whole context of {length} tokens, "
                f"so windowing changes nothing; choose sink + recent well under {length} (e.g. a quarter)"
            )
