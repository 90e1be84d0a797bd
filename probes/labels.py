"""Labels from traces: per chunk, is its intermediate answer correct, has the answer already been reached, is it safe
to exit, and the path-deviation signals; written as a ``probe_labels`` artifact.

Recipes (probes.md §2-4): chunks as in :mod:`probes.chunks`; ``correct`` = the chunk's intermediate answer equals
gold (NaN where the chunk states none); ``after_first_correct`` = at or after the first correct chunk (the
first-correct position, FCP); ``deviated`` = a correct answer was reached earlier and this chunk's is wrong;
``safe_exit`` = forcing ``</think>`` after the chunk yields a correct answer (needs a model, :mod:`probes.forced`);
``stable`` = the forced answer equals the trace's own final answer (answer convergence: the rest of the thinking
is redundant; a trace that never answers is stable everywhere); ``no_loss_exit`` = exiting here costs no accuracy:
the forced answer is correct or the trace's own final answer is not (the early-exit decision's label: it also marks
a runaway trace that thinking on will not save);
``rpdi`` / ``rpdi_transition`` = the deviation indices at the chunk end and ``deviation`` = ``rpdi > lam``;
``entropy`` and ``surprise`` (the least likely token written so far) are signals (both need a model,
:mod:`probes.entropy`). Per trace: the first-correct share (where the step, a paragraph, that first states the
correct answer ends, as a share of the thinking) and the Self-Braking overthink score (Zhao et al. 2025, arXiv
2505.14604) ``S = beta*kappa + (1-beta)*(1-eta)`` over the same steps.
"""

from __future__ import annotations

import bisect
import json
import math
import re
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from reasonscope.artifacts import ARTIFACT_FORMATS, ArtifactDir, reading, write_artifact
from reasonscope.identity import trace_digest, traces_hash
from reasonscope.traces import GRADERS, Trace
from reasonscope.traces.segment import segment_trace, thinking_offset, token_offsets

from .answers import MATCHERS, Matcher, chunk_answers, is_correct, matcher_for
from .chunks import CHUNKINGS, Chunking, chunk_thinking, thinking_steps

if TYPE_CHECKING:  # pragma: no cover
    from reasonscope.models import ModelHandle

KIND = "probe_labels"
FILE = "labels.json"
TEXT_TARGETS = ("correct", "after_first_correct", "deviated")
SBT_KEYWORDS = (
    "another",
    "backtrack",
    "but",
    "check",
    "going back",
    "hmm",
    "hmmm",
    "however",
    "hold on",
    "instead of",
    "just to be thorough",
    "just to make sure",
    "let me check",
    "let me just double-check",
    "let me try another",
    "let me verify",
    "maybe i can consider",
    "maybe i should consider",
    "might",
    "not sure",
    "perhaps",
    "recheck",
    "retry",
    "trace back",
    "wait",
)  # SBT prompts/keyword.txt, matched on word boundaries (SBT's substring count also hits "distribute")
_SBT = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(SBT_KEYWORDS, key=len, reverse=True)) + r")\b")


@dataclass(frozen=True)
class LabelConfig:
    """How chunks are cut and answers read; ``forced``/``entropy`` need a model (``handle``).

    ``forced_suffix`` is appended after ``</think>`` before ``forced_max_new_tokens`` of forced answer are decoded
    (None: the matcher's :func:`probes.forced.answer_prompt`: nothing and 8 tokens for the organisms,
    ``"\\n\\n**Final Answer**\\n\\\\boxed{"`` and 32 for math); ``window``/``lam`` are the deviation index's W and
    lambda; ``transition_tau`` the entropy (nats) above which a transition word counts (None: the median entropy).
    """

    matcher: Matcher = "auto"
    chunking: Chunking = "auto"
    forced: bool = False
    forced_suffix: str | None = None
    forced_max_new_tokens: int | None = None
    entropy: bool = False
    window: int = 32
    lam: float = 1.5
    transition_tau: float | None = None
    sbt_beta: float = 0.1
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.matcher not in MATCHERS:
            raise ValueError(f"matcher must be one of {', '.join(MATCHERS)}, got {self.matcher!r}")
        if self.chunking not in CHUNKINGS:
            raise ValueError(f"chunking must be one of {', '.join(CHUNKINGS)}, got {self.chunking!r}")
        for name in ("forced_max_new_tokens", "window", "batch_size"):
            v = getattr(self, name)
            if v is None and name == "forced_max_new_tokens":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (math.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"lam must be a positive number, got {self.lam!r}")
        if not 0 <= self.sbt_beta <= 1:
            raise ValueError(f"sbt_beta must be in [0, 1], got {self.sbt_beta!r}")

    @property
    def needs_model(self) -> bool:
        return self.forced or self.entropy


