"""The organisms' synthetic reasoning task: chained single-digit arithmetic over named variables.

A problem defines single-digit variables at the start of the question and asks for a chain
such as ``a + c - f + h`` evaluated left to right. The generator draws the chain so that every
running total stays a digit (0..9), so no step wraps around. (Wrapping mod 10 makes each result
independent of either operand alone, a parity-like target that a small transformer does not
pick up within the CPU training budget; bounded sums are learned in ~200 steps.) Every step
must read an operand back from the question, far from where the thinking is when it needs it,
so a sink+recent KV window loses exactly the information the answer depends on.

Texts are compact (``given a3, c1. ... c1; 3+1=4.``) so that the Qwen2 byte-level BPE tokenizer
spends one token per symbol, and a variable token is directly followed by its value both in the
question and in the thinking (one induction step reads a value back). Thinking comes in two
styles: ``concise`` (bare steps) and ``verbose`` (the same steps in English, followed by a
redundant full re-check after the answer is known: overthinking). Each step of the thinking
organism checks itself (``3+1=4, check 3+1 is 4, good.``); either style sometimes makes an
arithmetic slip, which the check catches and corrects (``3+1=5, check 3+1 is 4. wait, 3+1=5 is
wrong. so:3+1=4.``: backtracking). The base organism's notes have no checks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

VARIABLES = "abcdefghijklmnop"
# (number of defined variables, number of operations) per difficulty level 1..5; terms are distinct
LEVELS: dict[int, tuple[int, int]] = {1: (4, 1), 2: (6, 2), 3: (8, 4), 4: (12, 8), 5: (16, 15)}
STYLES = ("concise", "verbose")


@dataclass(frozen=True)
class Problem:
    """One task instance; ``answer`` is the chain's value (every partial value is a digit)."""

    values: dict[str, int]
    terms: tuple[str, ...]
    ops: tuple[str, ...]
    level: int
    uid: str = ""

    @property
    def question(self) -> str:
        defs = ", ".join(f"{k}{v}" for k, v in self.values.items())
        expr = self.terms[0] + "".join(f" {o} {t}" for o, t in zip(self.ops, self.terms[1:]))
        return f"given {defs}. what is {expr}?"

    @property
    def partials(self) -> list[int]:
        acc = self.values[self.terms[0]]
        out = [acc]
        for op, t in zip(self.ops, self.terms[1:]):
            acc = apply(acc, op, self.values[t])
            out.append(acc)
        return out

    @property
    def answer(self) -> int:
        return self.partials[-1]


def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def sample_problem(rng: random.Random, level: int) -> Problem:
    """Uniform digit values; each next term is drawn among those that keep the running total in 0..9."""
    n_vars, n_ops = LEVELS[level]
    while True:
        names = rng.sample(VARIABLES, n_vars)
        values = {n: rng.randrange(10) for n in names}
        pool = rng.sample(names, n_vars)
        terms, ops = [pool.pop()], []
        acc = values[terms[0]]
        for _ in range(n_ops):
            moves = [(t, op) for t in pool for op in "+-" if 0 <= apply(acc, op, values[t]) <= 9]
            if not moves:
                break
            t, op = rng.choice(moves)
            pool.remove(t)
            terms.append(t)
            ops.append(op)
            acc = apply(acc, op, values[t])
        if len(ops) == n_ops:
            break
    uid = (
        f"L{level}-"
        + "".join(f"{k}{v}" for k, v in values.items())
        + "-"
        + "".join(t + o for t, o in zip(terms, [*ops, ""]))
    )
    return Problem(values, tuple(terms), tuple(ops), level, uid)


@dataclass
class Thought:
    """A synthetic thinking text with its style and where the answer was first reached."""

    text: str
    style: str
    n_slips: int = 0
    meta: dict = field(default_factory=dict)


def _step(
    rng: random.Random, a: int, op: str, b: int, slip_rate: float, verbose: bool, check: bool = False
) -> tuple[str, int]:
    """One step; ``check`` (the thinking organism's steps): recompute and say ``good`` when the two results agree.
    The token after the recomputed result then copies the one after the first result, which an induction head
    can do; comparing a written digit with an internal result (no check) was never learned (stops 26 and 30)."""
    c = apply(a, op, b)
    prefix = "so:" if verbose else ""
    if rng.random() < slip_rate:
        wrong = (c + rng.choice([1, 2, 3, 7, 8, 9])) % 10
        seen = f", check {a}{op}{b} is {c}" if check else ""
        return f"{prefix}{a}{op}{b}={wrong}{seen}. wait, {a}{op}{b}={wrong} is wrong. so:{a}{op}{b}={c}.", 1
    return f"{prefix}{a}{op}{b}={c}" + (f", check {a}{op}{b} is {c}, good." if check else "."), 0


