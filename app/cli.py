"""``reasonscope demo`` and ``reasonscope app`` (mounted through the ``reasonscope.commands`` entry points).

Same rules as :mod:`reasonscope.cli`: arguments and locations are checked before a model loads; a user error is one
``error:`` line and exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from reasonscope.cli_kit import DTYPE_HELP, dtype_option, fail, model_geometry, out_dir, say

from .artifacts import MODELS_ENV, STAGE_DIRS, TRACES_JSONL

EXPLORER = Path(__file__).resolve().parent / "explorer.py"


def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), help="Run directory (finished stages in it are reused)."),
    n: Optional[int] = typer.Option(None, min=1, help="Organism problems traced per model (default 160; quick 128)."),
    quick: bool = typer.Option(False, "--quick", help="Smoke-sized run: every stage, small numbers (~1 min)."),
) -> None:
    """Run the whole pipeline on the organisms: traces, capture, heads, probes, monitor, steering, exports."""
    out_dir(out)
    for kind in ("thinking", "base"):
        model_geometry(f"organism:{kind}")
    import time
    from dataclasses import replace

    from rich.console import Console
    from rich.table import Table

    from .artifacts import RunDir
    from .demo import DemoConfig, run_demo, summary_rows

    t0 = time.perf_counter()
    cfg = DemoConfig.quick() if quick else DemoConfig()
    report = run_demo(out, cfg if n is None else replace(cfg, n=n), log=say)
    table = Table(title=f"reasonscope demo: {out} ({time.perf_counter() - t0:.0f}s)")
    for col in ("stage", "status", "result"):
        table.add_column(col)
    status = {
        k: f"{v['status']} {v['seconds']:.0f}s" if v["status"] == "ran" else v["status"] for k, v in report.items()
    }
    for stage, headline in summary_rows(RunDir(out)):
        table.add_row(stage, status.get(stage, ""), headline)
    console = Console(width=160)
    console.print(table)
    console.print(f"open the explorer:  reasonscope app {out}")


def app_cmd(
    run: Path = typer.Argument(..., help="A run directory: `reasonscope demo --out RUN`, or your own model's stages."),
    model: Optional[str] = typer.Option(
        None, help="The thinking model a run on your own model was made with (its live views load it)."
    ),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    port: int = typer.Option(8501, min=1, max=65535, help="Port to serve the explorer on."),
    address: str = typer.Option("localhost", help="Address to listen on (0.0.0.0 to expose it)."),
) -> None:
    """Open the Streamlit explorer on a run directory (headless: open the printed URL in a browser).

    A run on your own model is a directory its stage commands wrote into (`traces generate --out RUN/traces.jsonl`,
    `capture --out RUN/capture`, `heads score --out RUN/heads/<method>`, `probe fit --out RUN/probes/<target>`, ...);
    open it with `--model` (and `--dtype`) so the live views load that model."""
    if run.is_file():
        fail(f"{run} is a file, not a run directory; pass a directory (`reasonscope demo --out DIR` writes one)")
    if not run.is_dir():
        fail(f"{run} is not a directory; write a run with `reasonscope demo --out {run}` first")
    model_dtype = dtype_option(dtype, "--dtype")  # checked whether or not a model is given
    demo = (run / "run.json").is_file() or (run / "traces").is_dir()
    own = (run / TRACES_JSONL).is_file() or any((run / d).is_dir() for d in STAGE_DIRS.values())
    if model is None and not demo:
        if own:
            fail(f"{run} is a run on your own model (no run.json); name its model: `reasonscope app {run} --model M`")
        fail(f"{run} holds no demo run (no run.json or traces/); write one with `reasonscope demo --out {run}`")
    if model is not None and (run / "run.json").is_file():
        fail(f"{run} is a demo run (run.json): its models are the shipped organisms; open it without --model")
    if model is not None and not own:
        fail(
            f"{run} holds no stage output; write its traces with "
            f"`reasonscope traces generate --model {model} --dataset D --out {run}/{TRACES_JSONL}` first"
        )
    given: dict[str, str] = {}
    if model is not None:
        given = {"thinking": model, "dtype": model_dtype}
        model_geometry(model)  # fails at once, naming what was tried
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(EXPLORER),
        "--server.headless=true",
        f"--server.port={port}",
        f"--server.address={address}",
        "--browser.gatherUsageStats=false",
        "--",
        str(run.resolve()),
    ]
    say(f"explorer on http://{address}:{port} (Ctrl-C stops it)")
    # the server replaces this process, so stopping `reasonscope app` (a signal, a supervisor) stops the server too
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, "REASONSCOPE_RUN": str(run.resolve())}
    env.pop(MODELS_ENV, None)
    if given:
        env[MODELS_ENV] = json.dumps(given)
    os.execve(sys.executable, cmd, env)
