"""Traces page: one trace at a time, tokens coloured by entropy, deviation index, surprise or a probe's score."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import streamlit as st

from app import analysis, figures
from app.artifacts import RunDir
from app.state import artifact, background, cached, model, need, pick_trace, stamp

SIGNALS = ("entropy", "deviation index", "surprise")


def _filters(rows: list[Any], which: str) -> list[Any]:
    """The rows the filters keep; each model has its own filters (the base writes no style)."""
    c1, c2, c3 = st.columns(3)
    grade = c1.selectbox("correctness", ("all", "correct", "wrong"), key="tr_grade")
    levels = sorted({t.meta.get("level") for t in rows if t.meta.get("level") is not None})
    styles = sorted({t.meta.get("style") or "none" for t in rows})
    lv = c2.multiselect("level", levels, default=levels, key=f"tr_levels_{which}")
    sty = c3.multiselect("style", styles, default=styles, key=f"tr_styles_{which}")
    keep = []
    for t in rows:
        if grade != "all" and bool(t.grade) != (grade == "correct"):
            continue
        if levels and t.meta.get("level") not in lv:
            continue
        if sty and (t.meta.get("style") or "none") not in sty:
            continue
        keep.append(t)
    return keep


def _probe_values(run: RunDir, target: str, trace: Any) -> dict[int, float]:
    sets, store = artifact(run, "probes"), artifact(run, "capture")
    return analysis.probe_trajectory(store, sets[target], trace.id)


def render(run: RunDir) -> None:
    st.header("Traces")
    got = need(run, "traces")
    if got is None:
        return
    ts = got[0]
    c1, c2 = st.columns([1, 3])
    which = str(c1.radio("model", list(ts.traces), horizontal=True, key="tr_model"))
    c2.caption(
        " · ".join(
            f"{k}: accuracy {v['accuracy']:.2f}, {v['mean_think_tokens']:.0f} thinking tokens"
            for k, v in ts.summary.items()
        )
    )
    rows = _filters(ts.traces[which], which)
    if not rows:
        st.info("no trace matches these filters")
        return
    t = pick_trace(
        st,
        f"trace ({len(rows)} match)",
        rows,
        lambda t: f"level {t.meta.get('level')} · {'✓' if t.grade else '✗'} · {t.meta.get('style') or '-'}",
        key="tr_pick",
    )
    probe_targets: list[str] = []
    if which == "thinking" and run.has("probes") and run.has("capture"):
        try:
            store = artifact(run, "capture")
            sets = artifact(run, "probes")
            readable, why = analysis.readable_sets(sets, store)
            fresh, stale = analysis.captured(store, [t])
            probe_targets = list(readable) if fresh else []
            for w in [*why, *stale]:
                st.caption(w)
            for name, bad in sets.damaged.items():  # the targets that open still colour
                st.caption(f"probe colours are unavailable for '{name}': {bad}")
        except LookupError as e:  # a damaged probes or capture stage: say so, colour by the other signals
            st.caption(f"probe colours are unavailable: {e}")
            probe_targets = []
    colour = str(st.selectbox("colour tokens by", [*SIGNALS, *[f"probe: {p}" for p in probe_targets]], key="tr_colour"))

    m1, m2, m3, m4 = st.columns(4)
    m1.metric("grade", "correct" if t.grade else "wrong")
    m2.metric("gold / answer", f"{t.gold} / {t.answer.strip() or '-'}")
    m3.metric("thinking tokens", (t.think_span[1] - t.think_span[0]) if t.think_span else 0)
    m4.metric("truncated", "yes" if t.truncated else "no")
    st.markdown(f"**prompt** `{t.prompt}`")

    handle = model(which)
    signals = cached(
        f"signals/{run.path}/{stamp(run, 'traces')}/{which}/{t.id}",
        lambda: background(analysis.token_signals, handle, t, label="entropies"),
    )
    if colour.startswith("probe: "):
        target = colour.removeprefix("probe: ")
        probe = _probe_values(run, target, t)
        values: list[float | None] = [probe.get(i) for i in range(len(t.token_ids))]
    else:
        values = list(signals[colour])
    start = t.think_span[0] if t.think_span else 0
    tokens = analysis.token_strings(handle.tokenizer, t.token_ids)
    marks = [""] * len(tokens)
    for k, seg in enumerate(t.segments):
        for i in range(seg.start, min(seg.end, len(marks))):
            marks[i] = f"segment {k}"
    lo, hi = analysis.finite_range([v for v in values[start:] if v is not None])
    st.markdown(f"**tokens** coloured by *{colour}* (white {lo:.2f} → red {hi:.2f}; hover for values)")
    st.html(figures.token_html(tokens[start:], values[start:], lo, hi, marks[start:]))
    series: dict[str, list[float | None]] = {colour: values[start:]}
    if colour != "entropy":
        series["entropy"] = list(signals["entropy"][start:])
    spans = [(s.start - start, s.end - start, str(k)) for k, s in enumerate(t.segments)]
    st.plotly_chart(figures.signal_figure(series, spans), key="tr_signal")
    _segments(run, t, which)


def _segments(run: RunDir, t: Any, which: str) -> None:
    st.subheader("segments and labels")
    seg = pd.DataFrame(
        [{"segment": k, "tokens": f"[{s.start}, {s.end})", "text": s.text} for k, s in enumerate(t.segments)]
    )
    st.dataframe(seg, hide_index=True)
    if not run.has("labels"):
        st.caption(f"no chunk labels in this run: `{run.command('labels')}` writes them")
        return
    try:
        labels = artifact(run, "labels")
    except LookupError as e:
        st.warning(str(e))
        return
    idx = [i for i, tid in enumerate(labels.trace_id) if tid == t.id] if which == "thinking" else []
    if not idx:
        st.caption("this trace was not labelled (labels cover the thinking model's traces)")
        return
    if not analysis.labels_match(labels, idx, t):
        st.warning(
            f"the labels of {t.id!r} were made from another version of this trace; to relabel, delete "
            f"{run.stage_path('labels')} and run `{run.command('labels')}`"
        )
        return
    table = {"chunk": [labels.chunk[i] for i in idx], "text": [labels.text[i] for i in idx]}
    for name, vals in labels.targets.items():
        table[name] = [None if math.isnan(vals[i]) else round(vals[i], 3) for i in idx]
    st.dataframe(pd.DataFrame(table), hide_index=True)
