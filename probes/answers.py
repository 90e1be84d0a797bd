"""Intermediate answers of thinking chunks: extraction and grading against the gold answer.

``organism``: a step ends with ``=N.`` or ``answer is:N.`` (a retraction such as ``3+1=5 is wrong.``
states no answer). ``math``: the last ``\\boxed{}``, ``answer is X`` or ``is/=/get X`` at a sentence end
(the "medium" matcher of probes.md §4.2); graded with the MATH grader.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from reasonscope.traces import GRADERS, Trace, extract_boxed

Matcher = Literal["auto", "organism", "math"]
MATCHERS: tuple[Matcher, ...] = get_args(Matcher)
_ORGANISM = re.compile(r"(?:=|answer is:)\s*(-?\d+)\.?\s*$")
_VALUE = r"(-?\d[\d,]*(?:\.\d+)?|\\d?frac\{[^{}]+\}\{[^{}]+\})"
_MATH = re.compile(
    r"(?:answer is:?|\b(?:is|get|gives|equals)\b|=)\s*\$*\s*" + _VALUE + r"\s*\$*\s*(?=[.!?\n]|$)", re.IGNORECASE
)


def matcher_for(trace: Trace, matcher: Matcher) -> Literal["organism", "math"]:
    """The concrete matcher: ``auto`` reads organism traces (``source`` starting with ``organism``) as organism."""
    if matcher not in MATCHERS:
        raise ValueError(f"unknown matcher {matcher!r}; choose one of {', '.join(MATCHERS)}")
    if matcher == "auto":
        return "organism" if trace.source.startswith("organism") else "math"
    return matcher


def extract_intermediate(text: str, matcher: Literal["organism", "math"]) -> str | None:
    """The answer a chunk states, or None when it states none (pure reflection)."""
    if matcher == "organism":
        m = _ORGANISM.search(text.strip())
        return str(int(m.group(1))) if m else None
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    hits = _MATH.findall(text)
    return hits[-1].replace(",", "") if hits else None


def is_correct(answer: str | None, gold: str, matcher: Literal["organism", "math"]) -> bool:
    """Whether ``answer`` equals ``gold`` under the dataset's grader."""
    return bool(GRADERS[matcher].is_correct(answer, gold))
