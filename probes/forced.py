"""Forced answers: cut a trace after a chunk, append ``</think>`` (and a suffix), decode greedily and grade.

This is the "safe to exit" label of LYNX (arXiv 2512.05325) and DEER (arXiv 2504.15895): one short greedy
generation per candidate position, batched through :func:`reasonscope.generation.generate`. The cuts of one trace
share their prefix (``share_prefixes``): the trace runs once, and each cut runs only its closing tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from reasonscope.generation import DecodeConfig, generate
from reasonscope.traces import GRADERS, Trace

if TYPE_CHECKING:  # pragma: no cover
    from reasonscope.models import ModelHandle


@dataclass(frozen=True)
class AnswerPrompt:
    """How a model is made to answer at a cut (probes.md §2.3, LYNX and DEER).

    A forced exit appends ``</think>`` + ``suffix`` and decodes ``answer_tokens`` greedily. DEER's trial appends
    ``trial`` inside the thinking (None: ``</think>`` + ``suffix``), decodes ``trial_tokens`` greedily, stopping at
    ``trial_stop``, and its confidence is the mean probability of the trial tokens from index ``trial_skip`` on.
    """

    suffix: str
    answer_tokens: int
    trial: str | None
    trial_tokens: int
    trial_stop: tuple[str, ...]
    trial_skip: int


BOXED = "\n**Final Answer**\n\\boxed"  # DEER's trial inducer; LYNX's forced exit adds "{" after a paragraph break
ANSWER_PROMPTS: dict[str, AnswerPrompt] = {
    # the organisms answer right after </think> (``answer is:N.``): a few tokens hold the answer
    "organism": AnswerPrompt("", 8, None, 4, (), 0),
    # reasoning models write a summary first: lead them into the box, read up to its closing brace
    "boxed": AnswerPrompt("\n" + BOXED + "{", 32, BOXED, 20, ("}",), 1),
}


def answer_prompt(grader: str) -> AnswerPrompt:
    """The organisms' prompt for the organism grader (and matcher), the ``\\boxed{`` one for GSM8K and MATH."""
    return ANSWER_PROMPTS["organism" if grader == "organism" else "boxed"]


def exit_ids(handle: ModelHandle, suffix: str = "") -> list[int]:
    """Token ids that close the thinking: ``</think>`` plus ``suffix``."""
    return list(handle.tokenizer(handle.think_end + suffix, add_special_tokens=False)["input_ids"])


def forced_answers(
    handle: ModelHandle,
    traces: Sequence[Trace],
    positions: Sequence[Sequence[int]],
    matchers: Sequence[Literal["organism", "math"]],
    suffix: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    share_prefixes: bool = True,
) -> list[list[tuple[str | None, bool]]]:
    """``(answer, correct)`` per trace and position: the greedy answer after exiting right after that token.

    ``suffix`` and ``max_new_tokens`` default to each matcher's :func:`answer_prompt`. ``share_prefixes=False``
    runs every cut's whole prefix (the reference ``bench/forced.py`` times against)."""
    suffixes = [answer_prompt(k).suffix if suffix is None else suffix for k in matchers]
    default = max((answer_prompt(k).answer_tokens for k in matchers), default=1)
    budget = default if max_new_tokens is None else max_new_tokens
    closes = {x: exit_ids(handle, x) for x in set(suffixes)}
    prompts: list[list[int]] = []
    for t, pos, x in zip(traces, positions, suffixes):
        if any(p < 0 or p >= len(t.token_ids) for p in pos):
            raise ValueError(f"trace {t.id!r}: positions outside its {len(t.token_ids)} tokens; label with a tokenizer")
        prompts.extend(list(t.token_ids[: p + 1]) + closes[x] for p in pos)
    cfg = DecodeConfig(max_new_tokens=budget, batch_size=batch_size, share_prefixes=share_prefixes)
    done = generate(handle, prompts, cfg) if prompts else []
    out: list[list[tuple[str | None, bool]]] = []
    i = 0
    for t, pos, kind, x in zip(traces, positions, matchers, suffixes):
        grader = GRADERS[kind]
        per = []
        for _ in pos:
            text = x + handle.tokenizer.decode(done[i].token_ids, skip_special_tokens=True)
            ans = grader.extract(text)
            per.append((ans, t.gold is not None and bool(grader.is_correct(ans, t.gold))))
            i += 1
        out.append(per)
    return out
