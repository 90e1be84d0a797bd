"""Heads page: layer × KV-head maps per scorer, compression curves, and one head's attention on a trace."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app import analysis, figures
from app.artifacts import RunDir
from app.state import artifact, background, cached, model, need, pick_trace, stamp
from reasonscope.heads.figures import curves_figure, head_map_figure

CURVE_METRICS = {"accuracy": "accuracy", "thinking length": "mean_think_tokens", "KV bytes": "kv_bytes"}


def clickable(fig: go.Figure) -> go.Figure:
    """Add an invisible marker on every heatmap cell: Streamlit reports clicks on points, not on heatmap cells."""
    heat = fig.data[0]
    xs, ys = list(heat.x), list(heat.y)
    cells = [(x, y) for y in ys for x in xs]
    fig.add_trace(
        go.Scatter(
            x=[x for x, _ in cells],
            y=[y for _, y in cells],
            mode="markers",
            marker=dict(symbol="square", size=36, color="rgba(0,0,0,0)"),
            hovertemplate="%{y} %{x}: click to show its attention<extra></extra>",
            showlegend=False,
        )
    )
    return fig


def _clicked(event: Any) -> tuple[int, int] | None:
    """(layer, KV head) of a click on the head map, if any."""
    points = getattr(getattr(event, "selection", None), "points", None) or []
    if not points:
        return None
    p = points[0]
    try:
        return int(str(p["y"]).lstrip("L")), int(str(p["x"]).lstrip("H"))
    except (KeyError, ValueError, TypeError):
        return None


def follow_click(state: MutableMapping[Any, Any], hit: tuple[int, int] | None) -> None:
    """Show the clicked head, once per click: the chart keeps its selection across reruns, so an old click must not
    undo a later choice in the layer and KV-head boxes."""
    if hit is not None and hit != state.get("hd_click"):
        state["hd_click"] = hit
        state["hd_layer"], state["hd_head"] = hit


def render(run: RunDir) -> None:
    st.header("Heads")
    got = need(run, "heads")
    if got is None:
        return
    maps = got[0]
    scorer = st.radio("scorer", list(maps), horizontal=True, key="hd_scorer")
    hm = maps[scorer]
    n_layers, n_kv = hm.scores.shape
    if "hd_layer" not in st.session_state:  # start on the scorer's top head
        top = int(hm.scores.flatten().argmax())
        st.session_state["hd_layer"], st.session_state["hd_head"] = divmod(top, int(n_kv))
    left, right = st.columns(2)
    with left:
        fig = clickable(head_map_figure(hm.scores, f"{scorer} scores (higher = keep a full cache); click a head"))
        event = st.plotly_chart(fig, on_select="rerun", selection_mode="points", key=f"hd_map_{scorer}")
        follow_click(st.session_state, _clicked(event))
        st.caption(f"window: {hm.policy.sink} sink + {hm.policy.recent} recent tokens · {hm.aggregation}")
    with right:
        _curves(run)
    _attention(run, n_layers, n_kv)


def _curves(run: RunDir) -> None:
    if not run.has("heads_eval"):
        st.info(f"no compression curves yet: `{run.command('heads_eval')}` writes them")
        return
    got = need(run, "heads_eval")
    if got is None:
        return
    result = got[0].result
    label = st.radio("curve", list(CURVE_METRICS), horizontal=True, key="hd_metric")
    fig = curves_figure(result, CURVE_METRICS[label or "accuracy"])
    fig.update_layout(title=f"{label} vs sparsity ({result['n_problems']} problems)", height=380)
    st.plotly_chart(fig, key="hd_curves")
    for key, truth in (("retrieval", "value reads (retrieval)"), ("name_reads", "name reads")):
        if f"{key}_spearman" in result:
            st.caption(
                f"Spearman with the {truth} ground truth (top two: {', '.join(result[f'{key}_top2'])}): "
                + ", ".join(f"{m} {v:.2f}" for m, v in result[f"{key}_spearman"].items())
            )


def _attention(run: RunDir, n_layers: int, n_kv: int) -> None:
    st.subheader("a head's attention on a trace")
    c1, c2, c3 = st.columns([1, 1, 3])
    layer = c1.selectbox("layer", range(n_layers), key="hd_layer")
    head = c2.selectbox("KV head", range(n_kv), key="hd_head")
    try:
        ts = artifact(run, "traces")
    except LookupError as e:
        st.warning(str(e))
        return
    rows = [t for t in ts.traces["thinking"] if t.think_span and t.meta.get("level", 0) >= 2]
    rows = rows or [t for t in ts.traces["thinking"] if t.think_span]
    if not rows:
        st.info("no thinking trace to show")
        return
    t = pick_trace(c3, "trace", rows, lambda t: f"level {t.meta.get('level')}", key="hd_trace")
    handle = model("thinking", eager=True)
    attn = cached(
        f"attn/{run.path}/{stamp(run, 'traces')}/{t.id}/{layer}/{head}",
        lambda: background(analysis.head_attention, handle, t, layer, head, label=f"attention of L{layer}H{head}"),
    )
    reads = analysis.operand_reads(t, handle.tokenizer)
    tokens = analysis.token_strings(handle.tokenizer, t.token_ids)
    mass = [float(attn[q, list(keys)].sum()) for q, keys in reads]
    title = f"L{layer}H{head} on {t.id}: mean attention of operand reads on their definitions {_mean(mass):.2f}"
    st.plotly_chart(figures.attention_figure(attn.tolist(), tokens, reads, title), key="hd_attn")
    if reads:
        table = [
            {
                "read at": f"{q}:{tokens[q]!r}",
                "definition": " ".join(tokens[k] for k in keys),
                "attention mass": round(m, 3),
            }
            for (q, keys), m in zip(reads, mass)
        ]
        st.dataframe(pd.DataFrame(table), hide_index=True)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
