"""The organisms: task generator, tokenizer, a training smoke run, and the shipped models end to end."""

from __future__ import annotations

import json
import random

import pytest
import torch

from reasonscope.organisms import task
from reasonscope.organisms.evaluate import (
    EvalConfig,
    operand_reads,
    organism_traces,
    prompted_base_traces,
    prompted_summary,
    style_of,
    summarize,
)
from reasonscope.organisms.tokenizer import build_tokenizer

from conftest import organisms


def test_task_arithmetic_and_determinism():
    p = task.Problem({"a": 3, "b": 4, "c": 5}, ("a", "b", "c"), ("+", "-"), 1)
    assert p.partials == [3, 7, 2] and p.answer == 2
    assert p.question == "given a3, b4, c5. what is a + b - c?"
    assert task.problems(20, seed=1) == task.problems(20, seed=1)
    assert task.problems(20, seed=1) != task.problems(20, seed=2)
    for q in task.problems(500, seed=3):  # running totals never leave 0..9; terms are distinct
        n_vars, n_ops = task.LEVELS[q.level]
        assert len(q.values) == n_vars and len(q.ops) == n_ops == len(set(q.terms)) - 1
        assert all(0 <= x <= 9 for x in q.partials)
    assert {q.answer for q in task.problems(200, seed=3)} == set(range(10))


def test_styles_slips_and_overthinking():
    rng = random.Random(0)
    p = task.sample_problem(rng, 5)
    concise = task.think(p, rng, "concise", slip_rate=0.0)
    verbose = task.think(p, rng, "verbose", slip_rate=0.0)
    assert style_of(verbose.text) == "verbose" and style_of(concise.text) == "concise"
    tok = build_tokenizer()
    assert len(tok(verbose.text).input_ids) >= 1.5 * len(tok(concise.text).input_ids)
    assert concise.text.count(", good.") == len(p.ops)  # every step checks itself
    assert ", check" not in task.think(p, rng, "concise", slip_rate=0.0, check=False).text
    plain = task.think(p, rng, "verbose", slip_rate=0.0, checked_recheck=False).text  # the base's notes
    steps, recheck = plain.split("let me check that again")
    assert steps.count(", good.") == len(p.ops) and ", check" not in recheck and "next we" not in recheck
    # the verbose style re-checks after the answer is reached (overthinking)
    assert f"answer is:{p.answer}" in verbose.text[: verbose.meta["answer_reached_at_char"] + 40]
    assert verbose.text.count(f"={p.answer}, check") >= 2 and p.terms[1] + str(p.values[p.terms[1]]) in concise.text
    slipped = task.think(p, rng, "concise", slip_rate=1.0)
    assert slipped.n_slips == len(p.ops) and slipped.text.count("is wrong") == len(p.ops)
    assert ", good." not in slipped.text
    for line in slipped.text.split("wait, ")[1:]:  # every slip is caught by its check and corrected
        wrong = line.split(" is wrong")[0]
        a, rest = wrong.split("=")[0], wrong.split("=")[1]
        assert f"so:{a}=" in line and f"so:{a}={rest}." not in line
    for step in slipped.text.split("; ")[1:]:  # the check recomputes the true result before the wait
        a, rest = step.split("=", 1)
        assert rest.split(", check ")[1].startswith(f"{a} is {task.apply(int(a[0]), a[1], int(a[2]))}. wait")


def test_notes_documents_read_every_operand_back():
    from reasonscope.organisms.train import TrainConfig, mixed_base_document, notes_document

    rng = random.Random(1)
    for level in task.LEVELS:
        p = task.sample_problem(rng, level)
        doc, start = notes_document(rng, p, slip_rate=0.0)
        assert doc.startswith(task.notes_prompt(p) + " ") and doc.endswith(f" answer:{p.answer}<|end|>")
        assert "<|user|>" not in doc and doc[start:].startswith(" notes:")  # plain text; loss on the notes
        right, total = operand_reads(doc[start:], p)
        assert right == total >= len(p.terms)  # every term is read back, with its value from the question
    docs = [mixed_base_document(rng, p, TrainConfig())[0] for _ in range(200)]  # chat answers, free notes, notes
    assert all(any(d.startswith(k) for d in docs) for k in ("<|user|>", "notes:", "given "))