@dataclass
class LabelTable:
    """One row per chunk: where it is and its targets (``nan`` = undefined); ``traces`` holds per-trace summaries."""

    trace_id: list[str]
    problem: list[str]
    chunk: list[int]
    position: list[int]  # token index of the chunk's last token in ``trace.token_ids``; -1 without a tokenizer
    share: list[float]  # chunk end as a share of the thinking (characters)
    text: list[str]
    targets: dict[str, list[float]]
    traces: dict[str, dict[str, Any]] = field(default_factory=dict)
    token_id: list[int] = field(default_factory=list)  # the token at each position (empty: not recorded)

    def __len__(self) -> int:
        return len(self.trace_id)

    def target(self, name: str) -> list[float]:
        """Values of target ``name``; a missing one raises naming the targets present."""
        if name not in self.targets:
            raise KeyError(f"no target {name!r} in these labels; they have {sorted(self.targets)}")
        return self.targets[name]

    def summary(self) -> dict[str, Any]:
        """``n_traces``, ``n_chunks``, the first-correct share (median, p25, p75, n) and per-target counts."""
        shares = [s["first_correct_share"] for s in self.traces.values() if s["first_correct_share"] is not None]
        fcs: dict[str, Any] = {"n": len(shares), "median": None, "p25": None, "p75": None}
        if shares:
            q = statistics.quantiles(shares, n=4, method="inclusive") if len(shares) > 1 else [shares[0]] * 3
            fcs.update(median=round(q[1], 4), p25=round(q[0], 4), p75=round(q[2], 4))
        counts = {
            k: {"n": sum(not math.isnan(x) for x in v), "positive": sum(x == 1.0 for x in v)}
            for k, v in self.targets.items()
        }
        sbt = [s["sbt_score"] for s in self.traces.values() if s["sbt_score"] is not None]
        out = {
            "n_traces": len(self.traces),
            "n_chunks": len(self),
            "first_correct_share": fcs,
            "targets": counts,
            "sbt_overthink_mean": round(statistics.fmean(sbt), 4) if sbt else None,
        }
        forced = [s["forced_unanswered"] for s in self.traces.values() if "forced_unanswered" in s]
        if forced:  # cuts whose forced exit gave no readable answer: a wrong suffix or budget shows here
            out["forced_unanswered_share"] = round(sum(forced) / max(len(self), 1), 4)
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = {k: [None if math.isnan(x) else x for x in v] for k, v in self.targets.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LabelTable:
        targets = {k: [math.nan if x is None else float(x) for x in v] for k, v in d["targets"].items()}
        return cls(**{**d, "targets": targets})

    @classmethod
    def open(cls, path: str | Path) -> LabelTable:
        """Read a ``probe_labels`` artifact written by :func:`label_traces`."""
        art = ArtifactDir.open(path, KIND, ARTIFACT_FORMATS[KIND], check="hash")
        with reading(path):
            return cls.from_json(art.json(FILE))


def problem_of(trace: Trace) -> str:
    """The problem a trace solves (``meta["problem_id"]``, else the problem text, else the trace id)."""
    return str(trace.meta.get("problem_id") or trace.meta.get("problem") or trace.prompt or trace.id)


def _token_ends(trace: Trace, tokenizer: Any, ends: Sequence[int]) -> tuple[list[int], list[int]]:
    """Index of the last token whose first character lies before each thinking offset in ``ends``, and that
    token's id."""
    ids, offsets = token_offsets(trace, tokenizer)
    off = thinking_offset(trace)
    starts = [s for s, _ in offsets]
    pos = [bisect.bisect_left(starts, off + e) - 1 for e in ends]
    return pos, [ids[p] if p >= 0 else -1 for p in pos]


def sbt_score(thinking: str, first_step: int | None, n_steps: int, beta: float) -> float | None:
    """Self-Braking overthink score ``beta*kappa + (1-beta)*(1-eta)``; None when no step is correct.

    ``eta`` = (first correct step + 1) / steps, steps as :func:`~probes.chunks.thinking_steps` (SBT: ``\\n\\n``
    paragraphs); ``kappa`` = keyword words / all words (words stand in for tokens).
    """
    if first_step is None or n_steps == 0:
        return None
    words = max(1, len(thinking.split()))
    kappa = sum(len(m.split()) for m in _SBT.findall(thinking.lower())) / words
    eta = (first_step + 1) / n_steps
    return beta * kappa + (1 - beta) * (1 - eta)


def build_labels(
    traces: Sequence[Trace], cfg: LabelConfig, handle: ModelHandle | None = None, tokenizer: Any = None
) -> LabelTable:
    """Label every chunk of ``traces`` (see the module docstring); nothing is written.

    ``tokenizer`` (or ``handle``'s) maps chunks to token positions, needed to join with an activation store.
    """
    if cfg.needs_model and handle is None:
        raise ValueError("forced answers and entropies need a model: pass handle= (CLI: --model)")
    if not traces:
        raise ValueError("no traces to label; pass a non-empty trace file")
    empty = [t.id for t in traces if not t.thinking.strip()]
    if len(empty) == len(traces):
        raise ValueError("no trace has any thinking; label the traces of a reasoning model (<think>...)")
    if empty:  # a reasoning model sometimes closes its thinking at once: nothing to label there
        warnings.warn(f"{len(empty)} traces with empty thinking are left out (e.g. {empty[:3]})", stacklevel=2)
        traces = [t for t in traces if t.thinking.strip()]
    tokenizer = tokenizer if tokenizer is not None else (handle.tokenizer if handle is not None else None)
    table = LabelTable([], [], [], [], [], [], {k: [] for k in TEXT_TARGETS})
    positions: list[list[int]] = []
    for t in traces:
        kind = matcher_for(t, cfg.matcher)
        chunks = chunk_thinking(t.thinking, cfg.chunking)
        none = [-1] * len(chunks)
        pos, tok = _token_ends(t, tokenizer, [c.char_end for c in chunks]) if tokenizer is not None else (none, none)
        positions.append(pos)
        table.token_id.extend(tok)
        answers = chunk_answers([c.text for c in chunks], kind, t.prompt)
        correct = [math.nan if t.gold is None or a is None else float(is_correct(a, t.gold, kind)) for a in answers]
        first = next((k for k, c in enumerate(correct) if c == 1.0), None)
        for k, c in enumerate(chunks):
            table.trace_id.append(t.id)
            table.problem.append(problem_of(t))
            table.chunk.append(k)
            table.position.append(pos[k])
            table.share.append(c.char_end / len(t.thinking))
            table.text.append(c.text)
            table.targets["correct"].append(correct[k])
            reached = first is not None and k >= first
            table.targets["after_first_correct"].append(math.nan if t.gold is None else float(reached))
            table.targets["deviated"].append(
                math.nan if math.isnan(correct[k]) else float(first is not None and k > first and correct[k] == 0.0)
            )
        steps = thinking_steps(t.thinking)  # the first correct answer, located at the step (paragraph) stating it
        said = chunk_answers([t.thinking[a:b] for a, b in steps], kind, t.prompt)
        gold = t.gold
        first_step = None if gold is None else next((k for k, a in enumerate(said) if is_correct(a, gold, kind)), None)
        table.traces[t.id] = {
            "n_chunks": len(chunks),
            "first_correct_chunk": first,
            "first_correct_share": None if first_step is None else steps[first_step][1] / len(t.thinking),
            "sbt_score": sbt_score(t.thinking, first_step, len(steps), cfg.sbt_beta),
            "grade": t.grade,
            "question": t.prompt,  # the question-only (difficulty) baseline reads it
        }
    if cfg.needs_model:
        assert handle is not None
        _model_targets(table, traces, positions, cfg, handle)
    return table


def _model_targets(
    table: LabelTable, traces: Sequence[Trace], positions: list[list[int]], cfg: LabelConfig, handle: ModelHandle
) -> None:
    """Add ``safe_exit`` (forced answers) and the deviation signals (entropies) to ``table`` in place.

    Traces without token ids (a JSONL of texts, the thought-anchors layout) are tokenized as the positions were."""
    traces = [t if t.token_ids and t.think_span else segment_trace(t, handle.tokenizer) for t in traces]
    if cfg.forced:
        from .forced import forced_answers

        kinds = [matcher_for(t, cfg.matcher) for t in traces]
        graded = forced_answers(
            handle, traces, positions, kinds, cfg.forced_suffix, cfg.forced_max_new_tokens, cfg.batch_size
        )
        table.targets["safe_exit"] = [
            math.nan if t.gold is None else float(ok) for t, per in zip(traces, graded) for _, ok in per
        ]
        for t, per in zip(traces, graded):
            table.traces[t.id]["forced_unanswered"] = sum(a is None for a, _ in per)
        table.targets["stable"] = [
            x for t, kind, per in zip(traces, kinds, graded) for x in _stable(t, kind, [a for a, _ in per])
        ]
        table.targets["no_loss_exit"] = [
            x for t, kind, per in zip(traces, kinds, graded) for x in _no_loss(t, kind, [ok for _, ok in per])
        ]
    if cfg.entropy:
        from .entropy import chunk_signals

        sig = chunk_signals(handle, traces, positions, cfg.window, cfg.transition_tau)
        for name in ("rpdi", "rpdi_transition", "entropy", "surprise"):
            table.targets[name] = [x for per in sig[name] for x in per]
        table.targets["deviation"] = [math.nan if math.isnan(x) else float(x > cfg.lam) for x in table.targets["rpdi"]]


def _final_answer(trace: Trace, kind: Literal["organism", "math"]) -> str | None:
    """The answer the trace itself gives after its thinking (None: it never answers)."""
    return GRADERS[kind].extract(trace.answer) if trace.answer.strip() else None


def _stable(trace: Trace, kind: Literal["organism", "math"], forced: list[str | None]) -> list[float]:
    """Per position: 1 when the forced answer equals the trace's own final answer (thinking on changes nothing).

    A trace that never answers (its thinking runs into the length limit) is stable everywhere: thinking on yields
    no answer at all, so any forced answer is at least as good.
    """
    final = _final_answer(trace, kind)
    if final is None:
        return [1.0] * len(forced)
    return [float(a is not None and is_correct(a, final, kind)) for a in forced]


def _no_loss(trace: Trace, kind: Literal["organism", "math"], forced_ok: list[bool]) -> list[float]:
    """Per position: 1 when exiting there loses nothing: the forced answer is correct, or the trace's own final
    answer is not (NaN without a gold answer)."""
    if trace.gold is None:
        return [math.nan] * len(forced_ok)
    final = _final_answer(trace, kind)
    final_ok = final is not None and is_correct(final, trace.gold, kind)
    return [float(ok or not final_ok) for ok in forced_ok]


def write_labels(
    table: LabelTable, out: str | Path, config: dict[str, Any], inputs: dict[str, str], replace: bool = False
) -> None:
    """Write ``table`` as a ``probe_labels`` artifact (its summary in the manifest's detail)."""

    def write(tmp: Path) -> dict[str, int]:
        (tmp / FILE).write_text(json.dumps(table.to_json()), encoding="utf-8")
        return {FILE: len(table)}

    write_artifact(out, KIND, ARTIFACT_FORMATS[KIND], config, inputs, write, detail=table.summary(), replace=replace)


def label_traces(
    traces: Sequence[Trace],
    cfg: LabelConfig,
    out: str | Path,
    handle: ModelHandle | None = None,
    tokenizer: Any = None,
    replace: bool = False,
) -> LabelTable:
    """Label ``traces`` (:func:`build_labels`) and write the ``probe_labels`` artifact at ``out``."""
    table = build_labels(traces, cfg, handle, tokenizer)
    inputs = {"traces": traces_hash(trace_digest(t) for t in traces)}
    if handle is not None:
        inputs["model"] = handle.weight_hash
    write_labels(table, out, asdict(cfg), inputs, replace)
    return table
