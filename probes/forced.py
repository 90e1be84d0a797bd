"""Forced answers: cut a trace after a chunk, append ``</think>`` (and a suffix), decode greedily and grade.

This is the "safe to exit" label of LYNX (arXiv 2512.05325) and DEER (arXiv 2504.15895): one short greedy
generation per candidate position, batched through :func:`reasonscope.generation.generate`. The cuts of one trace
share their prefix (``share_prefixes``): the trace runs once, and each cut runs only its closing tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from reasonscope.generation import DecodeConfig, generate
from reasonscope.traces import GRADERS, Trace

if TYPE_CHECKING:  # pragma: no cover
    from reasonscope.models import ModelHandle


def exit_ids(handle: ModelHandle, suffix: str = "") -> list[int]:
    """Token ids that close the thinking: ``</think>`` plus ``suffix``."""
    return list(handle.tokenizer(handle.think_end + suffix, add_special_tokens=False)["input_ids"])


def forced_answers(
    handle: ModelHandle,
    traces: Sequence[Trace],
    positions: Sequence[Sequence[int]],
    matchers: Sequence[Literal["organism", "math"]],
    suffix: str = "",
    max_new_tokens: int = 8,
    batch_size: int = 64,
    share_prefixes: bool = True,
) -> list[list[tuple[str | None, bool]]]:
    """``(answer, correct)`` per trace and position: the greedy answer after exiting right after that token.

    ``share_prefixes=False`` runs every cut's whole prefix (the reference ``bench/forced.py`` times against)."""
    close = exit_ids(handle, suffix)
    prompts: list[list[int]] = []
    for t, pos in zip(traces, positions):
        if any(p < 0 or p >= len(t.token_ids) for p in pos):
            raise ValueError(f"trace {t.id!r}: positions outside its {len(t.token_ids)} tokens; label with a tokenizer")
        prompts.extend(list(t.token_ids[: p + 1]) + close for p in pos)
    cfg = DecodeConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, share_prefixes=share_prefixes)
    done = generate(handle, prompts, cfg) if prompts else []
    out: list[list[tuple[str | None, bool]]] = []
    i = 0
    for t, pos, kind in zip(traces, positions, matchers):
        grader = GRADERS[kind]
        per = []
        for _ in pos:
            text = suffix + handle.tokenizer.decode(done[i].token_ids, skip_special_tokens=True)
            ans = grader.extract(text)
            per.append((ans, t.gold is not None and bool(grader.is_correct(ans, t.gold))))
            i += 1
        out.append(per)
    return out
