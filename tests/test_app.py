"""The demo and the explorer: a quick demo run (built once per module, reused), reuse and resume of its stages,
every page under Streamlit's AppTest, the CLI's checks, and every page in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reasonscope.cli import app as cli

from conftest import organisms, required

EXPLORER = str(Path(__file__).resolve().parents[1] / "app" / "explorer.py")
runner = CliRunner()


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> Path:
    """A ``reasonscope demo --quick`` run directory on the shipped organisms (every stage, small numbers).

    ``REASONSCOPE_QUICK_RUN=DIR`` writes it to (or reuses it from) ``DIR`` across sessions instead.
    """
    given = os.environ.get("REASONSCOPE_QUICK_RUN")
    out = Path(given) if given else tmp_path_factory.mktemp("demo") / "run"
    r = runner.invoke(cli, ["demo", "--quick", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert f"reasonscope app {out}" in r.stdout
    return out


def _apptest(run: Path, page: str, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("REASONSCOPE_RUN", str(run))
    at = AppTest.from_file(EXPLORER, default_timeout=240)
    at.run()
    assert not at.exception, at.exception
    if page != "Traces":
        at.sidebar.radio(key="page").set_value(page).run()
    assert not at.exception, [e.message for e in at.exception]
    return at


@organisms
def test_demo_summary_and_reuse(quick_run):
    from app.artifacts import RunDir
    from app.demo import STAGES, DemoConfig, run_demo, summary_rows

    log: list[str] = []
    report = run_demo(quick_run, DemoConfig.quick(), log=log.append)
    assert all(v["status"] in ("reused", "skipped") for v in report.values()), report
    assert [s.name for s in STAGES][:2] == ["traces", "capture"]
    rows = dict(summary_rows(RunDir(quick_run)))
    assert "accuracy" in rows["traces"] and "AUROC" in rows["probes"] and "γ=" in rows["asc"]
    assert "gguf" in rows["exports"]
    assert rows["heads_eval"].startswith("accuracy at sparsity 0.25: "), rows["heads_eval"]
    assert "of the thinking (quartiles)" in rows["labels"], rows["labels"]
    with pytest.raises(ValueError, match="other demo settings"):
        run_demo(quick_run, DemoConfig(), log=log.append)


@organisms
def test_other_demo_settings_are_refused_before_a_model_loads(quick_run, monkeypatch):
    import reasonscope.models
    from app.demo import DemoConfig, run_demo

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the run's settings were compared")

    monkeypatch.setattr(reasonscope.models, "load_model", refuse)
    with pytest.raises(ValueError, match="other demo settings"):
        run_demo(quick_run, DemoConfig(), log=lambda _: None)


@organisms
def test_demo_resumes_a_lost_stage(quick_run, tmp_path):
    from app.demo import DemoConfig, run_demo

    copy = tmp_path / "run"
    shutil.copytree(quick_run, copy)
    shutil.rmtree(copy / "exports")
    shutil.rmtree(copy / "monitor")
    report = run_demo(copy, DemoConfig.quick(), log=lambda _: None)
    ran = {k for k, v in report.items() if v["status"] == "ran"}
    assert ran == {"monitor", "exports"}, report


def test_demo_refuses_a_directory_that_is_not_a_demo_run(tmp_path):
    from app.demo import DemoConfig, run_demo

    own = tmp_path / "own"
    (own / "labels").mkdir(parents=True)  # a run on your own model: never adopted, never locked
    with pytest.raises(ValueError, match="not a demo run"):
        run_demo(own, DemoConfig.quick(), log=lambda _: None)
    assert sorted(p.name for p in own.iterdir()) == ["labels"]


def test_a_temporary_a_killed_first_run_left_does_not_make_its_directory_foreign(tmp_path):
    from app.artifacts import RunDir
    from app.demo import DemoConfig, _pin

    run = tmp_path / "run"
    run.mkdir()
    (run / ".run.json.abc123.tmp").write_text("{")  # SIGKILL inside the first write_json
    _pin(RunDir(run), DemoConfig.quick(), lambda: {"thinking": "sha256:a", "base": "sha256:b"})
    assert (run / "run.json").exists()


@organisms
def test_traces_page(quick_run, monkeypatch):
    at = _apptest(quick_run, "Traces", monkeypatch)
    assert at.header[0].value == "Traces"
    assert len(at.get("html")) >= 1  # the coloured tokens
    at.selectbox(key="tr_pick").set_value(at.selectbox(key="tr_pick").options[1].split(" · ")[0]).run()
    at.selectbox(key="tr_colour").set_value("surprise").run()
    assert not at.exception, [e.message for e in at.exception]
    at.selectbox(key="tr_colour").set_value("probe: correct").run()
    assert not at.exception
    at.radio(key="tr_model").set_value("base").run()
    assert not at.exception, [e.message for e in at.exception]
    assert not any("no trace matches" in i.value for i in at.info)  # the base writes no style: filters of its own
    assert any("not labelled" in c.value for c in at.caption)  # the thinking model's labels are not the base's
    at.selectbox(key="tr_grade").set_value("wrong").run()
    assert not at.exception, [e.message for e in at.exception]


@organisms
def test_traces_page_reads_a_rewritten_traces_stage_again(quick_run, tmp_path, monkeypatch):
    import dataclasses
    import json

    from app.artifacts import RunDir, TraceSet

    run = tmp_path / "run"
    shutil.copytree(quick_run / "traces", run / "traces")
    at = _apptest(run, "Traces", monkeypatch)

    def shown() -> tuple[str, dict[str, int]]:  # the picked trace and the length of each signal series
        fig = json.loads(at.get("plotly_chart")[0].proto.spec)
        return str(at.selectbox(key="tr_pick").value), {d["name"]: len(d["y"]) for d in fig["data"]}

    ts = RunDir(run).traces()
    rows = list(ts.traces["thinking"])
    tid, before = shown()
    old = next(t for t in rows if t.id == tid)
    assert set(before.values()) == {len(old.token_ids) - old.think_span[0]}
    longest = max(rows, key=lambda t: len(t.token_ids))  # the same id, other tokens
    rows = [dataclasses.replace(longest, id=tid) if t.id == tid else t for t in rows]
    shutil.rmtree(run / "traces")
    TraceSet(None, {"thinking": rows, "base": ts.traces["base"]}, ts.summary).write(run / "traces", {"n": 0}, {})
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert shown() == (tid, dict.fromkeys(before, len(longest.token_ids) - longest.think_span[0]))


@organisms
def test_heads_page(quick_run, monkeypatch):
    at = _apptest(quick_run, "Heads", monkeypatch)
    assert at.header[0].value == "Heads"
    at.selectbox(key="hd_layer").set_value(1).run()
    at.selectbox(key="hd_head").set_value(1).run()
    at.radio(key="hd_metric").set_value("KV bytes").run()
    assert not at.exception, [e.message for e in at.exception]
    assert any("operand reads" in str(getattr(c, "proto", "")) for c in at.get("plotly_chart"))


@organisms
def test_probes_page(quick_run, monkeypatch):
    at = _apptest(quick_run, "Probes", monkeypatch)
    assert at.header[0].value == "Probes"
    assert len(at.get("plotly_chart")) >= 4  # sweep, calibration, trajectory, trade-off
    at.selectbox(key="pr_trace").set_value(at.selectbox(key="pr_trace").options[2].split(" · ")[0]).run()
    assert not at.exception, [e.message for e in at.exception]


@organisms
def test_probes_page_warns_on_a_damaged_capture(quick_run, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(quick_run, copy)
    shard = sorted((copy / "capture").rglob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    at = _apptest(copy, "Probes", monkeypatch)
    assert not at.exception, [e.message for e in at.exception]
    assert any("capture" in w.value for w in at.warning)
    assert not any("rm -r" in c.value for c in at.code)  # re-running the capture repairs it: nothing to delete


@organisms
def test_probes_page_without_a_capture_says_so_once(quick_run, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(quick_run, copy)
    shutil.rmtree(copy / "capture")
    at = _apptest(copy, "Probes", monkeypatch)
    assert not at.exception, [e.message for e in at.exception]
    assert sum("capture" in w.value for w in at.warning) == 1, [w.value for w in at.warning]
    assert len(at.get("plotly_chart")) >= 2  # the sweep and the monitor's trade-off still stand


@organisms
def test_traces_added_or_regenerated_after_the_capture_are_not_read_from_it(quick_run, tmp_path, monkeypatch):
    """Traces the capture lacks, or regenerated under the same ids, are left out of the probe trajectories and
    colours with a note (they crashed the Probes page, or drew another trace's activations and chunk labels)."""
    from dataclasses import replace

    from app import analysis
    from app.artifacts import RunDir
    from reasonscope.traces.loaders import write_traces_jsonl

    copy = tmp_path / "run"
    shutil.copytree(quick_run, copy)
    rd = RunDir(copy)
    traces = rd.traces().traces["thinking"]
    first = traces[0]
    changed = replace(first, token_ids=[*first.token_ids[:-1], (first.token_ids[-1] + 1) % 100])
    extra = replace(traces[1], id="extra-trace")
    shutil.rmtree(copy / "traces")
    write_traces_jsonl(copy / "traces.jsonl", [extra, changed, *traces[1:]])  # now the traces stage
    kept, why = analysis.captured(rd.store(), rd.traces().traces["thinking"])
    assert [t.id for t in kept] == [t.id for t in traces[1:]]
    assert "1 trace(s) are not in the capture" in why[0] and "1 trace(s) changed since" in why[1]
    labels = rd.labels()
    rows = [i for i, tid in enumerate(labels.trace_id) if tid == traces[1].id]
    moved = replace(traces[1], token_ids=[t + 1 for t in traces[1].token_ids])
    assert analysis.labels_match(labels, rows, traces[1]) and not analysis.labels_match(labels, rows, moved)
    at = _apptest(copy, "Probes", monkeypatch)
    assert any("not in the capture stage" in c.value for c in at.caption), [c.value for c in at.caption]
    assert first.id not in [o.split(" · ")[0] for o in at.selectbox(key="pr_trace").options]
    at = _apptest(copy, "Traces", monkeypatch)
    at.selectbox(key="tr_pick").set_value(first.id).run()
    assert not at.exception, [e.message for e in at.exception]
    assert not any(o.startswith("probe: ") for o in at.selectbox(key="tr_colour").options)
    assert any("changed since they were captured" in c.value for c in at.caption)


@organisms
def test_a_garbled_head_map_or_probe_set_is_a_warning_that_says_to_delete_it(quick_run, tmp_path, monkeypatch):
    """Same-size garbage in a head map's or a probe set's tensors (only a hash sees it): each page that reads them
    warns naming the directory to delete, and the demo, which would refuse to overwrite it, says the same."""
    from app.demo import DemoConfig, run_demo

    copy = tmp_path / "run"
    shutil.copytree(quick_run, copy)
    for f in (copy / "heads" / "window" / "scores.safetensors", copy / "probes" / "correct" / "probes.safetensors"):
        f.write_bytes(b"\xff" * f.stat().st_size)
    for page, stage in (("Heads", "heads/window"), ("Probes", "probes/correct")):
        at = _apptest(copy, page, monkeypatch)
        assert not at.exception, [e.message for e in at.exception]
        assert any(f"delete {copy / stage}" in w.value for w in at.warning), (page, [w.value for w in at.warning])
        assert any(c.value.startswith(f"rm -r {copy / stage}\n") for c in at.code), [c.value for c in at.code]
    at = _apptest(copy, "Traces", monkeypatch)
    assert any("probe colours are unavailable" in c.value for c in at.caption), [c.value for c in at.caption]
    with pytest.raises(ValueError, match=f"delete {copy / 'heads' / 'window'}, then write it again"):
        run_demo(copy, DemoConfig.quick(), log=lambda _: None)


@organisms
def test_the_demo_repairs_a_damaged_capture_instead_of_asking_to_delete_it(quick_run, tmp_path):
    from app.artifacts import RunDir
    from app.demo import DemoConfig, run_demo

    copy = tmp_path / "run"
    shutil.copytree(quick_run, copy)
    shard = sorted((copy / "capture").rglob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])  # cut short
    report = run_demo(copy, DemoConfig.quick(), log=lambda _: None)
    assert report["capture"]["status"] == "ran" and report["probes"]["status"] == "reused", report
    assert RunDir(copy).store().n_shards >= 1


