"""Split thinking into sentences/steps and map them onto token spans.

Splitting rules (chosen to reproduce the Thought Anchors chunking of R1 traces):

* a sentence ends after ``.``, ``?`` or ``!`` directly followed by a space or newline, so
  decimals (``3.5``), ``\\frac{1}{2}.5`` or ``e.g.x`` never split;
* a paragraph break (``\\n\\n``) always ends a segment; a line holding only spaces does not;
* pieces are stripped of surrounding whitespace and empty ones dropped;
* a piece shorter than ``min_chars`` characters (an enumeration marker ``"1."``, ``"So,"``,
  a bare ``"1 + 3 = 4"``) is merged into the following piece, or into the previous one
  when it is the last.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import replace
from typing import Any

from .record import THINK_END, THINK_START, Segment, Trace

_BOUNDARY = re.compile(r"[.?!](?=[ \r\n])|\r?\n\r?\n")


def split_sentences(text: str, min_chars: int = 10) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the sentences/steps of ``text`` (no edge whitespace)."""
    pieces: list[tuple[int, int]] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        is_punct = m.group()[0] in ".?!"
        pieces.append((start, m.end() if is_punct else m.start()))
        start = m.end()
    pieces.append((start, len(text)))

    stripped = []
    for a, b in pieces:
        piece = text[a:b]
        if piece.strip():
            stripped.append((a + len(piece) - len(piece.lstrip()), a + len(piece.rstrip())))

    spans: list[tuple[int, int]] = []
    carry: int | None = None  # start of short pieces waiting to be merged forward
    for a, b in stripped:
        a = a if carry is None else carry
        if b - a < min_chars:
            carry = a
            continue
        carry = None
        spans.append((a, b))
    if carry is not None:  # short tail: merge backward (or keep it if it is all there is)
        end = stripped[-1][1]
        spans[-1:] = [(spans[-1][0], end)] if spans else [(carry, end)]
    return spans


def full_text(trace: Trace) -> str:
    """The text whose tokenization is ``trace.token_ids``.

    ``prompt + thinking + "</think>" + answer`` when the prompt already ends with ``<think>``
    (optionally followed by whitespace; the R1 convention is ``"...<think>\\n"``), otherwise
    ``prompt + "<think>" + thinking + "</think>" + answer``. A truncated trace with no answer
    never closed its thinking, so ``"</think>"`` is left out.
    """
    opener = "" if trace.prompt.rstrip().endswith(THINK_START) else THINK_START
    closer = "" if trace.truncated and not trace.answer else THINK_END
    return trace.prompt + opener + trace.thinking + closer + trace.answer


def thinking_offset(trace: Trace) -> int:
    """Character offset of ``trace.thinking`` inside ``full_text(trace)``."""
    return len(trace.prompt) + (0 if trace.prompt.rstrip().endswith(THINK_START) else len(THINK_START))


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def token_offsets(trace: Trace, tokenizer: Any) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and their character spans in ``full_text(trace)``.

    With empty ``trace.token_ids`` the text is tokenized as the tokenizer does by default
    (special tokens such as a BOS included), except that a text already opening with the BOS (an R1 chat
    template writes it) gets no second one. Otherwise ``trace.token_ids`` must be a
    tokenization of ``full_text`` with or without special tokens; anything else (e.g. a
    non-canonical tokenization sampled by a model) raises ``ValueError``.
    """
    text = full_text(trace)
    bos = getattr(tokenizer, "bos_token", None)
    ids, offsets = _encode(tokenizer, text, add_special_tokens=not (bos and text.startswith(bos)))
    if not trace.token_ids or list(trace.token_ids) == ids:
        return ids, offsets
    ids2, offsets2 = _encode(tokenizer, text, add_special_tokens=False)
    if list(trace.token_ids) == ids2:
        return ids2, offsets2
    raise ValueError(
        f"trace {trace.id!r}: token_ids ({len(trace.token_ids)}) are not the tokenizer's "
        f"tokenization of full_text(trace) ({len(ids)} tokens); cannot map segments to tokens: segment with the "
        "tokenizer that wrote the ids, or clear them (token_ids=[], think_span=None) to tokenize the text again"
    )


def _content_start(text: str, start: int, end: int) -> int | None:
    """Position of the first non-whitespace character of ``text[start:end]`` (None if none)."""
    for i in range(start, end):
        if not text[i].isspace():
            return i
    return None


def segment_trace(trace: Trace, tokenizer: Any, min_chars: int = 10) -> Trace:
    """Return a copy of ``trace`` with ``segments`` filled (and ``token_ids``/``think_span`` if missing; a trace
    without ``token_ids`` gets the ``think_span`` of its new tokenization, whatever span it carried).

    A token belongs to the segment whose character span contains the token's first
    non-whitespace character, so ``" The"`` joins the sentence it starts and ``".\\n\\n"``
    the sentence it ends; whitespace-only tokens and special tokens belong to no segment.
    """
    text = full_text(trace)
    ids, offsets = token_offsets(trace, tokenizer)
    off = thinking_offset(trace)
    think_end = off + len(trace.thinking)
    starts = [s for s, _ in offsets]
    think_span = (bisect.bisect_left(starts, off), bisect.bisect_left(starts, think_end))

    spans = split_sentences(trace.thinking, min_chars=min_chars)
    seg_starts = [a for a, _ in spans]
    tok_lo: list[int | None] = [None] * len(spans)
    tok_hi: list[int] = [0] * len(spans)
    for t, (s, e) in enumerate(offsets):
        p = _content_start(text, s, e) if e > s else None
        if p is None or not off <= p < think_end:
            continue
        k = bisect.bisect_right(seg_starts, p - off) - 1
        if k >= 0 and p - off < spans[k][1]:
            if tok_lo[k] is None:
                tok_lo[k] = t
            tok_hi[k] = t + 1

    segments = []
    for k, (a, b) in enumerate(spans):
        lo = tok_lo[k]
        if lo is None:  # no token starts in it: empty span where it would begin
            lo = tok_hi[k] = next((tok_hi[j] for j in range(k - 1, -1, -1) if tok_lo[j] is not None), think_span[0])
        segments.append(Segment(text=trace.thinking[a:b], start=lo, end=tok_hi[k], char_start=a, char_end=b))
    kept = trace.token_ids and trace.think_span is not None  # a span given without its ids indexes other tokens
    return replace(
        trace,
        token_ids=list(trace.token_ids) or ids,
        think_span=trace.think_span if kept else think_span,
        segments=segments,
    )