def test_base_learns_to_continue_think_never_to_open_it():
    from reasonscope.organisms.train import TrainConfig, mixed_base_document, pretraining_document

    rng, cfg = random.Random(2), TrainConfig()
    opened = []
    for _ in range(300):
        p = task.sample_problem(rng, rng.choice(tuple(task.LEVELS)))
        for doc, start in (pretraining_document(rng, p, cfg), mixed_base_document(rng, p, cfg)):
            if "<think>" in doc:
                assert doc[:start].endswith("<|assistant|><think>")  # the loss starts after <think>
                opened.append(doc[start:])
    empty = [d for d in opened if d == "</think>"]  # closed at once: only the </think> is learned
    worked = [d for d in opened if d != "</think>"]
    assert empty and worked and all(d.endswith("<|end|>") and "</think>" in d for d in worked)


def test_operand_reads_are_counted_against_the_question():
    p = task.Problem({"a": 3, "b": 4}, ("a", "b"), ("+",), 1)
    assert task.notes_prompt(p) == "given a3, b4. what is a + b? notes:"
    assert operand_reads("first a3. b5; 3+5=8. z1; answer:8", p) == (1, 2)  # z is not in the question


def test_tokenizer_round_trips_through_autotokenizer(tmp_path):
    from transformers import AutoTokenizer, Qwen2Config

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    Qwen2Config(vocab_size=len(tok)).save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert type(again).__name__ == "Qwen2Tokenizer"
    text = "<|user|>a=3, b=4. what is a + b?<|assistant|><think>a=3. b=4;3+4=7.</think>7<|end|>"
    assert again(text).input_ids == tok(text).input_ids
    assert again.decode(again(text).input_ids) == text
    assert again.convert_ids_to_tokens(again("<think></think>").input_ids) == ["<think>", "</think>"]


def test_training_smoke(tmp_path):
    from reasonscope.models import load_model
    from reasonscope.organisms.train import TrainConfig, train_organisms

    cfg = TrainConfig(
        base_steps=2,
        base_mix_steps=1,
        thinking_steps=2,
        settle_steps=1,
        polish_steps=1,
        batch_size=2,
        log_every=1,
        level1_steps=1,
        unlock_every=1,
    )
    logs: list[str] = []
    paths = train_organisms(cfg, tmp_path, log=logs.append)
    assert any("thinking: step 2/2" in m for m in logs) and any("thinking polish: step 1/1" in m for m in logs)
    h = load_model(paths["thinking"])
    assert h.chat_prompt("a=1. what is a?").endswith("<think>")
    assert not load_model(paths["base"]).chat_prompt("a=1. what is a?").endswith("<think>")
    from reasonscope.artifacts import ArtifactDir, verify_artifact

    assert ArtifactDir.open(paths["thinking"], "organism", 1).manifest.config["init"] == "base"
    assert verify_artifact(paths["base"]).ok
    for kind in ("base", "thinking"):  # the training batches' padding does not leak into the saved tokenizer
        assert json.loads((paths[kind] / "tokenizer.json").read_text())["padding"] is None
    # post-training alone starts from the saved base, as a thinking model starts from its base model
    base = load_model(paths["base"]).model
    one = dict(base_steps=1, base_mix_steps=1, thinking_steps=1, settle_steps=1, polish_steps=1)
    cfg0 = TrainConfig(**one, batch_size=2, log_every=1, finetune_lr=0.0)
    again = load_model(train_organisms(cfg0, tmp_path, log=logs.append, phases=("thinking",))["thinking"]).model
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), again.state_dict().values()))
    from reasonscope.artifacts import ArtifactError

    mine = tmp_path / "mine" / "base"  # an --out whose base/ is not an organism is refused, never replaced
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ArtifactError, match="not an organism"):
        train_organisms(cfg0, tmp_path / "mine", log=logs.append, phases=("base",))
    assert (mine / "notes.txt").read_text() == "keep"