def test_a_damaged_member_of_a_family_gets_its_own_command(tmp_path):
    from app.artifacts import MissingStage

    e = MissingStage("heads", tmp_path, "x", own_model=True, damaged=tmp_path / "heads" / "window")
    assert f"--method window --out {tmp_path}/heads/window" in e.command and "delete" in str(e)
    e = MissingStage("probes", tmp_path, "x", own_model=True, damaged=tmp_path / "probes" / "safe_exit")
    assert f"--target safe_exit --out {tmp_path}/probes/safe_exit" in e.command
    assert "--method duo --out" in MissingStage("heads", tmp_path, own_model=True).command  # none damaged: default


def test_commands_name_the_runs_model_its_members_and_its_stores_settings(tmp_path):
    """On a run of your own model the commands shown work as pasted: they name the model and dtype the explorer was
    given, a head map / probe set the run holds (not a default it lacks), and an interrupted store's own settings
    (the defaults would be refused as another job); an incomplete member is to be deleted, not re-written over."""
    from app.artifacts import RunDir
    from reasonscope.artifacts import IncompleteArtifactError, write_artifact, write_manifest
    from reasonscope.store.manifest import StoreManifest

    run = tmp_path / "run"
    for member in ("heads/window", "probes/no_loss_exit"):
        write_artifact(run / member, "json_result", 1, {}, {}, lambda tmp: None)
    (run / "heads" / ".duo.x.tmp").mkdir()  # a writer's temporary is no member
    store = StoreManifest("sha256:x", {"blocks.0.hook_resid_post": 8}, "think", "bfloat16", ["a", "b"], 1)
    (run / "capture").mkdir()
    write_manifest(run / "capture", store.to_manifest())  # not complete: a capture that was interrupted
    rd = RunDir(run, own_model=True, sources={"thinking": "/m/my model", "dtype": "bfloat16"})
    assert rd.command("heads_eval").startswith("reasonscope heads eval --model '/m/my model' --dtype bfloat16 --map ")
    assert f"--map {run}/heads/window " in rd.command("heads_eval")
    assert f"--probes {run}/probes/no_loss_exit " in rd.command("monitor")
    assert rd.command("capture") == (
        f"reasonscope capture --model '/m/my model' --model-dtype bfloat16 --traces {run}/traces.jsonl "
        f"--hooks blocks.0.hook_resid_post --positions think --dtype bfloat16 --shard-size 1 --out {run}/capture"
    )
    assert "--thinking '/m/my model' --dtype bfloat16" in rd.command("hybrid")
    spaced = RunDir(tmp_path / "my run", own_model=True)
    assert f"--map '{tmp_path}/my run'/heads/duo " in spaced.command("heads_eval")  # pasted, one argument
    assert RunDir(tmp_path / "my run").command("heads") == f"reasonscope demo --out '{tmp_path}/my run'"
    plain = RunDir(tmp_path / "empty", own_model=True)
    assert "--model M --map" in plain.command("heads_eval") and "--positions segment_ends" in plain.command("capture")
    (run / "heads_eval").mkdir()  # no manifest: heads eval refuses a directory that is there, so delete it first
    with pytest.raises(LookupError) as e:
        rd.heads_eval()
    assert isinstance(e.value.__cause__, IncompleteArtifactError) and e.value.damaged == run / "heads_eval"


