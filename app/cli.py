"""``reasonscope demo`` and ``reasonscope app`` (mounted through the ``reasonscope.commands`` entry points).

Same rules as :mod:`reasonscope.cli`: arguments and locations are checked before a model loads; a user error is one
``error:`` line and exit status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from reasonscope.cli_kit import fail, model_geometry, out_dir, say

EXPLORER = Path(__file__).resolve().parent / "explorer.py"


def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), help="Run directory (finished stages in it are reused)."),
    n: Optional[int] = typer.Option(None, min=1, help="Organism problems traced per model (default 160; quick 32)."),
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
    run: Path = typer.Argument(..., help="A run directory written by `reasonscope demo --out RUN_DIR`."),
    port: int = typer.Option(8501, min=1, max=65535, help="Port to serve the explorer on."),
    address: str = typer.Option("localhost", help="Address to listen on (0.0.0.0 to expose it)."),
) -> None:
    """Open the Streamlit explorer on a run directory (headless: open the printed URL in a browser)."""
    if not run.is_dir():
        fail(f"{run} is not a directory; write a run with `reasonscope demo --out {run}` first")
    if not (run / "run.json").is_file() and not (run / "traces").is_dir():
        fail(f"{run} holds no demo run (no run.json or traces/); write one with `reasonscope demo --out {run}`")
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
    os.execve(sys.executable, cmd, {**os.environ, "REASONSCOPE_RUN": str(run.resolve())})
