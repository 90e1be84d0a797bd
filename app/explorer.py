"""The reasonscope explorer: ``reasonscope app RUN_DIR`` (or ``streamlit run app/explorer.py -- RUN_DIR``).

Pages: Traces, Heads, Probes, Steering, Export, each reading the run's artifacts; a stage the run lacks shows the
command that writes it.
"""

from __future__ import annotations

import streamlit as st

from app.state import RUN_ENV, model_sources, open_run, run_path
from app.views import export, heads, probes, steering, traces

PAGES = {
    "Traces": traces.render,
    "Heads": heads.render,
    "Probes": probes.render,
    "Steering": steering.render,
    "Export": export.render,
}


def main() -> None:
    st.set_page_config(page_title="reasonscope explorer", layout="wide")
    path = run_path()
    if path is None or not path.is_dir():
        st.error(
            f"no run directory{f' at {path}' if path else ''}: start the explorer with `reasonscope app RUN_DIR` "
            f"(or set {RUN_ENV}); write a run with `reasonscope demo --out runs/demo`"
        )
        return
    run = open_run(path)
    st.sidebar.title("reasonscope")
    st.sidebar.caption(f"run: {path}")
    given = model_sources()
    models = {k: v for k, v in given.items() if k != "dtype"} or {
        "thinking": "organism:thinking",
        "base": "organism:base",
    }
    st.sidebar.caption(" · ".join(f"{k}: {v}" for k, v in models.items()))
    page = st.sidebar.radio("page", list(PAGES), key="page")
    PAGES[page or "Traces"](run)


main()
