"""Plotly figures of a run (the explorer's and the notebooks'); each returns a ``plotly.graph_objects.Figure``.

Head maps and compression curves come from :mod:`reasonscope.heads.figures`; these cover traces, probes, the
monitor, steering and attention.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

__all__ = [
    "attention_figure",
    "calibration_figure",
    "layer_sweep_figure",
    "signal_figure",
    "steering_sweep_figure",
    "token_html",
    "tradeoff_figure",
]


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def token_html(
    tokens: Sequence[str], values: Sequence[float | None], lo: float, hi: float, marks: Sequence[str] = ()
) -> str:
    """Tokens as HTML spans shaded white → red by ``values`` in ``[lo, hi]`` (grey where a value is missing).

    ``marks[i]`` (optional) is a tooltip suffix, e.g. a segment label.
    """
    spans = []
    for i, (tok, v) in enumerate(zip(tokens, values)):
        if _finite(v):
            assert v is not None
            a = 0.0 if hi <= lo else min(1.0, max(0.0, (v - lo) / (hi - lo)))
            bg = f"rgba(220,40,40,{0.08 + 0.8 * a:.2f})"
            tip = f"{v:.3f}"
        else:
            bg, tip = "rgba(160,160,160,0.15)", "n/a"
        if i < len(marks) and marks[i]:
            tip += f" | {marks[i]}"
        text = html.escape(tok).replace("\n", "↵<br>") or "&nbsp;"
        spans.append(f'<span title="{html.escape(tip)}" style="background:{bg};padding:1px 0;">{text}</span>')
    return '<div style="font-family:monospace;line-height:1.9;white-space:pre-wrap">' + "".join(spans) + "</div>"


def signal_figure(
    series: Mapping[str, Sequence[float | None]], spans: Sequence[tuple[int, int, str]] = ()
) -> go.Figure:
    """Per-token signals along a trace (x = token index); ``spans`` shade segments ``(start, end, label)``."""
    fig = go.Figure()
    for name, ys in series.items():
        fig.add_trace(go.Scatter(y=[y if _finite(y) else None for y in ys], mode="lines", name=name))
    for k, (s, e, label) in enumerate(spans):
        fig.add_vrect(x0=s - 0.5, x1=e - 0.5, fillcolor="#8888ff" if k % 2 else "#88cc88", opacity=0.08, line_width=0)
        if label:
            fig.add_annotation(x=(s + e) / 2, y=1.02, yref="paper", text=label, showarrow=False, font_size=9)
    fig.update_layout(
        xaxis_title="token (from the thinking's start)",
        yaxis_title=" · ".join(_unit(name) for name in series),
        height=300,
        margin=dict(t=30, b=40),
    )
    return fig


def _unit(signal: str) -> str:
    """A per-token signal's name with its unit: entropy and surprise in nats, a probe's output a probability."""
    if signal in ("entropy", "surprise"):
        return f"{signal} (nats)"
    if signal.startswith("probe: "):
        return f"P({signal[7:]})"
    return f"{signal} (ratio)" if signal == "deviation index" else signal


def _sweep_x(hook: str) -> int:
    """The layer a hook reads (conventions.md: layer N = block N's output): ``blocks.N.hook_resid_pre`` is block
    N-1's output (-1: the embeddings), any other hook of block N is at N."""
    _, n, kind = hook.split(".", 2)
    return int(n) - 1 if kind == "hook_resid_pre" else int(n)


def layer_sweep_figure(reports: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """Test AUROC per layer with its bootstrap interval, one line per probe target and hook kind
    (``{target: report}``)."""
    fig = go.Figure()
    for target, rep in reports.items():
        kinds: dict[str, list[str]] = {}
        for h in rep["layers"]:
            kinds.setdefault(h.split(".", 2)[2], []).append(h)
        for kind, hooks in kinds.items():
            hooks.sort(key=_sweep_x)
            layers = [rep["layers"][h] for h in hooks]
            ys = [r["auroc"] for r in layers]
            lo, hi = [r["auroc_ci"][0] for r in layers], [r["auroc_ci"][1] for r in layers]
            err = {
                "type": "data",
                "symmetric": False,
                "array": [b - y if _finite(b) and _finite(y) else 0 for y, b in zip(ys, hi)],
                "arrayminus": [y - a if _finite(a) and _finite(y) else 0 for y, a in zip(ys, lo)],
            }
            x = [_sweep_x(h) for h in hooks]
            name = target if len(kinds) == 1 else f"{target} {kind}"
            fig.add_trace(go.Scatter(x=x, y=ys, error_y=err, mode="lines+markers", name=name))
            control = [r.get("control_auroc") for r in layers]
            fig.add_trace(go.Scatter(x=x, y=control, mode="lines", line_dash="dot", name=f"{name} (control)"))
    fig.add_hline(y=0.5, line_dash="dash", line_color="grey")
    fig.update_layout(
        xaxis_title="layer (block output; -1: embeddings)",
        yaxis_title="test AUROC (95% CI)",
        yaxis_range=[0, 1.05],
        height=350,
    )
    return fig


def calibration_figure(curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[int]]]) -> go.Figure:
    """Reliability diagram: mean predicted vs observed frequency per bin, ``{name: (pred, observed, counts)}``."""
    fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line_dash="dash", line_color="grey", name="ideal"))
    for name, (pred, obs, counts) in curves.items():
        fig.add_trace(
            go.Scatter(x=list(pred), y=list(obs), mode="lines+markers", name=name, text=[f"n={c}" for c in counts])
        )
    fig.update_layout(xaxis_title="predicted probability", yaxis_title="observed frequency", height=350)
    return fig