def test_an_exports_directory_of_exported_files_opens(tmp_path):
    """`reasonscope export --out RUN/exports/NAME` (the exports stage's command) writes plain files; the stage reads
    them back instead of asking for that command again, and a damaged one is named."""
    import torch

    from app.artifacts import Exports, RunDir
    from steering.export import export_vector
    from steering.vector import SteeringVector, VectorMeta

    meta = VectorMeta(model_id="m", d_model=4, layers=(1, 2), gamma=0.5, positions="last")
    vec = SteeringVector(torch.stack([torch.ones(4), -torch.ones(4)]), meta)
    run = tmp_path / "run"
    (run / "exports").mkdir(parents=True)
    export_vector(vec, run / "exports" / "asc.gguf", "gguf")
    export_vector(vec, run / "exports" / "asc.easysteer.gguf", "easysteer")
    export_vector(vec, run / "exports" / "asc.safetensors", "safetensors")
    export_vector(vec, run / "exports" / "plain", "gguf")  # any name: files are read by their content
    ex = RunDir(run, own_model=True).exports()
    assert {k: [p.name for p in v] for k, v in ex.files.items()} == {
        "gguf": ["asc.gguf", "plain"],
        "easysteer": ["asc.easysteer.gguf", "asc.easysteer.steering.json"],
        "safetensors": ["asc.safetensors"],
    }
    (run / "exports" / "asc.gguf").write_bytes(b"GGUF")  # cut short
    with pytest.raises(LookupError, match="asc.gguf") as e:
        RunDir(run, own_model=True).exports()
    assert e.value.damaged is None  # export rewrites that one file: the good ones are not to be deleted
    with pytest.raises(Exception, match="no exported vector"):
        Exports.open(tmp_path)


