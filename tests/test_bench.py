"""The bench/ scripts run end to end at tiny sizes, and refuse counts that would silently run another workload."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import organisms

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )


@pytest.mark.parametrize(
    "script, args, needle",
    [
        ("generate.py", ["--problems", "0"], "--problems: 0 is not an integer >= 1"),
        ("generate.py", ["--shape", "1.5b", "--layers", "0"], "--layers: 0 is not an integer >= 1"),
        ("forced.py", ["--repeats", "0"], "--repeats: 0 is not an integer >= 1"),
        ("forced.py", ["--real", "-1"], "--real: -1 is not an integer >= 0"),
        ("heads.py", ["--methods", "window,foo"], "--methods: unknown ['foo']"),
        ("heads.py", ["--levels", "9"], "the task's levels are 1, 2, 3, 4, 5"),
        ("heads.py", ["--sparsities", "0,2"], "each is a fraction in [0, 1]"),
        ("memory.py", ["--n", "1"], "--n needs at least 2 sequences"),
        ("capture.py", ["--methods", "a,b"], "letters among abcdef"),
        ("probes.py", ["--repeats", "0"], "--repeats: 0 is not an integer >= 1"),
        ("steering.py", ["--problems", "0"], "--problems: 0 is not an integer >= 1"),
    ],
)
def test_bad_counts_are_refused_before_any_work(script, args, needle):
    r = bench(script, *args)
    assert r.returncode == 2 and needle in r.stderr, r.stderr[-2000:]


def _load(script: str):
    spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}", BENCH / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_1_5b_shape_refuses_layers_it_does_not_have():
    shapes = _load("shapes.py")
    for layers in (0, -1, 29):
        with pytest.raises(ValueError, match=r"layers=.*1\.\.28"):
            shapes.random_qwen2(layers, "meta")
    assert shapes.random_qwen2(1, "meta").geometry.n_layers == 1


@organisms
def test_heads_bench_writes_into_a_new_directory(tmp_path):
    out = tmp_path / "new" / "heads.json"
    r = bench(
        "heads.py",
        *("--n-train", "2", "--n-eval", "2", "--trace-tokens", "64", "--max-new-tokens", "64", "--methods"),
        *("window", "--draws", "1", "--sparsities", "0,0.5", "--batch-size", "2", "--out", str(out)),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "random" in r.stdout and set(json.loads(out.read_text())["curves"]) >= {"window", "random"}


@organisms
@pytest.mark.parametrize(
    "script, args, needle",
    [
        ("forced.py", ["--organism", "2", "--real", "0", "--repeats", "1"], "| organism | 2 |"),
        ("steering.py", ["--problems", "2", "--max-new", "4", "--repeats", "1"], "hooks alone, layer 2"),
        ("probes.py", ["--n", "2000", "--d", "16", "--repeats", "1", "--sk-repeats", "0", "--layers", "2"], "auroc"),
    ],
)
def test_bench_scripts_run_at_tiny_sizes(script, args, needle):
    r = bench(script, *args)
    assert r.returncode == 0 and needle in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])


def test_memory_bench_runs_and_shows_a_failing_worker(tmp_path, capsys):
    r = bench("memory.py", "--n", "2", "--tokens", "96", "--stages", "window", "--model-dir", str(tmp_path / "m"))
    assert r.returncode == 0 and "| window |" in r.stdout, r.stderr[-2000:]
    memory = _load("memory.py")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")  # not a model: the worker fails to load it
    args = argparse.Namespace(n=2, tokens=96, model_dir=tmp_path / "bad", threads=1)
    assert memory._run("window", args, lifted=False) == {"status": "exit 1"}
    assert "window failed" in capsys.readouterr().err  # its error is shown, not only "exit 1"
