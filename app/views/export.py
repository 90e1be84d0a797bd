"""Export page: download the run's steering vector as GGUF (llama.cpp), EasySteer/vLLM or safetensors."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import streamlit as st

from app.artifacts import SUFFIX, Exports, MissingStage, RunDir
from app.state import artifact, cached, need, stamp

ABOUT = {
    "gguf": "llama.cpp control vector: `llama-cli --control-vector-scaled FILE:γ` (layers ≥ 1)",
    "easysteer": "EasySteer / vLLM: the GGUF with every layer and its `.steering.json` request",
    "safetensors": "tensors `direction.N` with the vector's metadata in the header",
}


def render(run: RunDir) -> None:
    st.header("Export")
    got = need(run, "asc")
    if got is None:
        return
    vec, _ = got[0]
    try:
        exports = artifact(run, "exports")
    except MissingStage as e:  # a run on your own model: export its ASC vector here
        if e.damaged is not None:
            st.warning(f"{e}. The files below are exported afresh from the ASC vector.")
        exports = cached(f"exports/{run.path}/{stamp(run, 'asc')}", lambda: _export(vec))
    m = vec.meta
    st.markdown(
        f"ASC vector of **{m.model_id}**: layers {list(m.layers)}, width {m.d_model}, "
        f"γ = {m.gamma:.3g} ({m.gamma_rule}), positions `{m.positions}`"
    )
    for fmt, paths in exports.files.items():
        st.subheader(fmt)
        st.caption(ABOUT.get(fmt, ""))
        for p in paths:
            st.download_button(
                f"download {p.name} ({p.stat().st_size:,} bytes)",
                data=p.read_bytes(),
                file_name=p.name,
                key=f"dl_{p.name}",
            )
    st.caption(
        f"or from the command line: `reasonscope export --in {run.stage_path('asc')} --format gguf --out asc.gguf`"
    )


def _export(vec: Any) -> Exports:
    """Every serving format of ``vec`` in a temporary ``vector_exports`` artifact (safetensors alone where
    llama.cpp's formats refuse the vector, e.g. one on block 0)."""
    out = Path(tempfile.mkdtemp(prefix="reasonscope-exports-")) / "exports"
    try:
        return Exports.write(vec, out, "asc", list(SUFFIX))
    except ValueError as e:
        st.warning(f"llama.cpp formats skipped: {e}")
        return Exports.write(vec, out, "asc", ["safetensors"])
