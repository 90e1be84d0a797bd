"""The typed reasoning-trace record shared by every stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

THINK_START, THINK_END = "<think>", "</think>"  # the one definition of the think markers


@dataclass
class Segment:
    """A sentence/step of the thinking: ``text`` and its token span ``[start, end)`` in ``Trace.token_ids``."""

    text: str
    start: int
    end: int
    char_start: int = -1  # offsets in ``Trace.thinking``
    char_end: int = -1
    tags: list[str] = field(default_factory=list)


@dataclass
class Trace:
    """prompt + ``<think>`` + thinking + ``</think>`` + answer, with token-level bookkeeping.

    ``token_ids`` is the model's own tokenization of the whole text (prompt included);
    ``think_span`` is the ``[start, end)`` token span of the thinking (between the markers).
    """

    id: str
    prompt: str
    thinking: str
    answer: str
    token_ids: list[int] = field(default_factory=list)
    think_span: tuple[int, int] | None = None
    segments: list[Segment] = field(default_factory=list)
    gold: str | None = None
    grade: bool | None = None
    truncated: bool = False
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trace:
        d = dict(d)
        d["segments"] = [Segment(**s) for s in d.get("segments", [])]
        if d.get("think_span") is not None:
            d["think_span"] = tuple(d["think_span"])
        return cls(**d)
