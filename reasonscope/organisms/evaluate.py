"""Held-out evaluation of the organisms: accuracy by difficulty, thinking length, style mix."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from statistics import mean
from typing import Any

from ..traces.generate import GenerationConfig, generate_traces
from ..traces.record import Trace
from . import task

EVAL_SEED = 1_000_003  # disjoint from the training stream (seeded 0..)


@dataclass
class EvalConfig:
    n_problems: int = 500
    seed: int = EVAL_SEED
    batch_size: int = 128  # generation slots: the engine's fastest on this workload (bench/generate.py, B 32-128)
    max_new_tokens: int = 1024


def style_of(thinking: str) -> str:
    """``verbose`` when the thinking re-checks in English, else ``concise``."""
    return "verbose" if "let me" in thinking else "concise"


def organism_traces(
    handle, problems: list[task.Problem], temperature: float, cfg: EvalConfig, seed: int = 0, progress: bool = False
) -> list[Trace]:
    """Generate and grade traces of ``handle`` on organism ``problems``."""
    prompts = [handle.chat_prompt(p.question) for p in problems]
    gen = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, temperature=temperature, batch_size=cfg.batch_size, seed=seed
    )
    traces = generate_traces(
        handle,
        prompts,
        gen,
        ids=[p.uid for p in problems],
        golds=[str(p.answer) for p in problems],
        grader="organism",
        source="organism",
        progress=progress,
        min_chars=0,
    )
    for t, p in zip(traces, problems):
        t.meta.update(level=p.level, style=style_of(t.thinking) if t.think_span else None)
    return traces


READ = re.compile(r"\b([a-p])(\d)[.;]")  # an operand read back from the question: ``c7;`` / ``c7.``
FINAL_ANSWER = re.compile(r"answer:(\d+)\s*$")


def operand_reads(text: str, problem: task.Problem) -> tuple[int, int]:
    """(correct, total) ``x7``-style reads in ``text`` of variables the question defines."""
    reads = [(x, int(v)) for x, v in READ.findall(text) if x in problem.values]
    return sum(problem.values[x] == v for x, v in reads), len(reads)


def prompted_base_traces(handle, problems: list[task.Problem], cfg: EvalConfig, progress: bool = False) -> list[Trace]:
    """Greedy continuations of the plain-text prompt ``{question} notes:`` (no chat markers), graded.

    A base model that knows *how* to reason writes worked notes here and ends with ``answer:{a}``.
    """
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, batch_size=cfg.batch_size)
    traces = generate_traces(
        handle,
        [task.notes_prompt(p) for p in problems],
        gen,
        ids=[p.uid for p in problems],
        golds=[str(p.answer) for p in problems],
        source="organism-notes",
        progress=progress,
    )
    for t, p in zip(traces, problems):
        m = FINAL_ANSWER.search(t.answer)
        t.grade = m is not None and int(m.group(1)) == p.answer and not t.truncated
        right, total = operand_reads(t.answer, p)
        t.meta.update(level=p.level, reads_correct=right, reads_total=total)
    return traces


def prompted_summary(traces: list[Trace]) -> dict:
    """Accuracy (overall, by level) and the share of operand reads that match the question."""
    by_level: dict[int, list[bool]] = defaultdict(list)
    for t in traces:
        by_level[t.meta["level"]].append(bool(t.grade))
    right, total = sum(t.meta["reads_correct"] for t in traces), sum(t.meta["reads_total"] for t in traces)
    return {
        "n": len(traces),
        "accuracy": round(mean(bool(t.grade) for t in traces), 4),
        "accuracy_by_difficulty": {str(k): round(mean(v), 4) for k, v in sorted(by_level.items())},
        "operand_read_accuracy": round(right / total, 4) if total else 0.0,
        "operand_reads": total,
    }


def think_tokens(t: Trace) -> int:
    return t.think_span[1] - t.think_span[0] if t.think_span else 0


def summarize(traces: list[Trace]) -> dict:
    """Accuracy, mean thinking tokens and the truncated share; by difficulty too when traces carry a ``level``."""
    by_level: dict[int, list[bool]] = defaultdict(list)
    tokens_by_level: dict[int, list[int]] = defaultdict(list)
    for t in traces:
        if "level" in t.meta:
            by_level[t.meta["level"]].append(bool(t.grade))
            tokens_by_level[t.meta["level"]].append(think_tokens(t))
    out: dict[str, Any] = {
        "n": len(traces),
        "accuracy": round(mean(bool(t.grade) for t in traces), 4),
        "accuracy_by_difficulty": {str(k): round(mean(v), 4) for k, v in sorted(by_level.items())},
        "mean_think_tokens": round(mean(think_tokens(t) for t in traces), 2),
        "mean_think_tokens_by_difficulty": {str(k): round(mean(v), 2) for k, v in sorted(tokens_by_level.items())},
        "truncated_fraction": round(mean(t.truncated for t in traces), 4),
    }
    if not by_level:
        del out["accuracy_by_difficulty"], out["mean_think_tokens_by_difficulty"]
    return out


def style_summary(traces: list[Trace]) -> dict:
    styles: dict[str, list[int]] = defaultdict(list)
    for t in traces:
        styles[style_of(t.thinking)].append(think_tokens(t))
    return {
        "verbose_fraction": round(len(styles["verbose"]) / max(1, len(traces)), 4),
        "mean_think_tokens_by_style": {s: round(mean(v), 2) for s, v in sorted(styles.items()) if v},
        "sampled_accuracy": round(mean(bool(t.grade) for t in traces), 4),
    }


def evaluate_organisms(thinking, base, cfg: EvalConfig = EvalConfig(), progress: bool = False) -> dict:
    """Greedy accuracy for both models, the thinking model's style mix sampled at temperature 1, and the base
    prompted to write notes in plain text (``base_prompted``: does the base know *how* to reason?)."""
    problems = task.problems(cfg.n_problems, cfg.seed)
    report: dict[str, Any] = {"n_problems": cfg.n_problems, "levels": {str(k): v for k, v in task.LEVELS.items()}}
    report["thinking"] = summarize(organism_traces(thinking, problems, 0.0, cfg, progress=progress))
    report["thinking"].update(style_summary(organism_traces(thinking, problems, 1.0, cfg, seed=1, progress=progress)))
    report["base"] = summarize(organism_traces(base, problems, 0.0, cfg, progress=progress))
    report["base_prompted"] = prompted_summary(prompted_base_traces(base, problems, cfg, progress=progress))
    report["gap_points"] = round(100 * (report["thinking"]["accuracy"] - report["base"]["accuracy"]), 2)
    return report
