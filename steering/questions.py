"""Graded question sets for the steering stages: the organism task's problems or any dataset's rows, generated
through the one generation engine and graded by the dataset's grader."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reasonscope.organisms import task
from reasonscope.traces import GRADERS, Trace
from reasonscope.traces.generate import GenerationConfig, generate_traces

__all__ = ["Question", "answer_questions", "dataset_questions", "grade_completion", "organism_questions"]


@dataclass(frozen=True)
class Question:
    """One evaluation question: its chat-formatted prompt, the gold answer, an id, (organisms) its level and the
    question's own text."""

    prompt: str
    gold: str
    id: str = ""
    level: int | None = None
    text: str = ""


def organism_questions(handle: Any, problems: Sequence[task.Problem]) -> list[Question]:
    """Organism task problems as evaluation questions."""
    return [Question(handle.chat_prompt(p.question), str(p.answer), p.uid, p.level, p.question) for p in problems]


def dataset_questions(handle: Any, rows: Sequence[Trace]) -> list[Question]:
    """Dataset rows (``load_hf_dataset``: the question as ``prompt``, ``gold``) as questions in ``handle``'s chat
    format, opening the thinking."""
    return [Question(handle.chat_prompt(t.prompt, thinking=True), str(t.gold), t.id, text=t.prompt) for t in rows]


def answer_questions(
    handle: Any,
    questions: Sequence[Question],
    grader: str,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 1024,
    batch_size: int = 64,
    progress: bool = False,
) -> list[Trace]:
    """Generate one graded trace per question through the generation engine (levels kept in ``meta``)."""
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed)
    traces = generate_traces(
        handle,
        [q.prompt for q in questions],
        gen,
        ids=[q.id or f"q{i}" for i, q in enumerate(questions)],
        golds=[q.gold for q in questions],
        grader=grader,
        source="organism" if grader == "organism" else handle.source,
        progress=progress,
        min_chars=0,
    )
    for t, q in zip(traces, questions):
        if q.level is not None:
            t.meta["level"] = q.level
    return traces


def grade_completion(text: str, gold: str, grader: str, think_end: str = "</think>") -> bool:
    """Whether a completion's final answer (the text after ``think_end`` when present, else all of it) is
    ``gold`` under ``grader``."""
    g = GRADERS[grader]
    answer = text.rsplit(think_end, 1)[1] if think_end in text else text
    return bool(g.is_correct(g.extract(answer), gold))