@organisms
def test_steering_page(quick_run, monkeypatch):
    at = _apptest(quick_run, "Steering", monkeypatch)
    assert at.header[0].value == "Steering"
    at.slider(key="st_gamma").set_value(0.5).run()
    at.selectbox(key="st_problem").set_value(3).run()
    assert not at.exception, [e.message for e in at.exception]
    texts = " ".join(m.value for m in at.markdown)
    assert "without steering" in texts and "steered, γ = 0.5" in texts


@organisms
def test_export_page(quick_run, monkeypatch):
    at = _apptest(quick_run, "Export", monkeypatch)
    labels = [b.proto.label for b in at.get("download_button")]
    assert any(s.endswith(".gguf") or ".gguf (" in s for s in labels), labels
    assert any(".safetensors" in s for s in labels), labels


@organisms
def test_stages_of_several_artifacts_skip_writers_temporaries(quick_run, tmp_path):
    """A running (or killed) writer's ``.name.*.tmp`` sibling is not an artifact; an empty stage says so."""
    from app.artifacts import MissingStage, RunDir

    copy = tmp_path / "run"
    shutil.copytree(quick_run, copy)
    (copy / "heads" / ".rlkv.x1y2.tmp").mkdir()
    (copy / "probes" / ".correct.x1y2.tmp").mkdir()
    run = RunDir(copy)
    assert set(run.head_maps()) == set(RunDir(quick_run).head_maps())
    assert set(run.probe_sets()) == set(RunDir(quick_run).probe_sets())
    shutil.rmtree(copy / "heads")
    (copy / "heads").mkdir()
    with pytest.raises(MissingStage, match="no finished artifact"):
        run.head_maps()


