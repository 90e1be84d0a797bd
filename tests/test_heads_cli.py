"""``reasonscope heads``: user errors before any model loads, and score/eval end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from reasonscope.artifacts import JsonResult, read_manifest
from reasonscope.cli import app
from reasonscope.heads import CompressionPolicy, HeadMap
from reasonscope.heads.figures import curves_figure, head_map_figure, retrieval_scatter
from reasonscope.models import load_model

from conftest import organisms

runner = CliRunner()


def user_error(r, *needles: str) -> None:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)


@pytest.fixture
def no_model_load(monkeypatch):
    import reasonscope.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were validated")

    monkeypatch.setattr(reasonscope.models, "load_model", refuse)


def test_bad_input_fails_early_and_writes_nothing(tiny_model_dir, tmp_path, no_model_load):
    m = str(tiny_model_dir)
    user_error(
        runner.invoke(app, ["heads", "score", "--model", m, "--method", "magic", "--out", str(tmp_path / "o")]),
        "--method 'magic'",
    )
    user_error(
        runner.invoke(app, ["heads", "score", "--model", m, "--sink", "4", "--out", str(tmp_path / "o")]),
        "both --sink and --recent",
    )
    user_error(
        runner.invoke(app, ["heads", "score", "--model", m, "--levels", "9", "--out", str(tmp_path / "o")]),
        "unknown level",
    )
    (tmp_path / "exists").mkdir()
    user_error(
        runner.invoke(app, ["heads", "score", "--model", m, "--out", str(tmp_path / "exists")]), "already exists"
    )
    user_error(
        runner.invoke(app, ["heads", "eval", "--model", m, "--map", str(tmp_path / "exists"), "--sparsities", "0,1.5"]),
        "outside [0, 1]",
    )
    user_error(runner.invoke(app, ["heads", "eval", "--model", m, "--map", str(tmp_path / "exists")]), "manifest")
    user_error(runner.invoke(app, ["heads", "eval", "--model", m, "--map", str(tmp_path / "gone")]), "--map", "gone")
    wrong = HeadMap(torch.ones(3, 2), "window", "sha256:x", CompressionPolicy())
    wrong.save(tmp_path / "wrong", {}, {})
    user_error(
        runner.invoke(app, ["heads", "eval", "--model", m, "--map", str(tmp_path / "wrong")]), "layers x KV heads"
    )
    user_error(runner.invoke(app, ["heads", "diff", "--base", m, "--model", str(tmp_path / "nope")]), "--model")
    for cmd in (["score", "--out", str(tmp_path / "o")], ["eval", "--map", str(tmp_path / "o")], ["diff", "--base", m]):
        user_error(runner.invoke(app, ["heads", *cmd, "--model", m, "--dtype", "int3"]), "--dtype")
    row = '{"id": "a", "prompt": "q", "thinking": "t", "answer": "1"}\n'
    (tmp_path / "dup.jsonl").write_text(row + row)  # traces are checked as capture checks them, before any load
    (tmp_path / "empty.jsonl").write_text("")
    score = ["heads", "score", "--model", m, "--out", str(tmp_path / "o"), "--traces"]
    user_error(runner.invoke(app, [*score, str(tmp_path / "dup.jsonl")]), "repeats record 1")
    user_error(runner.invoke(app, [*score, str(tmp_path / "empty.jsonl")]), "holds no traces")
    user_error(runner.invoke(app, [*score, str(tmp_path / "nope.jsonl")]), "--traces")
    assert not (tmp_path / "o").exists()


def test_score_then_eval_on_tiny_model(tiny_model_dir, tiny_handle, task_traces, tmp_path):
    from reasonscope.traces.loaders import write_traces_jsonl

    m = str(tiny_model_dir)
    write_traces_jsonl(tmp_path / "t.jsonl", task_traces)
    r = runner.invoke(
        app,
        [
            "heads",
            "score",
            "--model",
            m,
            "--method",
            "window",
            "--traces",
            str(tmp_path / "t.jsonl"),
            "--sink",
            "4",
            "--recent",
            "8",
            "--out",
            str(tmp_path / "w"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert r.stdout == ""  # the scores go to stderr; stdout carries JSON only with --json
    hm = HeadMap.open(tmp_path / "w")
    assert hm.method == "window" and hm.scores.shape == (2, 2)
    r = runner.invoke(
        app,
        [
            "heads",
            "eval",
            "--model",
            m,
            "--map",
            str(tmp_path / "w"),
            "--n",
            "2",
            "--levels",
            "2",
            "--no-exhaustive",
            "--no-retrieval",
            "--sparsities",
            "0,0.5",
            "--draws",
            "1",
            "--max-new-tokens",
            "40",
            "--json",
            "--out",
            str(tmp_path / "ev"),
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert set(res["curves"]) == {"window", "random", "uniform"} and res["rank_agreement"] == {"window": {}}
    assert {"accuracy", "mean_think_tokens", "kv_bytes"} <= set(res["curves"]["window"]["0.5"])
    assert json.loads((tmp_path / "ev" / "result.json").read_text())["curves"] == res["curves"]
    saved = read_manifest(tmp_path / "ev", "heads_eval")  # what the curves were made on: weights, dtype, settings
    assert saved.inputs == {"model": hm.model_hash} and saved.config["dtype"] == "float32"
    assert saved.config["sparsities"] == [0.0, 0.5] and saved.config["levels"] == [2]
    assert len(head_map_figure(hm.scores).data) == 1 and len(curves_figure(res).data) == len(res["curves"])
    assert curves_figure(res, "kv_bytes").layout.yaxis.title.text == "KV cache (bytes per sequence, mean)"
    assert len(retrieval_scatter({"window": hm.scores}, torch.rand(2, 2)).data[0].x) == 4


def test_eval_on_a_dataset_grades_its_first_rows(tiny_model_dir, tiny_handle, task_traces, tmp_path, monkeypatch):
    import reasonscope.heads.evaluate as evaluate
    from reasonscope.traces import load_hf_dataset
    from reasonscope.traces.loaders import write_traces_jsonl

    from conftest import shared_data

    m, gsm8k = str(tiny_model_dir), shared_data("gsm8k/test.jsonl")
    write_traces_jsonl(tmp_path / "t.jsonl", task_traces)
    args = ["heads", "score", "--model", m, "--traces", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "w")]
    assert runner.invoke(app, [*args, "--sink", "4", "--recent", "8"]).exit_code == 0
    seen = []
    real = evaluate.evaluate_heads

    def spy(handle, prompts, golds, scores, policy, cfg, **kw):
        seen.append((list(prompts), list(golds), cfg.grader, cfg.exhaustive, kw["own_traces"]))
        return real(handle, prompts, golds, scores, policy, cfg, **kw)

    monkeypatch.setattr(evaluate, "evaluate_heads", spy)
    ev = ["heads", "eval", "--model", m, "--map", str(tmp_path / "w"), "--dataset", f"gsm8k:{gsm8k}", "--n", "2"]
    r = runner.invoke(app, [*ev, "--sparsities", "0,0.5", "--draws", "1", "--max-new-tokens", "6", "--json"])
    assert r.exit_code == 0, r.output
    rows = load_hf_dataset(gsm8k)[:2]
    prompts = [tiny_handle.chat_prompt(t.prompt, thinking=True) for t in rows]
    assert seen == [(prompts, [t.gold for t in rows], "gsm8k", False, None)]  # no organism ground truths
    assert set(json.loads(r.stdout)["curves"]) == {"window", "random", "uniform"}
    user_error(runner.invoke(app, [*ev, "--exhaustive"]), "--exhaustive and --retrieval")


def test_heads_on_an_r1_format_model(r1_tiny_dir, tmp_path):
    """A real model's flow on the R1 tokenizer and chat format: its GSM8K traces, a head map scored on them, and
    compression curves on the next GSM8K rows."""
    from conftest import shared_data

    m, gsm8k = str(r1_tiny_dir), f"gsm8k:{shared_data('gsm8k/test.jsonl')}"
    traces = str(tmp_path / "t.jsonl")
    gen = ["traces", "generate", "--model", m, "--dataset", gsm8k, "--n", "6", "--temperature", "1"]
    assert runner.invoke(app, [*gen, "--max-new-tokens", "48", "--out", traces]).exit_code == 0
    r = runner.invoke(app, ["heads", "score", "--model", m, "--traces", traces, "--out", str(tmp_path / "w")])
    assert r.exit_code == 0, r.output
    ev = ["heads", "eval", "--model", m, "--map", str(tmp_path / "w"), "--dataset", gsm8k, "--n", "3"]
    r = runner.invoke(app, [*ev, "--sparsities", "0,0.5", "--draws", "1", "--max-new-tokens", "16", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["n_problems"] == 3 and res["curves"]["window"]["0.5"]["achieved_sparsity"] == 0.5


def test_diff_on_a_dataset_with_r1_format_models(r1_tiny_dir, r1_other_dir, tmp_path, monkeypatch):
    """Thinking Sparks on a real model pair's format: GSM8K rows as the questions, graded by GSM8K's grader (a
    random model closes no thinking, so the run then stops with the error that says so)."""
    import reasonscope.heads.emergent as emergent
    from reasonscope.traces import load_hf_dataset

    from conftest import shared_data

    gsm8k = shared_data("gsm8k/test.jsonl")
    seen = []
    real = emergent.emergent_heads

    def spy(base, post, prompts, golds, **kw):
        seen.append((len(prompts), list(golds), kw["grader"]))
        return real(base, post, prompts, golds, **kw)

    monkeypatch.setattr(emergent, "emergent_heads", spy)
    args = ["heads", "diff", "--base", str(r1_other_dir), "--model", str(r1_tiny_dir), "--dataset", f"gsm8k:{gsm8k}"]
    args += ["--n", "3", "--n-attribution", "2", "--k", "1", "--steps", "2", "--draws", "1", "--max-new-tokens", "8"]
    r = runner.invoke(app, [*args, "--json", "--out", str(tmp_path / "e")])
    assert seen == [(3, [t.gold for t in load_hf_dataset(gsm8k)[:3]], "gsm8k")]
    user_error(r, "closed no thinking")
    assert not (tmp_path / "e").exists()


@organisms
def test_diff_on_the_organisms(tmp_path):
    """Thinking Sparks on the shipped pair: both models' style scores are finite unit-mass maps that tell heads and
    models apart, the top head is the largest rise, and the artifact holds the printed result."""
    args = ["heads", "diff", "--base", "organism:base", "--model", "organism:thinking", "--levels", "2", "--n", "4"]
    args += ["--n-attribution", "2", "--k", "1", "--steps", "2", "--draws", "1", "--max-new-tokens", "192"]
    r = runner.invoke(app, [*args, "--json", "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    art = JsonResult.open(tmp_path / "e", kind="emergent_heads")
    assert art.result == res and art.config["model"] == "organism:thinking" and res["n_texts"] == 2
    saved = read_manifest(tmp_path / "e", "emergent_heads")  # the hashes cover the dtype
    hashes = {name: load_model(f"organism:{name}").weight_hash for name in ("base", "thinking")}
    assert saved.inputs == {"base": hashes["base"], "model": hashes["thinking"]}
    assert saved.config["dtype"] == "float32" and saved.config["steps"] == 2 and saved.config["levels"] == [2]
    base, post, rise = (torch.tensor(res[k]) for k in ("base_scores", "model_scores", "emergence"))
    for scores in (base, post):
        assert scores.shape == (4, 4) and torch.isfinite(scores).all() and (scores >= 0).all()
        assert scores.sum() == pytest.approx(1.0, abs=1e-4) and scores.max() > 2 * scores.min()
    assert torch.isfinite(rise).all() and rise.abs().max() > 0.1 and not torch.allclose(base, post, atol=1e-3)
    top = int((post - base).flatten().argmax())
    assert res["top_heads"] == [f"L{top // 4}H{top % 4}"]
    assert set(res["validation"]) == {"none", *(f"{a}@{f}" for a in ("heads", "random") for f in ("0", "0.5", "1.3"))}
    assert res["validation"]["none"]["accuracy"] > 0  # the thinking organism solves level-2 problems
