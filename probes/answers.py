"""Intermediate answers of thinking chunks: extraction and grading against the gold answer.

``organism``: a step ends with ``=N.`` or ``answer is:N.`` (a retraction such as ``3+1=5 is wrong.``
states no answer). Over a whole trace (:func:`chunk_answers`), a step's ``=N`` is an *answer to the question*
only when it completes the chain: the question ``what is a + c - f?`` has 2 operations, so the 2nd step after a
chain start (``first a3.``, or ``a3.`` when a re-check begins) states an answer, and a restated step
(``so:3+1=4.`` after ``... is wrong.``) replaces the step it corrects; a running total part-way through the chain
is no answer (Zhang et al.: a chunk is labelled only when it "reaches a result"). ``answer is:N`` always is.
``math``: the last ``\\boxed{}``, ``answer is X`` or ``is/=/get X`` at a sentence end
(the "medium" matcher of probes.md §4.2); graded with the MATH grader.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from reasonscope.traces import GRADERS, Trace, extract_boxed_list

Matcher = Literal["auto", "organism", "math"]
MATCHERS: tuple[Matcher, ...] = get_args(Matcher)
_ORGANISM = re.compile(r"(?:=|answer is:)\s*(-?\d+)(?:\.?\s*$|, check\b)")
_VALUE = r"(-?\d+\s*/\s*\d+|-?\d[\d,]*(?:\.\d+)?|-?\\d?frac\{[^{}]+\}\{[^{}]+\})"
_UNIT = r"(?:\s*(?:\\?%|[A-Za-z]{1,12}(?:\^\d)?))?"  # "6.17%.", "5.8 cm.": a percent sign or a unit word
_OPEN, _CLOSE = r"(?:\$|\\\(|\\\[)*", r"(?:\$|\\\)|\\\])*"  # $, \( \) and \[ \] around the value
# the value ends a sentence: "." then whitespace, as split_sentences reads it (the "." of "5.8" is no end)
_MATH = re.compile(
    r"(?:answer is:?|\b(?:is|get|gives|equals)\b|=)\s*" + _OPEN + r"\s*" + _VALUE + r"\s*" + _CLOSE + _UNIT + r"\s*"
    r"(?=[.!?](?:\s|$)|\n|$)",
    re.IGNORECASE,
)


def matcher_for(trace: Trace, matcher: Matcher) -> Literal["organism", "math"]:
    """The concrete matcher: ``auto`` reads organism traces (``source`` starting with ``organism``, or graded by the
    organism grader, e.g. generated from an organism's directory) as organism, any other as math."""
    if matcher not in MATCHERS:
        raise ValueError(f"unknown matcher {matcher!r}; choose one of {', '.join(MATCHERS)}")
    if matcher == "auto":
        organism = trace.source.startswith("organism") or trace.meta.get("grader") == "organism"
        return "organism" if organism else "math"
    return matcher


def extract_intermediate(text: str, matcher: Literal["organism", "math"]) -> str | None:
    """The answer a chunk states, or None when it states none (pure reflection)."""
    if matcher == "organism":
        m = _ORGANISM.search(text.strip())
        return str(int(m.group(1))) if m else None
    boxed = extract_boxed_list(text)
    if boxed is not None:
        return boxed
    hits = _MATH.findall(text)
    return re.sub(r"[,\s]", "", hits[-1]) if hits else None


_QUESTION = re.compile(r"what is\s+([a-z](?:\s*[+-]\s*[a-z])*)\s*\?")
_CHAIN_START = re.compile(r"^(?:.*\bfirst,?\s+)?[a-z]\d\.$")
_NAMED_STEP = re.compile(r"\b[a-z]\d;\s")


def organism_ops(prompt: str) -> int | None:
    """Operations in an organism question (``what is a + c - f?`` -> 2), or None when the prompt has none."""
    m = _QUESTION.search(prompt)
    return None if m is None else len(re.findall(r"[+-]", m.group(1)))


def chunk_answers(texts: list[str], matcher: Literal["organism", "math"], prompt: str = "") -> list[str | None]:
    """The answer to the question each chunk of one trace states (None: it states none), in order.

    ``math``, or an organism prompt without a readable question: :func:`extract_intermediate` per chunk. Organism:
    only ``answer is:N`` and chain-completing steps (see the module docstring).
    """
    n_ops = organism_ops(prompt) if matcher == "organism" else None
    if n_ops is None:
        return [extract_intermediate(t, matcher) for t in texts]
    out: list[str | None] = []
    step = 0
    for raw in texts:
        text = raw.strip()
        value = extract_intermediate(text, matcher)
        if "answer is:" in text:
            out.append(value)
            continue
        if _CHAIN_START.match(text):
            step = 0
        elif _NAMED_STEP.search(text):
            step += 1
        out.append(value if step == n_ops and not _CHAIN_START.match(text) else None)
    return out


def is_correct(answer: str | None, gold: str, matcher: Literal["organism", "math"]) -> bool:
    """Whether ``answer`` equals ``gold`` under the dataset's grader."""
    return bool(GRADERS[matcher].is_correct(answer, gold))