@organisms
def test_a_damaged_member_leaves_the_others_shown(quick_run, tmp_path, monkeypatch):
    """One unreadable head map is set aside with the command that deletes and rewrites it; the page still shows the
    maps that open (it showed none), and the demo still refuses to write over the damaged one."""
    from app.artifacts import RunDir
    from app.demo import DemoConfig, run_demo, summary_rows

    copy = tmp_path / "run"
    shutil.copytree(quick_run, copy)
    damaged = sorted(p for p in (copy / "heads").iterdir() if p.is_dir())[0]
    (damaged / "manifest.json").write_text("{")
    maps = RunDir(copy).head_maps()
    assert set(maps) == set(RunDir(quick_run).head_maps()) - {damaged.name}
    assert set(maps.damaged) == {damaged.name} and maps.damaged[damaged.name].damaged == damaged
    at = _apptest(copy, "Heads", monkeypatch)
    assert any(damaged.name in w.value for w in at.warning), [w.value for w in at.warning]
    assert any(f"rm -r {damaged}" in c.value for c in at.code)
    assert any("operand reads" in str(getattr(c, "proto", "")) for c in at.get("plotly_chart"))
    assert f"{damaged.name}: unreadable" in dict(summary_rows(RunDir(copy)))["heads"]
    with pytest.raises(ValueError, match=f"delete {damaged}"):
        run_demo(copy, DemoConfig.quick(), log=lambda _: None)


@organisms
def test_sweep_figure_keeps_test_and_selection_problems_apart(quick_run):
    from app.artifacts import RunDir
    from app.figures import steering_sweep_figure

    _, report = RunDir(quick_run).asc()
    names = [t.name for t in steering_sweep_figure(report).data]
    assert "accuracy (test)" in names and any(n.startswith("accuracy (selection, layer") for n in names)
    test = next(t for t in steering_sweep_figure(report).data if t.name == "accuracy (test)")
    assert report["steered"]["accuracy"] in list(test.y) and report["baseline"]["accuracy"] in list(test.y)


def test_signal_figure_names_each_signal_with_its_unit():
    from app.figures import signal_figure

    fig = signal_figure({"probe: correct": [0.2, None, 0.9], "entropy": [1.0, 0.5, float("nan")]}, [(0, 2, "0")])
    assert fig.layout.yaxis.title.text == "P(correct) · entropy (nats)"
    assert [list(t.y) for t in fig.data] == [[0.2, None, 0.9], [1.0, 0.5, None]]


def test_a_head_map_click_is_followed_once():
    from app.views.heads import follow_click

    state: dict = {"hd_layer": 0, "hd_head": 0}
    follow_click(state, (2, 1))
    assert (state["hd_layer"], state["hd_head"]) == (2, 1)
    state["hd_layer"] = 3  # the user picks another layer; the chart still holds the old click on the next rerun
    follow_click(state, (2, 1))
    assert (state["hd_layer"], state["hd_head"]) == (3, 1)
    follow_click(state, (1, 0))  # a new click wins again
    assert (state["hd_layer"], state["hd_head"]) == (1, 0)
    follow_click(state, None)
    assert (state["hd_layer"], state["hd_head"]) == (1, 0)


