"""Probes page: layer sweeps with intervals, calibration, trajectories along a trace, the monitor's trade-off."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app import analysis, figures
from app.artifacts import RunDir
from app.state import artifact, background, cached, need, pick_trace, stamp


def render(run: RunDir) -> None:
    st.header("Probes")
    got = need(run, "probes")
    if got is None:
        return
    sets = got[0]
    c1, c2 = st.columns(2)
    with c1:
        st.plotly_chart(figures.layer_sweep_figure({t: ps.report for t, ps in sets.items()}), key="pr_sweep")
    with c2:
        rows = []
        for t, ps in sets.items():
            b = ps.report["best"]
            rows.append(
                {
                    "target": t,
                    "best layer": ps.best_hook,
                    "AUROC": b["auroc"],
                    "within problem": b["auroc_within_problem"],
                    "ECE": b["ece"],
                    "Brier": b["brier"],
                    "selectivity": b["selectivity"],
                    **{f"{k} baseline": v.get("auroc") for k, v in ps.report["baselines"].items()},
                }
            )
        st.dataframe(pd.DataFrame(rows).round(3), hide_index=True)
    st.caption("calibration and trajectories read the probes on the activation store:")
    if need(run, "capture") is not None:  # one message when it is missing or damaged; the tables above still stand
        sets, why = analysis.readable_sets(sets, artifact(run, "capture"))
        for w in why:
            st.warning(w)
        with c2:
            _calibration(run, sets)
        _trajectory(run, sets)
    _monitor(run)


def _calibration(run: RunDir, sets: dict) -> None:
    got = need(run, "capture", "labels")
    if got is None:
        return
    store, labels = got
    curves = cached(
        f"calib/{run.path}/{stamp(run, 'probes')}/{stamp(run, 'capture')}/{stamp(run, 'labels')}",
        lambda: background(
            lambda: {t: analysis.calibration_curve(store, labels, ps) for t, ps in sets.items()},
            label="calibration on the held-out problems",
        ),
    )
    st.plotly_chart(figures.calibration_figure(curves), key="pr_calib")


def _trajectory(run: RunDir, sets: dict) -> None:
    st.subheader("probe trajectories along a trace")
    got = need(run, "traces", "capture")
    if got is None:
        return
    ts, store = got
    rows, why = analysis.captured(store, [t for t in ts.traces["thinking"] if t.think_span])
    for w in why:
        st.caption(w)
    if not rows:
        st.info("no trace of the traces stage with thinking is in the capture stage as it is now")
        return
    t = pick_trace(st, "trace", rows, lambda t: f"level {t.meta.get('level')} · {'✓' if t.grade else '✗'}", "pr_trace")
    start = t.think_span[0]
    fig = go.Figure()
    for target, ps in sets.items():
        traj = analysis.probe_trajectory(store, ps, t.id)
        xs = sorted(traj)
        fig.add_trace(go.Scatter(x=[x - start for x in xs], y=[traj[x] for x in xs], mode="lines", name=target))
    try:
        labels = artifact(run, "labels")
        mine = [i for i, tid in enumerate(labels.trace_id) if tid == t.id]
        if not analysis.labels_match(labels, mine, t):
            mine = []  # labels of an earlier version of this trace: their chunk ends are elsewhere
            st.caption(f"the labels of {t.id!r} were made from another version of it: relabel to mark its chunks")
        ends = [(labels.position[i], labels.targets["correct"][i]) for i in mine]
        marks = [(p - start, v) for p, v in ends if p >= 0]
        fig.add_trace(
            go.Scatter(
                x=[p for p, _ in marks],
                y=[1.04] * len(marks),
                mode="markers",
                name="chunk end (green: correct)",
                marker=dict(color=["green" if v == 1.0 else "red" if v == 0.0 else "grey" for _, v in marks], size=9),
            )
        )
    except LookupError:
        pass
    fig.update_layout(xaxis_title="thinking token", yaxis_title="probe probability", yaxis_range=[0, 1.1], height=320)
    st.plotly_chart(fig, key="pr_traj")
    st.caption(f"{t.prompt}  →  answer {t.answer.strip()} (gold {t.gold})")


def _monitor(run: RunDir) -> None:
    st.subheader("early-exit monitor: thinking saved vs accuracy")
    if not run.has("monitor"):
        st.info(f"no monitor sweep yet: `{run.command('monitor')}` writes it")
        return
    got = need(run, "monitor")
    if got is None:
        return
    res = got[0].result
    c1, c2 = st.columns([3, 2])
    c1.plotly_chart(figures.tradeoff_figure(res), key="pr_tradeoff")
    c2.dataframe(pd.DataFrame([{"policy": k, **v} for k, v in res.items()]).round(3), hide_index=True)
