from __future__ import annotations

from itertools import pairwise

import pytest

from reasonscope.traces.loaders import load_thought_anchors, qwen2_tokenizer
from reasonscope.traces.record import Trace
from reasonscope.traces.segment import full_text, segment_trace, split_sentences

from conftest import shared_data


def _texts(text: str) -> list[str]:
    return [text[a:b] for a, b in split_sentences(text)]


@pytest.fixture(scope="module")
def traces():
    return load_thought_anchors(shared_data("reasoning_traces/thought_anchors_math"))


@pytest.fixture(scope="module")
def tokenizer():
    return qwen2_tokenizer(shared_data("tokenizers/qwen2"))


# ---------------------------------------------------------------- splitter


def test_sentence_ends_and_decimals():
    text = "The rate is 3.5 percent. Is that right? Yes! Then x = 0.25 works.\n"
    assert _texts(text) == ["The rate is 3.5 percent.", "Is that right?", "Yes! Then x = 0.25 works."]
    assert _texts("The rate is 3.5 percent.\r\nIs that right?") == ["The rate is 3.5 percent.", "Is that right?"]


def test_paragraphs_and_short_pieces_merge_forward():
    text = "Let me compute this first:\n\n1 + 3 = 4\n\nOkay, so it is 4\n   \nStill the same one.\n\nNext."
    assert _texts(text) == [
        "Let me compute this first:",
        # "1 + 3 = 4" is under 10 characters: merged into the next piece; a line of spaces
        # is not a paragraph break; the short last piece "Next." is merged backward
        "1 + 3 = 4\n\nOkay, so it is 4\n   \nStill the same one.\n\nNext.",
    ]


def test_enumeration_markers_and_short_tail():
    text = "Starting from the innermost:\n\n1. Compute 1 + 3 = 4\n2. The next layer is 13. Done."
    assert _texts(text) == ["Starting from the innermost:", "1. Compute 1 + 3 = 4\n2.", "The next layer is 13. Done."]
    assert _texts("") == [] and _texts("Hi.") == ["Hi."]


def test_spans_are_tight_and_ordered():
    text = "  First sentence here.  Second one follows!\n\n\n\nThird piece with $x.y$ inside  "
    spans = split_sentences(text)
    assert all(not text[a].isspace() and not text[b - 1].isspace() for a, b in spans)
    assert all(b1 <= a2 for (_, b1), (a2, _) in pairwise(spans))


def test_reproduces_thought_anchors_chunks(traces):
    """A chunk counts as reproduced when some predicted segment has the same text after
    collapsing whitespace runs to one space (Thought Anchors joins merged pieces with a space)."""
    norm = " ".join
    total = hit = 0
    for t in traces:
        predicted = {norm(t.thinking[a:b].split()) for a, b in split_sentences(t.thinking)}
        chunks = t.meta["chunks"]
        total += len(chunks)
        hit += sum(norm(c["chunk"].split()) in predicted for c in chunks)
    print(f"thought-anchors chunks reproduced: {hit}/{total} = {hit / total:.2%}")
    assert len(traces) == 40 and total == 5814 and hit == 5814  # the README's figure: 5814/5814


# ---------------------------------------------------------------- full text and tokens


def test_full_text_conventions():
    r1 = Trace(id="a", prompt="Q? <think>\n", thinking="t.", answer=" A")
    plain = Trace(id="b", prompt="Q?", thinking="t.", answer=" A")
    cut = Trace(id="c", prompt="Q?", thinking="t.", answer="", truncated=True)
    assert full_text(r1) == "Q? <think>\nt.</think> A"
    assert full_text(plain) == "Q?<think>t.</think> A"
    assert full_text(cut) == "Q?<think>t."


def test_token_spans_decode_to_segments(traces, tokenizer):
    for t in traces[:8]:
        s = segment_trace(t, tokenizer)
        assert tokenizer.decode(s.token_ids) == full_text(t)
        a, b = s.think_span
        assert s.token_ids[b] == tokenizer.convert_tokens_to_ids("</think>")
        assert [(g.char_start, g.char_end) for g in s.segments] == split_sentences(t.thinking)
        assert a <= s.segments[0].start and s.segments[-1].end <= b
        for g in s.segments:
            assert g.text == t.thinking[g.char_start : g.char_end]
            assert tokenizer.decode(s.token_ids[g.start : g.end]).strip() == g.text.strip()
        assert all(x.end <= y.start for x, y in zip(s.segments, s.segments[1:]))


def test_given_token_ids_are_kept_or_rejected(tokenizer):
    t = Trace(id="x", prompt="Q: 2+2? <think>\n", thinking="Two plus two. It is 4 for sure.", answer=" 4")
    s = segment_trace(t, tokenizer)
    again = segment_trace(Trace(**{**t.__dict__, "token_ids": s.token_ids}), tokenizer)
    assert again.token_ids == s.token_ids and again.segments == s.segments
    with pytest.raises(ValueError, match="not the tokenizer's tokenization"):
        segment_trace(Trace(**{**t.__dict__, "token_ids": s.token_ids[:-1]}), tokenizer)


def test_a_span_without_its_token_ids_is_recomputed(tokenizer):
    """A trace whose token_ids were dropped (to re-tokenize it with another model) keeps no stale think_span."""
    t = Trace(id="x", prompt="Q: 2+2? <think>\n", thinking="Two plus two. It is 4 for sure.", answer=" 4")
    fresh = segment_trace(t, tokenizer)
    stale = segment_trace(Trace(**{**t.__dict__, "think_span": (0, 3)}), tokenizer)
    assert stale.think_span == fresh.think_span != (0, 3)


def test_truncated_trace_segments(tokenizer):
    t = Trace(id="x", prompt="Q <think>\n", thinking="First we add. Then we wait and", answer="", truncated=True)
    s = segment_trace(t, tokenizer)
    assert s.think_span == (s.think_span[0], len(s.token_ids))
    assert [tokenizer.decode(s.token_ids[g.start : g.end]).strip() for g in s.segments] == [
        "First we add.",
        "Then we wait and",
    ]