def test_layer_sweep_figure_places_each_hook_at_the_layer_it_reads():
    from app.figures import layer_sweep_figure

    def row(auroc):
        return {"auroc": auroc, "auroc_ci": [auroc - 0.1, auroc + 0.1], "control_auroc": 0.5}

    hooks = {"blocks.0.hook_resid_pre": row(0.6), "blocks.2.hook_resid_pre": row(0.7)}
    hooks |= {"blocks.0.hook_resid_post": row(0.8), "blocks.1.hook_resid_post": row(0.9)}
    lines = {t.name: t for t in layer_sweep_figure({"correct": {"layers": hooks}}).data}
    pre, post = lines["correct hook_resid_pre"], lines["correct hook_resid_post"]
    assert list(pre.x) == [-1, 1] and list(pre.y) == [0.6, 0.7]  # block N's input is block N-1's output
    assert list(post.x) == [0, 1] and list(post.y) == [0.8, 0.9]
    only = layer_sweep_figure({"correct": {"layers": {"blocks.3.hook_resid_post": row(0.8)}}}).data
    assert [t.name for t in only] == ["correct", "correct (control)"]


@organisms
def test_calibration_curve_reads_the_test_rows_of_its_own_model(quick_run):
    import dataclasses

    from app.analysis import calibration_curve
    from app.artifacts import RunDir

    run = RunDir(quick_run)
    store, labels, ps = run.store(), run.labels(), run.probe_sets()["correct"]
    pred, obs, counts = calibration_curve(store, labels, ps)
    assert sum(counts) == int(ps.report["best"]["n"]) and all(0 <= v <= 1 for v in pred + obs)
    with pytest.raises(ValueError, match="weight hash"):
        calibration_curve(store, labels, dataclasses.replace(ps, weight_hash="sha256:other"))


@organisms
def test_missing_stage_shows_the_command(quick_run, tmp_path, monkeypatch):
    part = tmp_path / "partial"
    part.mkdir()
    shutil.copytree(quick_run / "traces", part / "traces")
    for page in ("Heads", "Probes", "Steering", "Export"):
        at = _apptest(part, page, monkeypatch)
        assert any("reasonscope demo --out" in w.value for w in at.warning), page
        assert not at.exception