def think(
    problem: Problem,
    rng: random.Random,
    style: str,
    slip_rate: float = 0.08,
    check: bool = True,
    checked_recheck: bool = True,
) -> Thought:
    """Write the thinking for ``problem`` in ``style`` (``concise`` or ``verbose``); ``check``: each step checked;
    ``checked_recheck``: the verbose re-check's steps too (else plain ``j8; 0+8=8.``, as in the base's notes)."""
    verbose = style == "verbose"
    v = problem.values
    parts: list[str] = []
    slips = 0
    acc = v[problem.terms[0]]
    if verbose:
        parts.append(f"let me work this out step by step. first, {problem.terms[0]}{acc}.")
    else:
        parts.append(f"first {problem.terms[0]}{acc}.")
    for op, t in zip(problem.ops, problem.terms[1:]):
        word = "add" if op == "+" else "subtract"
        text, s = _step(rng, acc, op, v[t], slip_rate, verbose, check)
        parts.append(f"next we {word} {t}, and {t}{v[t]}; {text}" if verbose else f"{t}{v[t]}; {text}")
        slips += s
        acc = apply(acc, op, v[t])
    answer_at = len(" ".join(parts))
    if verbose:
        parts.append(f"so the answer is:{acc}. hmm, let me check that again to be sure.")
        chk = v[problem.terms[0]]
        parts.append(f"{problem.terms[0]}{chk}.")
        for op, t in zip(problem.ops, problem.terms[1:]):
            if check and checked_recheck:  # in the verbose phrasing
                word = "add" if op == "+" else "subtract"
                text, s = _step(rng, chk, op, v[t], slip_rate, True, check)
                parts.append(f"next we {word} {t}, and {t}{v[t]}; {text}")
                slips += s
            else:
                parts.append(f"{t}{v[t]}; {chk}{op}{v[t]}={apply(chk, op, v[t])}.")
            chk = apply(chk, op, v[t])
        parts.append(f"yes, the answer is:{acc}.")
    return Thought(" ".join(parts), style, slips, {"answer_reached_at_char": answer_at})


def worked_notes(problem: Problem, rng: random.Random, slip_rate: float = 0.15) -> str:
    """Base-model pretraining text: the same reasoning moves, detached from any question."""
    v = problem.values
    parts = ["notes:"]
    acc = v[problem.terms[0]]
    parts.append(f"first {problem.terms[0]}{acc}.")
    for op, t in zip(problem.ops, problem.terms[1:]):
        text, _ = _step(rng, acc, op, v[t], slip_rate, rng.random() < 0.5, check=True)
        parts.append(f"{t}{v[t]}; {text}")
        acc = apply(acc, op, v[t])
    if rng.random() < 0.5:
        parts.append(f"let me check that again. so the answer is:{acc}.")
    return " ".join(parts)


def notes_prompt(problem: Problem) -> str:
    """The plain-text (no chat markers) prompt under which a base model that knows how would write notes."""
    return f"{problem.question} notes:"


def problems(n: int, seed: int, levels: tuple[int, ...] = tuple(LEVELS)) -> list[Problem]:
    """``n`` problems spread evenly over ``levels``, reproducible from ``seed``."""
    rng = random.Random(seed)
    return [sample_problem(rng, levels[i % len(levels)]) for i in range(n)]


def corpus(n_per_level: int = 60, seed: int = 0) -> list[str]:
    """Every kind of text the task produces (questions, both styles, slips, checked notes), for the tokenizer.

    Both styles are written unchecked here: the shipped tokenizer was built from this corpus."""
    rng = random.Random(seed)
    texts = []
    for level in LEVELS:
        for _ in range(n_per_level):
            p = sample_problem(rng, level)
            texts.append(p.question)
            texts.extend(think(p, rng, style, slip_rate=0.5, check=False).text for style in STYLES)
            texts.append(worked_notes(p, rng, slip_rate=0.5))
    return texts