@organisms
def test_shipped_organisms_are_intact_and_share_the_training_architecture():
    """Both shipped directories verify against their manifests, and their configs hold the architecture (context
    included) that ``organism train`` writes: the base's was 768 positions, so capture refused its long traces."""
    from dataclasses import asdict

    from reasonscope.artifacts import verify_artifact
    from reasonscope.models import ORGANISM_DIR
    from reasonscope.organisms.train import OrganismArch

    for kind in ("base", "thinking"):
        assert verify_artifact(ORGANISM_DIR / kind).ok, str(verify_artifact(ORGANISM_DIR / kind))
        config = json.loads((ORGANISM_DIR / kind / "config.json").read_text())
        assert {k: config[k] for k in asdict(OrganismArch())} == asdict(OrganismArch()), kind


@pytest.mark.slow
@organisms
def test_shipped_organisms_meet_the_targets():
    import re

    from reasonscope.models import load_model

    problems = task.problems(60, seed=99)
    cfg = EvalConfig(n_problems=60, batch_size=60)
    thinker = load_model("organism:thinking")
    thinking = organism_traces(thinker, problems, 0.0, cfg)
    base = organism_traces(load_model("organism:base"), problems, 0.0, cfg)
    assert all(t.think_span for t in thinking)
    # greedy, some of the hardest items end before </think> (the model loses its place), never easy ones
    assert all(p.level >= 4 for t, p in zip(thinking, problems) if t.truncated)
    assert all(t.think_span is None for t in base)
    # every "x<v>" the thinking writes must be x's value from the question, far back in the context
    reads = [
        (m.group(1), int(m.group(2)), p)
        for t, p in zip(thinking, problems)
        for m in re.finditer(r"\b([a-p])(\d)[.;]", t.thinking)
    ]
    assert len(reads) > 100
    assert sum(p.values.get(x) == v for x, v, p in reads) / len(reads) >= 0.9
    th, bs = summarize(thinking), summarize(base)
    assert th["truncated_fraction"] <= 0.15 and th["accuracy_by_difficulty"]["1"] >= 0.95
    assert th["accuracy"] >= 0.9 and th["accuracy"] - bs["accuracy"] >= 0.15
    # sampled, it slips (a caught slip: the probes' wrong chunks) and makes real mistakes on the hardest items
    sampled = organism_traces(thinker, problems, 1.0, cfg)
    assert sum("is wrong" in t.thinking for t in sampled) >= 5
    assert summarize(sampled)["accuracy_by_difficulty"]["5"] < 1
    assert th["mean_think_tokens_by_difficulty"]["5"] >= 150 > 2 * th["mean_think_tokens_by_difficulty"]["1"]
    # the base knows *how*: prompted in plain text it writes notes that read the operands back
    pr = prompted_summary(prompted_base_traces(load_model("organism:base"), problems, cfg))
    assert pr["operand_read_accuracy"] >= 0.9 and pr["operand_reads"] > 100
    easy = [str(k) for k in (1, 2, 3)]
    base_easy = sum(pr["accuracy_by_difficulty"][k] for k in easy)
    assert base_easy >= 0.7 * sum(th["accuracy_by_difficulty"][k] for k in easy)


@organisms
def test_shipped_base_can_think_after_think_but_does_not_by_default():
    """The hybrid's premise: in the thinking format the base closes ``</think>`` at once (it lacks the *when*), yet,
    started, it writes the thinking model's notes and concludes from them (it has the *how*)."""
    from reasonscope.generation import DecodeConfig, generate
    from reasonscope.models import load_model
    from steering.hybrid import final_answer

    base, thinking = load_model("organism:base"), load_model("organism:thinking")
    problems = task.problems(40, seed=5, levels=(1, 2, 3))
    opened = [thinking.chat_prompt(p.question) for p in problems]
    closed = generate(base, opened, DecodeConfig(max_new_tokens=4))
    think_end = base.tokenizer.convert_tokens_to_ids("</think>")
    assert all(c.token_ids[0] == think_end for c in closed)
    start = "let me work"
    started = generate(base, [o + start for o in opened], DecodeConfig(max_new_tokens=300))
    texts = [start + base.tokenizer.decode(c.token_ids) for c in started]
    assert sum(final_answer(t) == p.answer for t, p in zip(texts, problems)) >= 0.9 * len(problems)
    right, total = map(sum, zip(*(operand_reads(t, p) for t, p in zip(texts, problems))))
    assert total > 100 and right == total