@organisms
def test_a_missing_hybrid_stage_gives_its_command_not_an_install_hint(quick_run, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(quick_run, copy, ignore=shutil.ignore_patterns("hybrid"))
    at = _apptest(copy, "Steering", monkeypatch)
    infos = [i.value for i in at.info]
    assert any("no usable 'hybrid' stage" in i and f"reasonscope demo --out {copy}" in i for i in infos), infos
    assert not any("install" in i for i in infos), infos  # steering.hybrid is installed


def test_app_command_checks_the_run_dir(tmp_path):
    r = runner.invoke(cli, ["app", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "reasonscope demo --out" in r.stderr
    r = runner.invoke(cli, ["app", str(tmp_path)])
    assert r.exit_code == 2 and "holds no demo run" in r.stderr
    (tmp_path / "afile").write_text("")
    r = runner.invoke(cli, ["app", str(tmp_path / "afile")])  # not "demo --out afile", which refuses a file
    assert r.exit_code == 2 and "is a file, not a run directory" in r.stderr and "--out DIR" in r.stderr
    (tmp_path / "traces").mkdir()
    (tmp_path / "run.json").write_text("{}")
    r = runner.invoke(cli, ["app", str(tmp_path), "--model", "organism:thinking"])
    assert r.exit_code == 2 and "demo run" in r.stderr and "without --model" in r.stderr


@pytest.fixture(scope="module")
def own_run(r1_tiny_dir, tmp_path_factory) -> Path:
    """A run on "your own model" (a tiny model with the R1 tokenizer and chat format), written by the stage
    commands into one directory: GSM8K traces, a head map, activations, chunk labels and an ASC vector."""
    from conftest import shared_data

    run = tmp_path_factory.mktemp("own") / "run"
    m, gsm8k = str(r1_tiny_dir), f"gsm8k:{shared_data('gsm8k/test.jsonl')}"
    traces = str(run / "traces.jsonl")
    pairs = run.parent / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps(
                {"question": f"what is {i}+1?", "concise": f"{i}+1={i + 1}.", "verbose": f"so {i}+1={i + 1}. yes."}
            )
            + "\n"
            for i in range(4)
        )
    )
    steps = [
        ["traces", "generate", "--model", m, "--dataset", gsm8k, "--n", "4", "--temperature", "1"]
        + ["--max-new-tokens", "40", "--out", traces],
        ["heads", "score", "--model", m, "--traces", traces, "--out", str(run / "heads" / "window")],
        ["capture", "--model", m, "--traces", traces, "--positions", "segment_ends", "--out", str(run / "capture")],
        ["probe", "labels", "--traces", traces, "--out", str(run / "labels")],
        ["steer", "asc", "--model", m, "--pairs-file", str(pairs), "--dataset", gsm8k, "--layers", "1"]
        + ["--n-select", "2", "--n-eval", "2", "--sweep", "0.5", "--max-new-tokens", "6", "--out", str(run / "asc")],
    ]
    for args in steps:
        r = runner.invoke(cli, args)
        assert r.exit_code == 0, (args, r.output)
    return run


def test_explorer_on_a_run_of_your_own_model(own_run, r1_tiny_dir, monkeypatch):
    """Every page opens a run the stage commands wrote on another model: the traces page colours that model's
    traces by its entropies, the heads page shows its attention, the steering page generates on the traces'
    prompts, the export page exports the run's ASC vector, and a stage the run lacks names its own command."""
    monkeypatch.setenv("REASONSCOPE_MODELS", json.dumps({"thinking": str(r1_tiny_dir), "dtype": "float32"}))
    at = _apptest(own_run, "Traces", monkeypatch)
    assert at.header[0].value == "Traces" and len(at.get("html")) >= 1
    assert any(str(r1_tiny_dir) in c.value for c in at.sidebar.caption)
    at.selectbox(key="tr_pick").set_value(at.selectbox(key="tr_pick").options[1].split(" · ")[0]).run()
    assert not at.exception, [e.message for e in at.exception]
    at = _apptest(own_run, "Heads", monkeypatch)
    at.selectbox(key="hd_layer").set_value(1).run()
    assert not at.exception and any("L1H0" in str(getattr(c, "proto", "")) for c in at.get("plotly_chart"))
    assert any("reasonscope heads eval" in i.value for i in at.info)
    at = _apptest(own_run, "Steering", monkeypatch)
    texts = " ".join(m.value for m in at.markdown)
    assert "without steering" in texts and "steered, γ" in texts
    at = _apptest(own_run, "Probes", monkeypatch)
    assert any("reasonscope probe fit" in w.value for w in at.warning)
    at = _apptest(own_run, "Export", monkeypatch)  # no exports stage: the run's ASC vector is exported here
    labels = [b.proto.label for b in at.get("download_button")]
    assert any(".gguf (" in s for s in labels) and any(".safetensors (" in s for s in labels), labels


def test_app_command_on_a_run_of_your_own_model(own_run, tmp_path):
    r = runner.invoke(cli, ["app", str(own_run)])
    assert r.exit_code == 2 and "--model" in r.stderr and "own model" in r.stderr
    r = runner.invoke(cli, ["app", str(tmp_path), "--model", "organism:thinking"])
    assert r.exit_code == 2 and "traces.jsonl" in r.stderr
    r = runner.invoke(cli, ["app", str(own_run), "--model", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "nope" in r.stderr
    r = runner.invoke(cli, ["app", str(own_run), "--model", "organism:thinking", "--dtype", "int3"])
    assert r.exit_code == 2 and "--dtype" in r.stderr


def test_token_signals_put_surprise_on_the_written_token(tiny_handle, task_traces):
    """The traces page's signals: one value per token; ``surprise`` at token t is -log p(token t | tokens < t)."""
    import math

    import torch

    from app.analysis import token_signals

    t = task_traces[0]
    sig = token_signals(tiny_handle, t)
    assert {len(v) for v in sig.values()} == {len(t.token_ids)}
    with torch.no_grad():
        lp = tiny_handle.run(torch.tensor([t.token_ids]))[0].float().log_softmax(-1)
    assert math.isnan(sig["surprise"][0])
    for k in (1, 7, len(t.token_ids) - 1):
        assert sig["surprise"][k] == pytest.approx(float(-lp[k - 1, t.token_ids[k]]), rel=1e-5)


def test_explorer_without_a_run_says_how_to_start(monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.delenv("REASONSCOPE_RUN", raising=False)
    at = AppTest.from_file(EXPLORER, default_timeout=60).run()
    assert not at.exception
    assert "reasonscope app RUN_DIR" in at.error[0].value


# ---------------------------------------------------------------------------- a real browser

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        msg = "Debian's chromium is not installed (scripts/setup.sh installs it: apt-get install chromium)"
        if required():
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(run: Path, port: int) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("reasonscope")
    proc = subprocess.Popen(
        [str(exe), "app", str(run), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the explorer exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("the explorer did not answer its health check within 90 s")


def _settle(page, timeout_s: float = 180) -> None:
    """Wait until Streamlit finished the rerun (no running indicator, no spinner), then check for exceptions."""
    page.wait_for_timeout(500)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').count() + page.locator(".stSpinner").count()
        if running == 0:
            break
        page.wait_for_timeout(300)
    page.wait_for_timeout(700)
    errors = page.locator('[data-testid="stException"]')
    assert errors.count() == 0, errors.first.inner_text()


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@organisms
def test_stopping_the_app_command_stops_the_server(quick_run):
    """`reasonscope app` becomes the server: terminating it leaves no Streamlit process behind on the port."""
    port = _free_port()
    proc = _serve(quick_run, port)
    proc.terminate()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _answers(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _answers(port)


@organisms
def test_explorer_in_chromium(quick_run, tmp_path):
    """Every page in headless Chromium: pick a trace, click a head, move γ; no exception; screenshots saved."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = _chromium()
    shots = Path(os.environ.get("REASONSCOPE_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    proc = _serve(quick_run, port)
    saved = []
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1300})
            page.goto(f"http://localhost:{port}/", timeout=120_000)
            page.get_by_role("heading", name="Traces").wait_for(timeout=120_000)
            _settle(page)

            def go(name: str) -> None:
                page.get_by_test_id("stSidebar").get_by_text(name, exact=True).click()
                page.get_by_role("heading", name=name, exact=True).wait_for(timeout=120_000)
                _settle(page)

            def shot(name: str) -> None:
                path = shots / f"{name}.png"
                page.screenshot(path=str(path), full_page=True)
                saved.append(path)

            # Traces: select another trace
            page.get_by_test_id("stSelectbox").filter(has_text="trace (").click()
            page.get_by_role("option").nth(2).click()
            _settle(page)
            assert page.locator("text=coloured by").count() > 0
            shot("traces")

            # Heads: click a cell of the head map; the attention view follows the clicked head
            go("Heads")
            titles: list[str] = []
            for _ in range(3):  # a click landing while the page reruns is dropped by the browser: click again
                box = page.locator(".js-plotly-plot").first.locator(".nsewdrag").first.bounding_box()
                assert box is not None
                page.mouse.click(box["x"] + 0.75 * box["width"], box["y"] + 0.6 * box["height"])  # cell L2, H1
                _settle(page)
                titles = [t.text_content() or "" for t in page.locator(".gtitle").all()]
                if any(t.startswith("L2H1 on") for t in titles):
                    break
            assert any(t.startswith("L2H1 on") for t in titles), f"clicking head L2H1 did not select it: {titles}"
            shot("heads")

            go("Probes")
            assert page.locator(".js-plotly-plot").count() >= 4
            shot("probes")

            # Steering: move the γ slider with the keyboard
            go("Steering")
            value = page.get_by_test_id("stSliderThumbValue").first
            before = value.inner_text()
            page.get_by_role("slider").first.focus()
            for _ in range(4):
                page.keyboard.press("ArrowRight")
            _settle(page)
            after = value.inner_text()
            assert before != after, (before, after)
            # the steered completion is generated after the slider moves: wait for it (a loaded machine is slow)
            page.get_by_text(f"steered, γ = {float(after):g}").first.wait_for(timeout=120_000)
            assert page.get_by_text("without steering").count() > 0
            shot("steering")

            go("Export")
            assert page.get_by_test_id("stDownloadButton").count() >= 3
            shot("export")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print("screenshots:", *map(str, saved), sep="\n  ")


def test_a_run_given_on_the_command_line_wins_over_the_environment(monkeypatch, tmp_path):
    from app.state import RUN_ENV, run_path

    monkeypatch.setenv(RUN_ENV, str(tmp_path / "left-over"))
    monkeypatch.setattr("sys.argv", ["explorer.py", str(tmp_path / "given")])
    assert run_path() == tmp_path / "given"
    monkeypatch.setattr("sys.argv", ["explorer.py"])
    assert run_path() == tmp_path / "left-over"


def test_probe_sets_that_cannot_read_the_capture_are_set_aside_with_the_fix(tmp_path):
    from types import SimpleNamespace

    from test_probes import synthetic

    from app.analysis import readable_sets
    from probes.fit import fit_probes
    from probes.train import ProbeConfig

    store, table = synthetic(tmp_path, n_problems=20)
    ps = fit_probes(store, table, ProbeConfig(epochs=2), tmp_path / "p")
    sets = {"correct": ps}
    assert readable_sets(sets, store) == (sets, [])
    other_hooks = SimpleNamespace(manifest=SimpleNamespace(hooks={"blocks.0.hook_attn_out": 16}, weight_hash="x"))
    assert readable_sets(sets, other_hooks)[0] == {}
    assert f"recapture with --hooks {ps.best_hook}" in readable_sets(sets, other_hooks)[1][0]
    other_model = SimpleNamespace(manifest=SimpleNamespace(hooks=store.manifest.hooks, weight_hash="sha256:other"))
    assert "another model" in readable_sets(sets, other_model)[1][0]
