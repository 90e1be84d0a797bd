"""``probe`` CLI: labels (JSONL, thought-anchors), fit, eval; user errors are one line, exit 2, nothing written."""

from __future__ import annotations

import json
import math

import pytest
from test_probes import synthetic
from typer.testing import CliRunner

from probes.cli import probe_app
from probes.labels import write_labels
from probes.probeset import ProbeSet
from reasonscope.traces import write_traces_jsonl

from conftest import shared_data

runner = CliRunner()


def _err(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def test_labels_jsonl_minimal_records(tmp_path, task_traces):
    path = tmp_path / "t.jsonl"
    rows = [
        {"id": t.id, "prompt": t.prompt, "thinking": t.thinking, "answer": t.answer, "gold": t.gold}
        for t in task_traces
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = runner.invoke(probe_app, ["labels", "--traces", str(path), "--matcher", "organism", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["n_traces"] == len(task_traces) and s["n_chunks"] > len(task_traces)
    assert set(s["first_correct_share"]) >= {"median", "p25", "p75", "n"} and s["first_correct_share"]["n"] > 0


def test_labels_thought_anchors(tmp_path):
    root = shared_data("reasoning_traces/thought_anchors_math")
    r = runner.invoke(probe_app, ["labels", "--traces", str(root), "--json", "--out", str(tmp_path / "l")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_traces"] > 0 and (tmp_path / "l" / "manifest.json").exists()


def test_labels_user_errors(tmp_path, task_traces):
    path = tmp_path / "t.jsonl"
    write_traces_jsonl(path, task_traces)
    assert "--model" in _err(runner.invoke(probe_app, ["labels", "--traces", str(path), "--forced"]))
    assert "does not exist" in _err(runner.invoke(probe_app, ["labels", "--traces", str(tmp_path / "x.jsonl")]))
    assert "--matcher" in _err(runner.invoke(probe_app, ["labels", "--traces", str(path), "--matcher", "x"]))
    assert "--dtype" in _err(runner.invoke(probe_app, ["labels", "--traces", str(path), "--dtype", "int3"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "prompt": "q", "thinking": "", "answer": "1", "gold": "1"}) + "\n")
    out = tmp_path / "l"
    assert "no trace has any thinking" in _err(
        runner.invoke(probe_app, ["labels", "--traces", str(bad), "--out", str(out)])
    )
    assert not out.exists()


def test_fit_and_eval(tmp_path):
    store, table = synthetic(tmp_path, n_problems=30)
    write_labels(table, tmp_path / "labels", {}, {})
    args = ["fit", "--store", str(store.path), "--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "p")]
    r = runner.invoke(probe_app, [*args, "--epochs", "5", "--lr", "0.01", "--json"])
    assert r.exit_code == 0, r.output
    fit = json.loads(r.stdout)
    assert fit["correct"]["best_layer"] == 1
    assert "already exists" in _err(runner.invoke(probe_app, args))
    r = runner.invoke(probe_app, ["eval", "--probes", str(tmp_path / "p"), "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)["correct"]
    assert ev == fit["correct"]
    assert set(ev) >= {"best_layer", "auroc", "auroc_within_problem", "ece", "brier", "selectivity"}
    assert "--kind" in _err(runner.invoke(probe_app, [*args[:-1], str(tmp_path / "q"), "--kind", "svm"]))
    for option, wrong in (("--store", tmp_path / "nope"), ("--labels", store.path)):  # missing; another kind
        bad = [*args[:-1], str(tmp_path / "q")]
        bad[bad.index(option) + 1] = str(wrong)
        assert _err(runner.invoke(probe_app, bad)).startswith(f"error: {option}")
    assert not (tmp_path / "q").exists()
    assert "--select-on" in _err(runner.invoke(probe_app, [*args[:-1], str(tmp_path / "q"), "--select-on", "acc"]))
    assert "--target 'foo'" in _err(runner.invoke(probe_app, [*args[:-1], str(tmp_path / "q"), "--target", "foo"]))
    assert not (tmp_path / "q").exists()
    r = runner.invoke(probe_app, [*args[:-1], str(tmp_path / "w"), "--select-on", "auroc_within_problem"])
    assert r.exit_code == 0, r.output
    assert ProbeSet.open(tmp_path / "w").report["selected_on"] == "val_auroc_within_problem"
    assert "not a directory" in _err(runner.invoke(probe_app, ["eval", "--probes", str(tmp_path / "none")]))
    # on the fit's own store and labels: the chunks of problems it did not fit on, i.e. its test problems (the
    # fit's test AUROC again); flipped labels give 1 - AUROC
    on = ["eval", "--probes", str(tmp_path / "p"), "--store", str(store.path), "--json"]
    r = runner.invoke(probe_app, [*on, "--labels", str(tmp_path / "labels")])
    assert r.exit_code == 0, r.output
    there = json.loads(r.stdout)["correct"]
    test_problems = ProbeSet.open(tmp_path / "p").report["test_problems"]
    assert there["n_problems"] == len(test_problems) < 30 and there["best_layer"] == 1
    assert there["n"] == sum(q in test_problems for q in table.problem)
    assert there["n"] + there["n_fit_rows_left_out"] == len(table)
    assert there["auroc"] == pytest.approx(fit["correct"]["auroc"], abs=1e-6) and there["auroc"] > 0.9
    table.targets["correct"] = [1.0 - v for v in table.targets["correct"]]
    write_labels(table, tmp_path / "flipped", {}, {})
    r = runner.invoke(probe_app, [*on, "--labels", str(tmp_path / "flipped")])
    assert r.exit_code == 0, r.output
    flipped = json.loads(r.stdout)["correct"]
    assert flipped["auroc"] == pytest.approx(1 - there["auroc"], abs=1e-6)
    assert "go together" in _err(runner.invoke(probe_app, on))
    seen = [math.nan if q in test_problems else v for q, v in zip(table.problem, table.targets["correct"])]
    table.targets["correct"] = seen  # only chunks of the problems the probes were fitted or validated on
    write_labels(table, tmp_path / "seen", {}, {})
    assert "fitted or validated on" in _err(runner.invoke(probe_app, [*on, "--labels", str(tmp_path / "seen")]))
    table.targets = {"other": table.targets.pop("correct")}
    write_labels(table, tmp_path / "other", {}, {})
    assert "no target 'correct'" in _err(runner.invoke(probe_app, [*on, "--labels", str(tmp_path / "other")]))


def test_monitor_cli(tiny_model_dir, tmp_path):
    args = ["monitor", "--model", str(tiny_model_dir), "--n", "3", "--max-new-tokens", "6"]
    r = runner.invoke(probe_app, [*args, "--deer-thresholds", "0.9", "--deviation-thresholds", "1e9", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert set(res) == {"none", "deer@0.9", "deviation@1e+09"}
    assert all(set(v) >= {"accuracy", "think_tokens", "saved_fraction"} for v in res.values())
    r = runner.invoke(
        probe_app, [*args, "--deer-thresholds", "0.9", "--deviation-thresholds", "1e9,0", "--val-n", "2", "--json"]
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert set(res) == {"none", "deer", "deviation", "curve", "validation"}
    assert set(res["curve"]) == {"none", "deer@0.9", "deviation@1e+09", "deviation@0"}
    assert res["validation"]["n"] == 2 and set(res["validation"]["curve"]) == set(res["curve"])
    for policy in ("deer", "deviation"):  # the validation choice, reported on the test problems
        t = res[policy]["threshold"]
        assert (t is None and res[policy]["saved_fraction"] == 0) or res[policy] == {
            **res["curve"][f"{policy}@{t:g}"],
            "threshold": t,
        }
    assert "--deer-thresholds" in _err(runner.invoke(probe_app, [*args, "--deer-thresholds", "high"]))
    assert "--dtype" in _err(runner.invoke(probe_app, [*args, "--dtype", "int3"]))
    assert "--probes" in _err(runner.invoke(probe_app, [*args, "--probes", str(tmp_path / "none")]))
    r = runner.invoke(probe_app, ["monitor", "--model", str(tmp_path / "nomodel")])  # core lists what it tried
    assert r.exit_code == 2 and r.stderr.startswith("error: --model")


def test_monitor_on_a_dataset_uses_its_first_rows_and_grader(tiny_model_dir, tiny_handle, tmp_path, monkeypatch):
    import probes.monitor as monitor
    from reasonscope.traces import load_hf_dataset

    gsm8k = shared_data("gsm8k/test.jsonl")
    seen = []
    real = monitor.record

    def spy(handle, prompts, golds, cfg, probes=None):
        seen.append((list(prompts), list(golds), cfg.grader))
        return real(handle, prompts, golds, cfg, probes)

    monkeypatch.setattr(monitor, "record", spy)
    args = ["monitor", "--model", str(tiny_model_dir), "--dataset", f"gsm8k:{gsm8k}", "--n", "2", "--val-n", "1"]
    out = tmp_path / "run" / "monitor"
    opts = ["--max-new-tokens", "4", "--deer-thresholds", "0.9", "--json", "--out", str(out)]
    r = runner.invoke(probe_app, [*args, *opts])
    assert r.exit_code == 0, r.output
    rows = load_hf_dataset(gsm8k)[:3]
    qa = [(tiny_handle.chat_prompt(t.prompt, thinking=True), t.gold) for t in rows]
    test, val = qa[1:], qa[:1]  # validation: the first --val-n rows; test: the next --n
    assert seen == [([q for q, _ in part], [g for _, g in part], "gsm8k") for part in (test, val)]
    shown = json.loads(r.stdout)
    assert shown["validation"]["n"] == 1
    from app.artifacts import RunDir

    saved = RunDir(tmp_path / "run").monitor()  # the explorer's monitor stage: the test curve
    assert saved.result == shown["curve"] and saved.config["chosen"] == shown["validation"]["chosen"]
    assert "already exists" in _err(runner.invoke(probe_app, [*args, "--out", str(out)]))
    traces = tmp_path / "t.jsonl"
    traces.write_text("")
    assert "not both" in _err(runner.invoke(probe_app, [*args, "--traces", str(traces)]))


def test_monitor_grades_traces_with_the_grader_they_record(tiny_model_dir, tiny_handle, tmp_path, monkeypatch):
    """GSM8K traces are monitored under the GSM8K grader (its ``\\boxed{`` answer prompt), not the organism default;
    a --grader that contradicts them, traces of two graders, and a dataset short of --val-n + --n are refused."""
    import probes.monitor as monitor
    from reasonscope.traces import Trace

    graders = []
    real = monitor.record

    def spy(handle, prompts, golds, cfg, probes=None):
        graders.append(cfg.grader)
        return real(handle, prompts, golds, cfg, probes)

    monkeypatch.setattr(monitor, "record", spy)
    rows = [
        Trace(id=f"q{k}", prompt=tiny_handle.chat_prompt(f"what is {k}+1?"), thinking="x", answer="", gold=str(k + 1))
        for k in range(3)
    ]
    for t in rows:
        t.meta["grader"] = "gsm8k"
    path = tmp_path / "t.jsonl"
    write_traces_jsonl(path, rows)
    args = ["monitor", "--model", str(tiny_model_dir), "--traces", str(path), "--max-new-tokens", "4"]
    r = runner.invoke(probe_app, [*args, "--deer-thresholds", "0.9", "--json"])
    assert r.exit_code == 0, r.output
    assert graders == ["gsm8k"]
    assert "were graded with gsm8k" in _err(runner.invoke(probe_app, [*args, "--grader", "math"]))
    rows[0].meta["grader"] = "math"
    write_traces_jsonl(path, rows)
    assert "mixes graders ['gsm8k', 'math']" in _err(runner.invoke(probe_app, args))
    short = tmp_path / "short.jsonl"
    short.write_text("".join(shared_data("gsm8k/test.jsonl").read_text().splitlines(keepends=True)[:4]))
    mon = ["monitor", "--model", str(tiny_model_dir), "--dataset", f"gsm8k:{short}", "--val-n", "2", "--n", "5"]
    assert "has 4 rows, fewer than --val-n 2 + --n 5" in _err(runner.invoke(probe_app, mon))


def test_labels_capture_and_monitor_on_an_r1_format_model(r1_tiny_dir, tmp_path):
    """The real-model flow on the R1 tokenizer and chat format: GSM8K traces, activations at the chunk ends,
    forced-answer labels, and the monitor's policies on the next GSM8K rows."""
    from reasonscope.cli import app
    from reasonscope.store import ActivationStore

    m, gsm8k = str(r1_tiny_dir), f"gsm8k:{shared_data('gsm8k/test.jsonl')}"
    traces = str(tmp_path / "t.jsonl")
    gen = ["traces", "generate", "--model", m, "--dataset", gsm8k, "--n", "4", "--temperature", "1"]
    assert runner.invoke(app, [*gen, "--max-new-tokens", "40", "--out", traces]).exit_code == 0
    cap = ["capture", "--model", m, "--traces", traces, "--positions", "segment_ends", "--out", str(tmp_path / "a")]
    r = runner.invoke(app, cap)
    assert r.exit_code == 0, r.output
    assert len(ActivationStore.open(tmp_path / "a")) > 0
    r = runner.invoke(probe_app, ["labels", "--traces", traces, "--model", m, "--forced", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_traces"] == 4
    mon = ["monitor", "--model", m, "--dataset", gsm8k, "--n", "2", "--val-n", "1", "--max-new-tokens", "16"]
    r = runner.invoke(probe_app, [*mon, "--temperature", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["none"]["n"] == 2


def test_monitor_traces_split_validation_by_problem(tiny_model_dir, tiny_handle, tmp_path):
    """--val-n takes whole problems: samples of one problem never sit on both sides."""
    from reasonscope.organisms import task
    from reasonscope.traces import Trace

    probs = task.problems(3, seed=11)
    rows = [
        Trace(id=f"{k}#s{s}", prompt=tiny_handle.chat_prompt(p.question), thinking="x", answer="", gold=str(p.answer))
        for k, p in enumerate(probs)
        for s in range(2)
    ]
    write_traces_jsonl(tmp_path / "t.jsonl", rows)
    args = ["monitor", "--model", str(tiny_model_dir), "--traces", str(tmp_path / "t.jsonl"), "--max-new-tokens", "4"]
    r = runner.invoke(
        probe_app,
        [*args, "--deer-thresholds", "0.9", "--deviation-thresholds", "1e9", "--val-n", "3", "--json"],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["validation"]["n"] == 4 and res["none"]["n"] == 2
    assert "--val-n" in _err(runner.invoke(probe_app, [*args, "--val-n", "5"]))


def test_monitor_refuses_problems_the_probes_were_fitted_on(tiny_model_dir, tmp_path):
    from reasonscope.organisms import task
    from reasonscope.organisms.evaluate import EVAL_SEED

    store, table = synthetic(tmp_path, n_problems=30)
    uid = {f"p{i}": p.uid for i, p in enumerate(task.problems(30, EVAL_SEED))}  # the monitor's test problems
    table.problem = [uid[q] for q in table.problem]
    write_labels(table, tmp_path / "labels", {}, {})
    fit = ["fit", "--store", str(store.path), "--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "p")]
    assert runner.invoke(probe_app, [*fit, "--epochs", "2"]).exit_code == 0
    args = ["monitor", "--model", str(tiny_model_dir), "--probes", str(tmp_path / "p"), "--max-new-tokens", "6"]
    r = runner.invoke(probe_app, [*args, "--n", "30"])
    assert r.exit_code == 2 and "of the monitored problems trained or validated the probes" in r.stderr
