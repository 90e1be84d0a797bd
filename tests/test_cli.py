"""The `reasonscope` CLI: end to end on a tiny model, and every user error as one early `error:` line (exit 2)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from reasonscope.cli import app
from reasonscope.store import ActivationStore
from reasonscope.traces.loaders import read_traces_jsonl

from conftest import organisms

runner = CliRunner()


def user_error(r: Result, *needles: str) -> str:
    """Assert ``r`` failed with exit status 2 and exactly one ``error:`` line, no traceback; return that line."""
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads a model or generates (validation must come first)."""
    import reasonscope.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were validated")

    monkeypatch.setattr(reasonscope.models, "load_model", refuse)


def test_help_does_not_load_torch():
    """``reasonscope --help`` (and a command's help) stays fast: nothing it imports pulls in torch."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from reasonscope.cli import app\n"
        "for args in (['--help'], ['steer', 'asc', '--help'], ['probe', 'fit', '--help'], ['heads', '--help']):\n"
        "    r = CliRunner().invoke(app, args)\n"
        "    assert r.exit_code == 0, (args, r.output)\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.fixture(scope="module")
def traces_file(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "traces.jsonl"
    r = runner.invoke(
        app,
        ["traces", "generate", "--model", str(tiny_model_dir), "--n", "6", "--out", str(out), "--max-new-tokens", "12"],
    )
    assert r.exit_code == 0, r.output
    assert "generate" in r.stderr  # progress is shown
    return out


def capture_args(model, traces, out, *extra: str) -> list[str]:
    return ["capture", "--model", str(model), "--traces", str(traces), "--out", str(out), *extra]


# ---------------------------------------------------------------------------- what works


def test_generate_then_capture(tiny_model_dir, traces_file, tmp_path):
    traces = read_traces_jsonl(traces_file)
    assert len(traces) == 6 and all(t.think_span for t in traces)
    # a random model rarely closes its thinking in 12 tokens: such traces are kept and flagged
    assert all(t.truncated == ("</think>" not in t.thinking and t.answer == "") for t in traces)
    store_dir = tmp_path / "store"
    r = runner.invoke(
        app,
        capture_args(
            tiny_model_dir,
            traces_file,
            store_dir,
            "--hooks",
            "hook_resid_post,blocks.1.attn.hook_z",
            "--positions",
            "all",
            "--shard-size",
            "4",
            "--dtype",
            "bf16",
        ),
    )
    assert r.exit_code == 0, r.output
    assert "capture" in r.stderr  # progress
    store = ActivationStore.open(store_dir)
    assert set(store.manifest.hooks) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.attn.hook_z"}
    assert store.manifest.dtype == "bfloat16"
    assert len(store) == sum(len(t.token_ids) for t in traces) and store.n_shards == 2


def test_capture_into_a_store_of_other_hooks_is_refused_before_loading(
    tiny_model_dir, traces_file, tmp_path, monkeypatch
):
    store_dir = tmp_path / "store"
    first = ["--hooks", "blocks.0.hook_resid_post", "--positions", "all"]
    r = runner.invoke(app, capture_args(tiny_model_dir, traces_file, store_dir, *first))
    assert r.exit_code == 0, r.output
    before = sorted(p.name for p in store_dir.rglob("*"))
    import reasonscope.models

    monkeypatch.setattr(reasonscope.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded first"))
    for extra in (
        ["--hooks", "blocks.1.hook_resid_post", "--positions", "all"],
        [*first[:2], "--positions", "last"],
        [*first, "--dtype", "bf16"],  # the storage dtype, and the shard size: refused before loading too
        [*first, "--shard-size", "3"],
    ):
        line = user_error(runner.invoke(app, capture_args(tiny_model_dir, traces_file, store_dir, *extra)))
        assert "this job asks for" in line and "--out" in line
    assert sorted(p.name for p in store_dir.rglob("*")) == before


def test_capture_attention_patterns_loads_eager(tiny_model_dir, traces_file, tmp_path):
    for backend in ("hf", "nnsight"):
        r = runner.invoke(
            app,
            capture_args(
                tiny_model_dir,
                traces_file,
                tmp_path / backend,
                "--hooks",
                "blocks.0.attn.hook_pattern",
                "--positions",
                "last",
                "--backend",
                backend,
            ),
        )
        assert r.exit_code == 0, r.output


def test_verify(tiny_model_dir, traces_file, tmp_path):
    store = tmp_path / "store"
    r = runner.invoke(app, capture_args(tiny_model_dir, traces_file, store, "--positions", "last"))
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["verify", str(store)])
    assert r.exit_code == 0 and "OK" in r.stderr, r.output
    run = tmp_path / "run"  # a run directory: every artifact below it, none inside another, temporaries skipped
    shutil.copytree(store, run / "capture")
    shutil.copytree(store, run / "probes" / "correct")
    (run / "probes" / ".correct.x.tmp").mkdir()
    r = runner.invoke(app, ["verify", str(run)])
    assert r.exit_code == 0 and r.stderr.count(": OK") == 2 and "probes/correct" in r.stderr, r.output
    shard = sorted((store / "shards").glob("*.safetensors"))[0]
    blob = bytearray(shard.read_bytes())
    blob[-8:] = bytes(255 - b for b in blob[-8:])  # 8 bytes altered inside the data
    shard.write_bytes(bytes(blob))
    user_error(runner.invoke(app, ["verify", str(store)]), shard.name, "sha256")
    shutil.copy(shard, run / "capture" / "shards" / shard.name)
    user_error(runner.invoke(app, ["verify", str(run)]), str(run / "capture"), "sha256")
    user_error(runner.invoke(app, ["verify", str(tmp_path / "missing")]), "does not exist")
    r = runner.invoke(app, ["verify", str(run / "probes")])  # a stage of one artifact a method
    assert r.exit_code == 0 and r.stderr.count(": OK") == 1, r.output


# ---------------------------------------------------------------------------- early, clean errors


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--n", "0"], "--n"),
        (["--n", "-5"], "--n"),
        (["--batch-size", "0"], "--batch-size"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--dtype", "int3"], "unknown dtype 'int3'"),
        (["--dataset", "squad"], "'organism', 'gsm8k:<path|hub id>'"),
        (["--samples", "3"], "pass --temperature > 0"),
        (["--dataset", "gsm8k:/nonexistent/test.jsonl"], "/nonexistent/test.jsonl is not a file"),
    ],
)
def test_generate_rejects_bad_arguments_before_loading(tiny_model_dir, tmp_path, no_model_load, args, needle):
    out = tmp_path / "t.jsonl"
    r = runner.invoke(app, ["traces", "generate", "--model", str(tiny_model_dir), "--out", str(out), *args])
    user_error(r, needle)
    assert not out.exists()


def test_several_samples_per_problem_share_the_problem_id(tiny_model_dir, tmp_path):
    out = tmp_path / "t.jsonl"
    args = ["--n", "3", "--samples", "2", "--temperature", "1", "--max-new-tokens", "8", "--out", str(out)]
    r = runner.invoke(app, ["traces", "generate", "--model", str(tiny_model_dir), *args])
    assert r.exit_code == 0, r.output
    traces = read_traces_jsonl(out)
    assert [t.id.split("#")[1] for t in traces] == ["s0", "s1"] * 3
    assert [t.meta["problem_id"] for t in traces[::2]] == [t.meta["problem_id"] for t in traces[1::2]]
    assert len({t.meta["problem_id"] for t in traces}) == 3
    assert any(a.token_ids != b.token_ids for a, b in zip(traces[::2], traces[1::2]))  # each request samples its own


def test_unwritable_out_fails_before_generation(tiny_model_dir, tmp_path, no_model_load):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    gen = ["traces", "generate", "--model", str(tiny_model_dir), "--out"]
    user_error(runner.invoke(app, [*gen, str(blocker / "t.jsonl")]), "is a file, not a directory")
    user_error(runner.invoke(app, [*gen, str(tmp_path)]), "is a directory")
    if Path("/proc/self").exists():  # a filesystem where nobody, root included, can create files
        user_error(runner.invoke(app, [*gen, "/proc/t.jsonl"]), "not writable")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        user_error(runner.invoke(app, [*gen, str(ro / "t.jsonl")]), "not writable")
    user_error(runner.invoke(app, capture_args(tiny_model_dir, blocker, blocker)), "--out", "is a file")
    user_error(runner.invoke(app, [*gen, str(blocker)]), "already exists", "--overwrite")  # nothing replaced
    assert blocker.read_text() == "x"


def test_option_values_are_user_errors_naming_the_option(tmp_path, no_model_load):
    from probes.cli import probe_app
    from steering.cli import steer_app

    user_error(runner.invoke(app, ["organism", "train", "--out", str(tmp_path / "o"), "--device", "tpu"]), "--device")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    r = runner.invoke(steer_app, ["hybrid", "--thinking", "/nope/x", "--out", str(tmp_path / "h")])
    user_error(r, "--thinking")
    r = runner.invoke(steer_app, ["hybrid", "--base", "organism:bse", "--out", str(tmp_path / "h")])
    user_error(r, "--base")
    user_error(
        runner.invoke(
            probe_app, ["fit", "--store", "s", "--labels", "l", "--out", str(tmp_path / "p"), "--device", "tpu"]
        ),
        "--device",
    )
    r = runner.invoke(steer_app, ["asc", "--out", str(tmp_path / "a"), "--epsilon", "-1"])
    assert user_error(r) == "error: --epsilon: epsilon must be > 0, got -1.0"
    r = runner.invoke(steer_app, ["asc", "--out", str(tmp_path / "a"), "--gamma-rule", "sweep", "--sweep", ","])
    user_error(r, "--sweep")
    r = runner.invoke(probe_app, ["fit", "--store", "s", "--labels", "l", "--out", str(tmp_path / "p"), "--lr", "0"])
    assert user_error(r) == "error: --lr: lr must be > 0, got 0.0"
    assert not (tmp_path / "a").exists() and not (tmp_path / "p").exists()


def test_configured_names_the_options_a_config_refuses():
    from dataclasses import dataclass

    from reasonscope.cli_kit import configured

    @dataclass(frozen=True)
    class Cfg:
        n_eval: int = 1
        n: int = 1

        def __post_init__(self) -> None:
            if self.n_eval < 1:
                raise ValueError(f"n_eval must be >= 1, got {self.n_eval}")
            if self.n == 2:
                raise ValueError("two is not allowed")

    assert configured(Cfg, n_eval=3) == Cfg(3)
    with pytest.raises(ValueError, match=r"^--n-eval: n_eval must be >= 1, got 0$"):
        configured(Cfg, n_eval=0, n=1)  # ``n`` is not a word of the message
    with pytest.raises(ValueError, match=r"^two is not allowed$"):
        configured(Cfg, n=2)


def test_missing_model_is_one_line(tmp_path, no_model_load):
    r = runner.invoke(app, ["traces", "generate", "--model", "/nonexistent", "--out", str(tmp_path / "t.jsonl")])
    user_error(r, "cannot load model '/nonexistent'", "organism:thinking")
    user_error(runner.invoke(app, ["organism", "eval", "--models-dir", str(tmp_path / "no")]), "not a directory")
    (tmp_path / "thinking").mkdir()
    user_error(runner.invoke(app, ["organism", "eval", "--models-dir", str(tmp_path)]), "thinking: has no config.json")


def test_debug_shows_the_traceback(tmp_path):
    r = runner.invoke(
        app, ["--debug", "traces", "generate", "--model", "/nonexistent", "--out", str(tmp_path / "t.jsonl")]
    )
    assert r.exit_code == 1 and type(r.exception).__name__ == "ModelNotFoundError"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--backend", "x"], "--backend 'x' is not one of hf, transformer_lens, nnsight"),
        (["--hooks", "blocks.0.resid"], "valid names"),
        (["--hooks", "blocks.9.hook_resid_post"], "layers 0..1"),
        (["--positions", "thinking"], "--positions 'thinking' is not one of all, think"),
        (["--dtype", "int8"], "--dtype"),
        (["--model-dtype", "fp8"], "--model-dtype"),
        (["--token-budget", "0"], "--token-budget"),
        (["--shard-size", "0"], "--shard-size"),
        (["--workers", "-1"], "--workers"),
    ],
)
def test_capture_rejects_bad_arguments_before_loading(
    tiny_model_dir, traces_file, tmp_path, no_model_load, args, needle
):
    user_error(runner.invoke(app, capture_args(tiny_model_dir, traces_file, tmp_path / "s", *args)), needle)
    assert not (tmp_path / "s").exists()


def test_capture_rejects_bad_traces_files(tiny_model_dir, traces_file, tmp_path, no_model_load):
    empty, garbage, bad = tmp_path / "empty.jsonl", tmp_path / "garbage.jsonl", tmp_path / "bad.jsonl"
    empty.write_text("\n")
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    bad.write_text(traces_file.read_text().splitlines()[0] + "\n{not json\n")
    cases = {
        empty: "holds no traces",
        garbage: f"{garbage}:1: not UTF-8",
        bad: f"{bad}:2: malformed JSON",
        tmp_path / "none.jsonl": "does not exist",
    }
    for path, needle in cases.items():
        user_error(runner.invoke(app, capture_args(tiny_model_dir, path, tmp_path / "s")), needle)
    assert not (tmp_path / "s").exists()


def test_capture_rejects_traces_the_model_cannot_read(tiny_model_dir, traces_file, tmp_path):
    t = json.loads(traces_file.read_text().splitlines()[0])
    oov = dict(t, id="oov", token_ids=t["token_ids"][:-1] + [10**6])
    long = dict(t, id="long", token_ids=(t["token_ids"] * 600)[:600], think_span=None, segments=[])
    for row, needle in ((oov, "'oov'"), (long, "'long'")):
        p = tmp_path / f"{row['id']}.jsonl"
        p.write_text(json.dumps(row) + "\n")
        user_error(
            runner.invoke(app, capture_args(tiny_model_dir, p, tmp_path / row["id"], "--positions", "all")), needle
        )


@pytest.mark.parametrize(
    "cmd",
    [["demo", "--n", "0"], ["organism", "eval", "--n", "-1"], ["organism", "train", "--out", "x", "--only", "both"]],
)
def test_organism_commands_validate(cmd, no_model_load):
    user_error(runner.invoke(app, cmd), cmd[-2])


def test_organism_questions_need_a_model_of_their_format(r1_tiny_dir, tmp_path, no_model_load):
    r = runner.invoke(app, ["traces", "generate", "--model", str(r1_tiny_dir), "--out", str(tmp_path / "t.jsonl")])
    user_error(r, "organism task", "--dataset gsm8k")
    assert not (tmp_path / "t.jsonl").exists()


def test_organism_train_needs_an_out_dir(no_model_load):
    """No default: a bare ``organism train`` used to overwrite the shipped organisms."""
    r = runner.invoke(app, ["organism", "train"])
    assert r.exit_code == 2 and "--out" in r.output


def test_repeated_trace_ids_are_refused_before_loading(tiny_model_dir, traces_file, tmp_path):
    twice = tmp_path / "twice.jsonl"
    twice.write_text(traces_file.read_text() * 2)
    user_error(runner.invoke(app, capture_args(tiny_model_dir, twice, tmp_path / "s")), "repeats record 1")
    assert not (tmp_path / "s").exists()


def test_capture_workers_refuse_a_device_map(tiny_model_dir, traces_file, tmp_path):
    args = capture_args(tiny_model_dir, traces_file, tmp_path / "s", "--workers", "2", "--device-map", "auto")
    user_error(runner.invoke(app, args), "--device-map", "--workers")
    assert not (tmp_path / "s").exists()


def test_usage_errors_are_one_line():
    user_error(runner.invoke(app, ["capture", "--model"]), "--model")
    user_error(runner.invoke(app, ["traces", "generate", "--n", "abc"]), "--n")


# ---------------------------------------------------------------------------- plugins (entry points)

PLUGINS = ("probe", "steer", "export")  # [project.entry-points."reasonscope.commands"] in pyproject.toml


@pytest.mark.parametrize("name", PLUGINS)
def test_plugins_are_mounted(name):
    r = runner.invoke(app, [name, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output and name in r.output


def test_console_script_lists_the_plugins():
    script = Path(sys.executable).with_name("reasonscope")
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert all(name in r.stdout for name in PLUGINS), r.stdout
    r = subprocess.run([str(script), "steer", "--help"], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "asc" in r.stdout and "apply" in r.stdout, r.stderr


def test_broken_plugin_is_skipped_with_one_warning(monkeypatch, capsys):
    import reasonscope.cli

    group = reasonscope.cli.PLUGIN_GROUP
    eps = [
        EntryPoint("broken", "no_such_module_xyz:app", group),
        EntryPoint("export", "steering.cli:export_cmd", group),
    ]
    monkeypatch.setattr(reasonscope.cli, "entry_points", lambda group: eps)
    root = typer.Typer()
    assert reasonscope.cli.mount_plugins(root) == ["export"]
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and "'broken'" in warnings[0], warnings


def test_plugin_errors_are_one_line_and_debug_reaches_them(tmp_path):
    args = [
        "probe",
        "fit",
        "--store",
        str(tmp_path / "s"),
        "--labels",
        str(tmp_path / "l"),
        "--out",
        str(tmp_path / "o"),
    ]
    user_error(runner.invoke(app, args), "does not exist")
    r = runner.invoke(app, ["--debug", *args])
    assert r.exit_code == 1 and r.exception is not None and not isinstance(r.exception, SystemExit)


def test_core_never_imports_the_plugin_packages():
    core = Path(__file__).resolve().parents[1] / "reasonscope"
    pattern = re.compile(
        r"^\s*(import|from)\s+(probes|steering|app)\b|import_module\(\s*[\"'](probes|steering|app)\b", re.M
    )
    offenders = [
        f"{path.relative_to(core)}:{text[: m.start()].count(chr(10)) + 1}"
        for path in sorted(core.rglob("*.py"))
        for text in [path.read_text(encoding="utf-8")]
        for m in pattern.finditer(text)
    ]
    assert offenders == [], offenders


# ---------------------------------------------------------------------------- on the organisms (slow)


@organisms
@pytest.mark.slow
def test_organism_eval_json():
    r = runner.invoke(app, ["organism", "eval", "--json", "--n", "20"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    for kind in ("thinking", "base"):
        assert {"accuracy", "accuracy_by_difficulty", "mean_think_tokens"} <= set(report[kind])
    assert {"verbose_fraction", "mean_think_tokens_by_style"} <= set(report["thinking"])


@organisms
@pytest.mark.slow
def test_capture_on_the_thinking_organism(tmp_path):
    out = tmp_path / "t.jsonl"
    r = runner.invoke(app, ["traces", "generate", "--model", "organism:thinking", "--n", "8", "--out", str(out)])
    assert r.exit_code == 0, r.output
    traces = read_traces_jsonl(out)
    r = runner.invoke(
        app,
        [
            "capture",
            "--model",
            "organism:thinking",
            "--traces",
            str(out),
            "--positions",
            "segment_ends",
            "--out",
            str(tmp_path / "s"),
            "--shard-size",
            "3",
        ],
    )
    assert r.exit_code == 0, r.output
    store = ActivationStore.open(tmp_path / "s")
    assert len(store) == sum(len(t.segments) for t in traces) > 8
    assert store.get("blocks.3.hook_resid_post", trace=traces[0].id).shape == (len(traces[0].segments), 128)


def test_sigterm_unwinds_like_ctrl_c_and_leaves_no_temporary(tmp_path):
    """A SIGTERM'd command exits 143 through the same clean-up as Ctrl-C: no half-written output, no temporary."""
    import signal
    import time

    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "reasonscope.cli", "traces", "generate", "--model", "organism:thinking"]
    proc = subprocess.Popen([*cmd, "--n", "4000", "--out", str(out / "t.jsonl")], stderr=subprocess.DEVNULL)
    time.sleep(20)  # loaded and generating (4,000 problems take minutes)
    assert proc.poll() is None, "the command ended early"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert list(out.iterdir()) == []
