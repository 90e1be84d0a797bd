"""Label definitions on the organism: intermediate answers only where the chain completes; answer convergence."""

from __future__ import annotations

import math

from probes.answers import chunk_answers, matcher_for, organism_ops
from probes.chunks import chunk_thinking
from probes.labels import LabelConfig, _no_loss, _stable, build_labels
from reasonscope.traces import Trace

VERBOSE = (
    "let me work this out step by step. first, b3. next we add o, and o1; so:3+1=4. next we subtract g, and g1; "
    "so:4-1=3. so the answer is:3. hmm, let me check that again to be sure. b3. o1; 3+1=4. g1; 4-1=2. "
    "wait, 4-1=2 is wrong. so:4-1=3. yes, the answer is:3."
)


def _trace(thinking: str, answer: str = "3", gold: str | None = "3") -> Trace:
    prompt = "<|user|>given b3, o1, g1. what is b + o - g?<|assistant|><think>"
    return Trace(id="t", prompt=prompt, thinking=thinking, answer=answer, gold=gold, source="organism:thinking")


def test_organism_ops_reads_the_question():
    assert organism_ops("given b3, o1, g1. what is b + o - g?") == 2
    assert organism_ops("given c1, g8. what is c + g?") == 1
    assert organism_ops("q <think>") is None


def test_auto_matcher_knows_organism_traces_by_source_or_grader():
    t = _trace("first b3.")
    assert matcher_for(t, "auto") == "organism"
    from_dir = Trace(id="t", prompt=t.prompt, thinking="", answer="3", source="/models/org/thinking")
    assert matcher_for(from_dir, "auto") == "math"  # nothing says it is an organism trace
    from_dir.meta["grader"] = "organism"  # generate_traces records the grader it used
    assert matcher_for(from_dir, "auto") == "organism" and matcher_for(from_dir, "math") == "math"


def test_answers_only_where_the_chain_completes():
    texts = [c.text for c in chunk_thinking(VERBOSE)]
    got = dict(zip(texts, chunk_answers(texts, "organism", _trace(VERBOSE).prompt)))
    assert got["next we add o, and o1; so:3+1=4."] is None  # a running total part-way through is no answer
    assert got["next we subtract g, and g1; so:4-1=3."] == "3"
    assert got["so the answer is:3."] == "3" and got["yes, the answer is:3."] == "3"
    assert got["o1; 3+1=4."] is None and got["g1; 4-1=2."] == "2"  # the re-check's last step, with a slip
    assert got["wait, 4-1=2 is wrong."] is None and got["so:4-1=3."] == "3"  # the restated step replaces it
    assert got["b3."] is None and got["hmm, let me check that again to be sure."] is None
    # without a readable question every "=N" counts (the per-chunk matcher)
    assert chunk_answers(texts[:3], "organism", "q") == [None, None, "4"]


def test_correct_labels_skip_running_totals():
    table = build_labels([_trace(VERBOSE)], LabelConfig(matcher="organism"))
    answered = [(t, c) for t, c in zip(table.text, table.targets["correct"]) if not math.isnan(c)]
    assert [c for _, c in answered] == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert table.targets["deviated"].count(1.0) == 1  # only the slip, not the re-check's running totals
    first = table.traces["t"]["first_correct_chunk"]
    assert table.text[first] == "next we subtract g, and g1; so:4-1=3."


def test_stable_is_answer_convergence():
    t = _trace(VERBOSE)
    assert _stable(t, "organism", ["4", None, "3", "3"]) == [0.0, 0.0, 1.0, 1.0]
    # a trace that never answers (thinking ran into the length limit): any exit is at least as good
    assert _stable(_trace(VERBOSE, answer=""), "organism", ["4", None]) == [1.0, 1.0]


def test_no_loss_exit_marks_exits_that_cost_nothing():
    forced_ok = [False, True, False]
    # a correct trace: only where the forced answer is correct
    assert _no_loss(_trace(VERBOSE), "organism", forced_ok) == [0.0, 1.0, 0.0]
    # a wrong final answer, or none (a runaway trace): no exit can lose it
    assert _no_loss(_trace(VERBOSE, answer="5"), "organism", forced_ok) == [1.0, 1.0, 1.0]
    assert _no_loss(_trace(VERBOSE, answer=""), "organism", forced_ok) == [1.0, 1.0, 1.0]
    assert all(math.isnan(x) for x in _no_loss(_trace(VERBOSE, gold=None), "organism", forced_ok))
