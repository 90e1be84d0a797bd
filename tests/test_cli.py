"""The `reasonscope` CLI end to end: traces generate -> capture, organism eval, demo, bad input."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from reasonscope.cli import app
from reasonscope.store import ActivationStore
from reasonscope.traces.loaders import read_traces_jsonl

from conftest import organisms

runner = CliRunner()


def test_generate_then_capture(tiny_model_dir, tmp_path):
    out = tmp_path / "traces.jsonl"
    r = runner.invoke(app, ["traces", "generate", "--model", str(tiny_model_dir), "--dataset", "organism",
                            "--n", "6", "--out", str(out), "--max-new-tokens", "12"])
    assert r.exit_code == 0, r.output
    traces = read_traces_jsonl(out)
    assert len(traces) == 6 and all(t.think_span for t in traces)
    # a random model rarely closes its thinking in 12 tokens: such traces are kept and flagged
    assert all(t.truncated == ("</think>" not in t.thinking and t.answer == "") for t in traces)
    store_dir = tmp_path / "store"
    r = runner.invoke(app, ["capture", "--model", str(tiny_model_dir), "--traces", str(out), "--hooks",
                            "blocks.*.hook_resid_post,blocks.1.attn.hook_z", "--positions", "all", "--out",
                            str(store_dir), "--shard-size", "4", "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    store = ActivationStore.open(store_dir)
    assert set(store.manifest.hooks) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
                                         "blocks.1.attn.hook_z"}
    assert len(store) == sum(len(t.token_ids) for t in traces) and store.n_shards == 2


def test_capture_bad_hook_and_bad_jsonl(tiny_model_dir, tmp_path):
    good = tmp_path / "t.jsonl"
    runner.invoke(app, ["traces", "generate", "--model", str(tiny_model_dir), "--n", "2", "--out", str(good),
                        "--max-new-tokens", "4"])
    r = runner.invoke(app, ["capture", "--model", str(tiny_model_dir), "--traces", str(good), "--hooks",
                            "blocks.0.resid", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "valid names" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text().splitlines()[0] + "\n{not json\n")
    r = runner.invoke(app, ["capture", "--model", str(tiny_model_dir), "--traces", str(bad), "--out",
                            str(tmp_path / "s2")])
    assert r.exit_code != 0 and f"{bad}:2" in str(r.exception)
    assert not (tmp_path / "s2").exists()


@organisms
def test_organism_eval_json():
    r = runner.invoke(app, ["organism", "eval", "--json", "--n", "20"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    for kind in ("thinking", "base"):
        assert {"accuracy", "accuracy_by_difficulty", "mean_think_tokens"} <= set(report[kind])
    assert {"verbose_fraction", "mean_think_tokens_by_style"} <= set(report["thinking"])


@organisms
def test_demo_prints_graded_summary(tmp_path):
    r = runner.invoke(app, ["demo", "--n", "10", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "thinking" in r.stdout and "base" in r.stdout and "accuracy" in r.stdout
    assert len(read_traces_jsonl(tmp_path / "traces_thinking.jsonl")) == 10


@organisms
def test_capture_on_the_thinking_organism(tmp_path):
    out = tmp_path / "t.jsonl"
    r = runner.invoke(app, ["traces", "generate", "--model", "organism:thinking", "--n", "8", "--out", str(out)])
    assert r.exit_code == 0, r.output
    traces = read_traces_jsonl(out)
    r = runner.invoke(app, ["capture", "--model", "organism:thinking", "--traces", str(out), "--positions",
                            "segment_ends", "--out", str(tmp_path / "s"), "--shard-size", "3"])
    assert r.exit_code == 0, r.output
    store = ActivationStore.open(tmp_path / "s")
    assert len(store) == sum(len(t.segments) for t in traces) > 8
    assert store.get("blocks.3.hook_resid_post", trace=traces[0].id).shape == (len(traces[0].segments), 128)
