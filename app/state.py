"""What the explorer's pages share: the run directory, cached artifacts and models, background work.

Models load once per process (``st.cache_resource``); artifacts are cached per path and manifest time, so a stage the
demo finishes later shows up on the next rerun. Heavy work runs on a worker thread while the page shows progress.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import streamlit as st

from .artifacts import MODELS_ENV, Family, MissingStage, RunDir

T = TypeVar("T")
RUN_ENV = "REASONSCOPE_RUN"


def run_path() -> Path | None:
    """The run directory: ``streamlit run explorer.py -- RUN_DIR``, else ``$REASONSCOPE_RUN`` (an argument given
    on the command line wins over one left in the environment)."""
    given = None
    if sys.argv and sys.argv[0].endswith("explorer.py"):
        args = [a for a in sys.argv[1:] if not a.startswith("-")]
        given = args[0] if args else None
    given = given or os.environ.get(RUN_ENV)
    return Path(given) if given else None


@st.cache_resource(show_spinner=False)
def _executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="reasonscope-explorer")


def model_sources() -> dict[str, str]:
    """The model a run on your own model was made with, as ``reasonscope app --model/--dtype`` gave it
    (``{"thinking": source, "dtype": name}``); empty for a demo run, whose models are the organisms."""
    raw = os.environ.get(MODELS_ENV)
    return dict(json.loads(raw)) if raw else {}


def open_run(path: Path) -> RunDir:
    """The run directory, telling a run on your own model (``--model`` given) from a demo run."""
    given = model_sources()
    return RunDir(path, own_model=bool(given), sources=given)


def model(name: str, eager: bool = False) -> Any:
    """The run's ``name`` model (``thinking`` or ``base``): the organism on a demo run, on your own model the one
    ``reasonscope app --model`` was given (``thinking``); eager attention for attention maps. Loaded once."""
    given = model_sources()
    source = given.get(name) if given else f"organism:{name}"
    if source is None:
        raise LookupError(f"a run on your own model has one model, the thinking model of --model; not {name!r}")
    return _load(source, given.get("dtype") or "float32", eager)


@st.cache_resource(show_spinner="loading the model (once)")
def _load(source: str, dtype: str, eager: bool) -> Any:
    from reasonscope.models import load_model

    return load_model(source, dtype=dtype, attn_implementation="eager" if eager else None)


def stamp(run: RunDir, stage: str) -> float:
    """When ``stage`` was last written (its manifest's mtime, or its directory's): part of every cache key that
    depends on the stage, so a stage rewritten while the explorer runs is read again."""
    p = run.stage_path(stage)
    m = p / "manifest.json"
    return m.stat().st_mtime if m.exists() else (p.stat().st_mtime if p.exists() else 0.0)


@st.cache_resource(show_spinner="opening the run's artifacts")
def _opened(path: str, stage: str, stamp: float) -> Any:
    run = open_run(Path(path))
    return {
        "traces": run.traces,
        "capture": run.store,
        "heads": run.head_maps,
        "heads_eval": run.heads_eval,
        "labels": run.labels,
        "probes": run.probe_sets,
        "monitor": run.monitor,
        "asc": run.asc,
        "exports": run.exports,
        "hybrid": run.hybrid,
    }[stage]()


def artifact(run: RunDir, stage: str) -> Any:
    """The opened artifact of ``stage`` (cached), or :class:`MissingStage`."""
    return _opened(str(run.path), stage, stamp(run, stage))


def need(run: RunDir, *stages: str) -> list[Any] | None:
    """The artifacts of ``stages``; when one is missing, say what to run on the page and return None."""
    out = []
    for s in stages:
        try:
            got = artifact(run, s)
        except MissingStage as e:
            _say_missing(e)
            return None
        for bad in got.damaged.values() if isinstance(got, Family) else ():  # unreadable members; the rest shown
            _say_missing(bad)
        out.append(got)
    return out


def _say_missing(e: MissingStage) -> None:
    st.warning(str(e))
    st.code(e.command if e.damaged is None else f"rm -r {shlex.quote(str(e.damaged))}\n{e.command}", language="bash")


def background(fn: Callable[..., T], *args: Any, label: str = "working") -> T:
    """Run ``fn(*args)`` on the worker thread while the page shows a progress indicator; return its result."""
    fut: Future[T] = _executor().submit(fn, *args)
    with st.status(label, expanded=False) as status:
        bar = st.progress(0.0)
        t0 = time.perf_counter()
        while not fut.done():
            elapsed = time.perf_counter() - t0
            bar.progress(min(0.95, elapsed / (elapsed + 2.0)), text=f"{label} ({elapsed:.1f}s)")
            time.sleep(0.1)
        bar.progress(1.0, text=f"{label}: done in {time.perf_counter() - t0:.1f}s")
        status.update(label=f"{label}: done", state="complete")
    return fut.result()


@st.cache_data(show_spinner=False, max_entries=64)
def cached(key: str, _fn: Callable[[], T]) -> T:
    """``_fn()`` memoised under ``key`` (results of background work reused across reruns)."""
    return _fn()


def pick_trace(where: Any, label: str, rows: list[Any], describe: Callable[[Any], str], key: str) -> Any:
    """A trace chosen in a selectbox (``where``: ``st`` or a column) by id, so a filter change never swaps the
    trace silently; ``describe(trace)`` is its label after the id."""
    by_id = {t.id: t for t in rows}
    pick = where.selectbox(label, list(by_id), format_func=lambda i: f"{i} · {describe(by_id[i])}", key=key)
    return by_id.get(str(pick), rows[0])
