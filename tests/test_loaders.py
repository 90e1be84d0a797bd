from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasonscope.traces.loaders import (
    R1_ADDED_TOKENS,
    load_hf_dataset,
    load_thought_anchors,
    qwen2_tokenizer,
    read_jsonl,
    read_traces_jsonl,
    write_traces_jsonl,
)
from reasonscope.traces.record import Segment, Trace
from reasonscope.traces.segment import full_text

from conftest import SHARED, shared_data

TA_ROOT = SHARED / "reasoning_traces" / "thought_anchors_math"


def _need(path: Path) -> Path:
    return shared_data(str(path.relative_to(SHARED)))


# ---------------------------------------------------------------- JSONL


def test_read_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3,\n')
    it = read_jsonl(p)
    assert next(it) == {"a": 1} and next(it) == {"a": 2}
    with pytest.raises(ValueError, match=rf"{p}:4: malformed JSON"):
        next(it)


def test_read_traces_rejects_binary_and_non_objects(tmp_path):
    p = tmp_path / "garbage.jsonl"
    p.write_bytes(b'{"id": "a", "prompt": "p", "thinking": "", "answer": ""}\n\x89PNG\xff\xfe\x00\n')
    with pytest.raises(ValueError, match=rf"{p}:2: not UTF-8 text"):
        read_traces_jsonl(p)
    p.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=rf"{p}:1: expected a JSON object, got list"):
        read_traces_jsonl(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_traces_jsonl(tmp_path / "nope.jsonl")


def test_traces_roundtrip(tmp_path):
    t = Trace(
        id="t1",
        prompt="Q <think>\n",
        thinking="Hmm. Ok.",
        answer="4",
        token_ids=[1, 2, 3],
        think_span=(1, 2),
        segments=[Segment("Hmm.", 1, 2, 0, 4, ["plan"])],
        gold="4",
        grade=True,
        meta={"k": [1, "ü"]},
    )
    p = tmp_path / "sub" / "traces.jsonl"
    write_traces_jsonl(p, [t, Trace(id="t2", prompt="p", thinking="", answer="")])
    back = read_traces_jsonl(p)
    assert back[0] == t and back[1].id == "t2" and len(back) == 2


def test_read_traces_missing_field(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(
        json.dumps({"id": "a", "prompt": "p", "thinking": "", "answer": ""})
        + "\n"
        + json.dumps({"id": "b", "prompt": "p", "answer": ""})
        + "\n"
    )
    with pytest.raises(ValueError, match=rf"{p}:2: .*missing.*'thinking'"):
        read_traces_jsonl(p)


def test_failed_write_leaves_no_partial_file(tmp_path):
    def traces():
        yield Trace(id="ok", prompt="p", thinking="", answer="")
        raise RuntimeError("generation crashed")

    p = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        write_traces_jsonl(p, traces())
    assert list(tmp_path.iterdir()) == []
    p.write_text("old\n")  # an existing file is left as it was
    with pytest.raises(RuntimeError):
        write_traces_jsonl(p, traces())
    assert p.read_text() == "old\n" and list(tmp_path.iterdir()) == [p]


# ---------------------------------------------------------------- Thought Anchors


def test_load_thought_anchors():
    traces = load_thought_anchors(_need(TA_ROOT))
    assert len(traces) == 40
    by_id = {t.id: t for t in traces}
    t = by_id["deepseek-r1-distill-llama-8b/correct/problem_330"]
    assert t.prompt.endswith("Solution: \n<think>\n") and t.thinking.startswith("Alright, so I've got")
    assert t.gold == "88572" and t.grade is True and not t.truncated and t.source == "thought_anchors"
    assert t.meta["chunks"][0]["function_tags"] == ["problem_setup"]
    assert "counterfactual_importance_accuracy" in t.meta["chunks"][0]
    for t in traces:  # the text is reassembled byte-exactly, and grades agree with the source's
        group = t.id.split("/")[1]
        sol = json.loads(
            (TA_ROOT / t.id.replace(f"/{group}/", f"/{group}_base_solution/") / "base_solution.json").read_text()
        )
        assert full_text(t) == sol["full_cot"]
        assert t.grade == sol["is_correct"] == (group == "correct"), t.id


def test_truncated_thought_anchors_trace(tmp_path):
    pdir = tmp_path / "some-model" / "incorrect_base_solution" / "problem_7"
    pdir.mkdir(parents=True)
    prompt = "Solve. Problem: 1+1 Solution: \n<think>\n"
    (pdir / "base_solution.json").write_text(json.dumps({"full_cot": prompt + "Let me think. It is \\boxed{2"}))
    (pdir / "problem.json").write_text(json.dumps({"problem": "1+1", "gt_answer": "2"}))
    [t] = load_thought_anchors(tmp_path)
    assert t.id == "some-model/incorrect/problem_7"
    assert t.truncated and t.answer == "" and t.prompt == prompt
    assert t.thinking == "Let me think. It is \\boxed{2" and t.grade is False and t.meta["chunks"] == []
    assert full_text(t) == prompt + t.thinking
    with pytest.raises(ValueError, match="one level above the model"):
        load_thought_anchors(tmp_path / "some-model")  # one level too deep
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_thought_anchors(tmp_path / "nope")
    (pdir / "problem.json").write_text('{"problem": "1+1", "gt_ans')
    with pytest.raises(ValueError, match=r"problem_7/problem\.json: unreadable JSON"):
        load_thought_anchors(tmp_path)


# ---------------------------------------------------------------- HF datasets


def test_load_hf_dataset_gsm8k():
    traces = load_hf_dataset(_need(SHARED / "gsm8k" / "test.jsonl"), "test", "question", "answer", "gsm8k")
    assert len(traces) == 1319
    t = traces[0]
    assert t.prompt.startswith("Janet") and t.gold == "18" and t.thinking == t.answer == ""
    assert all(t.gold is not None and "," not in t.gold for t in traces)


def test_dataset_ids_name_the_file_or_use_the_row_id():
    train = load_hf_dataset(_need(SHARED / "gsm8k" / "train.jsonl"))
    test = load_hf_dataset(_need(SHARED / "gsm8k" / "test.jsonl"))
    assert train[0].id == "gsm8k/train/0" and not {t.id for t in train} & {t.id for t in test}
    aime = load_hf_dataset(_need(SHARED / "aime2024" / "test.jsonl"), question_field="problem")
    assert len({t.id for t in aime}) == len(aime) and all(t.gold is not None for t in aime)


def test_load_hf_dataset_gsm8k_reads_bare_numbers_and_names_a_bad_row(tmp_path):
    (tmp_path / "bare.jsonl").write_text('{"question": "q1", "answer": "18"}\n{"question": "q2", "answer": "1,200"}\n')
    assert [t.gold for t in load_hf_dataset(tmp_path / "bare.jsonl")] == ["18", "1200"]
    (tmp_path / "bad.jsonl").write_text('{"question": "q1", "answer": "18"}\n{"question": "q2", "answer": "soon"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 1 field 'answer'"):
        load_hf_dataset(tmp_path / "bad.jsonl")


def test_load_hf_dataset_math500():
    traces = load_hf_dataset(_need(SHARED / "math500" / "test.jsonl"), "test", "problem", "answer", "math")
    assert len(traces) == 500 and len({t.id for t in traces}) == 500
    t = traces[0]
    assert t.gold == "\\left( 3, \\frac{\\pi}{2} \\right)" and t.meta["subject"] == "Precalculus"
    with pytest.raises(ValueError, match="no field 'question'"):
        load_hf_dataset(SHARED / "math500" / "test.jsonl", "test", "question", "answer", "math")


# ---------------------------------------------------------------- tokenizer


def test_qwen2_tokenizer_r1_ids():
    tok = qwen2_tokenizer(_need(SHARED / "tokenizers" / "qwen2"))
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert tok.convert_tokens_to_ids("<think>") == 151648
    assert tok.convert_tokens_to_ids("</think>") == 151649
    assert tok.convert_tokens_to_ids([t for t, _ in R1_ADDED_TOKENS]) == list(range(151643, 151665))
    assert tok.eos_token_id == 151643 and tok.bos_token_id == 151646
    assert tok.convert_tokens_to_ids("<|im_start|>") != 151644  # Qwen's own added tokens are gone
    ids = tok("<｜User｜>2+2?<｜Assistant｜><think>\nfour</think>4")["input_ids"]
    assert ids[0] == 151644 and 151645 in ids and ids.count(151648) == ids.count(151649) == 1


def test_missing_shared_data_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "false")
    monkeypatch.delenv("REASONSCOPE_REQUIRE_SHARED", raising=False)
    with pytest.raises(pytest.skip.Exception):
        shared_data("no/such/file.jsonl")
    for var, value in (("CI", "true"), ("REASONSCOPE_REQUIRE_SHARED", "1")):
        monkeypatch.setenv(var, value)
        with pytest.raises(pytest.fail.Exception, match="CI requires it"):
            shared_data("no/such/file.jsonl")


def test_a_dataset_that_is_neither_a_local_file_nor_loadable_names_the_fix(tmp_path):
    """A mistyped path falls through to the hub loader; its error (offline: a connection error) names the fix."""
    with pytest.raises(OSError, match=r"no such local file.*pass a local \.json/\.jsonl file.*gsm8k:<path>"):
        load_hf_dataset(tmp_path / "gsm8k" / "tset.jsonl")