def tradeoff_figure(result: Mapping[str, Mapping[str, float]]) -> go.Figure:
    """The monitor's trade-off: accuracy vs share of thinking tokens saved, one point per policy@threshold."""
    fig = go.Figure()
    by_policy: dict[str, list[tuple[str, Mapping[str, float]]]] = {}
    for key, row in result.items():
        by_policy.setdefault(key.split("@")[0], []).append((key, row))
    for policy, rows in by_policy.items():
        rows.sort(key=lambda kr: kr[1]["saved_fraction"])
        fig.add_trace(
            go.Scatter(
                x=[r["saved_fraction"] for _, r in rows],
                y=[r["accuracy"] for _, r in rows],
                text=[k for k, _ in rows],
                mode="lines+markers+text" if policy != "none" else "markers+text",
                textposition="top center",
                name=policy,
            )
        )
    fig.update_layout(xaxis_title="thinking tokens saved", yaxis_title="accuracy", xaxis_tickformat=".0%", height=350)
    return fig


def steering_sweep_figure(report: Mapping[str, Any]) -> go.Figure:
    """ASC: accuracy and mean thinking tokens against γ. Solid: the held-out test problems (γ = 0, the KL bound's
    γ and the chosen γ); dotted: the selection split's sweep, one series per candidate layer (set)."""
    test = [{"gamma": 0.0, **report["baseline"]}, report["kl_gamma_eval"]]
    test += [r for r in (report.get("best_sweep_eval"), report.get("steered")) if r]
    series = [("test", sorted({r["gamma"]: r for r in test}.values(), key=lambda r: r["gamma"]), "solid")]
    base = [report["select_baseline"]] if report.get("select_baseline") else []
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in report["sweep"]:
        groups.setdefault(f"selection, layer {r.get('layers', r.get('layer'))}", []).append(r)
    series += [(name, sorted([*base, *rows], key=lambda r: r["gamma"]), "dot") for name, rows in groups.items()]
    fig = go.Figure()
    for name, rows, dash in series:
        xs = [r["gamma"] for r in rows]
        tokens = [r["mean_think_tokens"] for r in rows]
        accuracy = [r["accuracy"] for r in rows]
        fig.add_trace(go.Scatter(x=xs, y=tokens, name=f"thinking tokens ({name})", line={"dash": dash}))
        fig.add_trace(go.Scatter(x=xs, y=accuracy, name=f"accuracy ({name})", yaxis="y2", line={"dash": dash}))
    fig.add_vline(x=report["gamma"], line_dash="dash", annotation_text=f"chosen γ ({report['gamma_rule']})")
    fig.update_layout(
        xaxis_title="γ",
        yaxis=dict(title="mean thinking tokens"),
        yaxis2=dict(title="accuracy", overlaying="y", side="right", range=[0, 1.05]),
        height=350,
    )
    return fig


def attention_figure(
    attn: Sequence[Sequence[float]], tokens: Sequence[str], reads: Sequence[tuple[int, Sequence[int]]], title: str
) -> go.Figure:
    """One head's attention ``[query, key]`` on a trace; operand read-backs (query → definition keys) circled."""
    n = len(tokens)
    labels = [f"{i}:{t}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=attn, x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1, name="attention"))
    xs = [labels[k] for q, keys in reads for k in keys if q < n and k < n]
    ys = [labels[q] for q, keys in reads for k in keys if q < n and k < n]
    if xs:
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="markers",
                name="operand read-back",
                marker=dict(symbol="circle-open", size=11, color="red", line_width=2),
            )
        )
    fig.update_layout(
        title=title,
        xaxis_title="key token",
        yaxis_title="query token",
        yaxis_autorange="reversed",
        height=600,
        xaxis_showticklabels=False,
        yaxis_showticklabels=False,
    )
    return fig
