"""Batched generation: left padding, greedy equivalence, splitting at the think markers."""

from __future__ import annotations

from reasonscope.traces.generate import GenerationConfig, generate_traces, split_generation


def test_batched_greedy_equals_one_by_one(tiny_handle):
    qs = ["a=3, b=4, c=1, d=9. what is a + b - c + d?", "e=2. what is e?", "f=1, g=5. what is f - g?"]
    prompts = [tiny_handle.chat_prompt(q) for q in qs]  # different lengths: left padding in the batch
    cfg = GenerationConfig(max_new_tokens=10, batch_size=3)
    batched = generate_traces(tiny_handle, prompts, cfg, ids=["x", "y", "z"])
    singles = [generate_traces(tiny_handle, [p], cfg)[0] for p in prompts]
    assert [t.id for t in batched] == ["x", "y", "z"]
    for b, s in zip(batched, singles):
        assert b.thinking == s.thinking and b.answer == s.answer and b.token_ids == s.token_ids


def test_graded_traces_name_their_grader(tiny_handle):
    prompts = [tiny_handle.chat_prompt("a=3. what is a?")]
    cfg = GenerationConfig(max_new_tokens=4)
    (graded,) = generate_traces(tiny_handle, prompts, cfg, golds=["3"], grader="organism", source="/any/dir")
    assert graded.meta["grader"] == "organism" and graded.grade is not None
    assert "grader" not in generate_traces(tiny_handle, prompts, cfg)[0].meta


def test_sampling_is_seeded(tiny_handle):
    prompts = [tiny_handle.chat_prompt("a=3. what is a?")] * 4
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=3)
    one, two = generate_traces(tiny_handle, prompts, cfg), generate_traces(tiny_handle, prompts, cfg)
    assert [t.thinking for t in one] == [t.thinking for t in two]
    assert len({t.thinking for t in one}) > 1  # a random model's samples differ across rows


def test_split_generation_markers_and_truncation(tiny_handle):
    tok = tiny_handle.tokenizer
    start, end = tiny_handle.think_ids
    prompt = tok(tiny_handle.chat_prompt("a=3. what is a?"))["input_ids"]
    body = tok("a=3.", add_special_tokens=False)["input_ids"]
    ans = tok("3", add_special_tokens=False)["input_ids"]
    done = split_generation(tiny_handle, prompt, body + [end] + ans + [tok.eos_token_id, 0, 0], opened_think=True)
    assert done["thinking"] == "a=3." and done["answer"] == "3" and not done["truncated"]
    assert done["think_span"] == (len(prompt), len(prompt) + len(body))
    cut = split_generation(tiny_handle, prompt, body, opened_think=True)
    assert cut["truncated"] and cut["answer"] == "" and cut["thinking"] == "a=3."
    direct = split_generation(tiny_handle, prompt, ans + [tok.eos_token_id], opened_think=False)
    assert direct["think_span"] is None and direct["answer"] == "3" and not direct["truncated"]
    opened_by_model = split_generation(tiny_handle, prompt, [start] + body + [end] + ans, opened_think=False)
    assert opened_by_model["thinking"] == "a=3." and opened_by_model["truncated"] is False


def test_progress_and_stop_strings(tiny_model_dir, capsys):
    from test_generation import varied_model

    h = varied_model(tiny_model_dir)
    prompts = [h.chat_prompt(q) for q in ("given a3. what is a?", "given e2, f1. what is e + f?")]
    full = generate_traces(h, prompts, GenerationConfig(max_new_tokens=16), progress=True)
    err = capsys.readouterr().err
    assert "generate" in err and "2/2" in err  # a bar over finished traces
    k = max(range(len(full)), key=lambda i: len(full[i].thinking))  # the longer (random) thinking
    text = full[k].thinking
    stop = next(text[i : i + 2] for i in range(2, len(text) - 2) if text[i : i + 2].isalnum())
    cut = generate_traces(h, prompts, GenerationConfig(max_new_tokens=16, stop=(stop,)))
    assert stop in cut[k].thinking and len(cut[k].thinking) < len(text) and cut[k].truncated
