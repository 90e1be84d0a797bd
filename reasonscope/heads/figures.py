"""Plotly figures of head maps and evaluation results (each returns a ``plotly.graph_objects.Figure``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import plotly.graph_objects as go
import torch


def head_map_figure(scores: torch.Tensor, title: str = "head scores") -> go.Figure:
    """Heatmap of a ``[L, H_kv]`` map: layers down, KV heads across (higher = keep full)."""
    z = scores.detach().float().cpu()
    fig = go.Figure(
        go.Heatmap(
            z=z.tolist(),
            x=[f"H{h}" for h in range(z.shape[1])],
            y=[f"L{layer}" for layer in range(z.shape[0])],
            colorscale="Viridis",
        )
    )
    fig.update_layout(title=title, xaxis_title="KV head", yaxis_title="layer", yaxis_autorange="reversed")
    return fig


def curves_figure(result: Mapping[str, Any], metric: str = "accuracy") -> go.Figure:
    """``metric`` against sparsity for every method of an ``evaluate_heads`` result (random with ±sd bars)."""
    fig = go.Figure()
    for method, per_sp in result["curves"].items():
        sps = sorted(per_sp, key=float)
        err = None
        if metric == "accuracy" and all("accuracy_sd" in per_sp[s] for s in sps):
            err = {"type": "data", "array": [per_sp[s]["accuracy_sd"] for s in sps]}
        fig.add_trace(
            go.Scatter(
                x=[float(s) for s in sps],
                y=[per_sp[s][metric] for s in sps],
                name=method,
                mode="lines+markers",
                error_y=err,
            )
        )
    fig.update_layout(xaxis_title="sparsity (fraction of KV heads compressed)", yaxis_title=AXIS.get(metric, metric))
    return fig


AXIS = {  # the y-axis title of each evaluate_heads metric, with its unit
    "accuracy": "accuracy (fraction correct)",
    "mean_think_tokens": "thinking tokens (mean per problem)",
    "overlength_rate": "truncated at max_new_tokens (fraction)",
    "kv_bytes": "KV cache (bytes per sequence, mean)",
    "achieved_sparsity": "achieved sparsity (fraction)",
    "theoretical_speedup": "theoretical attention speed-up (x)",
}


def retrieval_scatter(scores: Mapping[str, torch.Tensor], retrieval: torch.Tensor) -> go.Figure:
    """Each scorer's head scores against the retrieval ground truth, one point per KV head."""
    n_kv = retrieval.shape[-1]
    labels = [f"L{i // n_kv}H{i % n_kv}" for i in range(retrieval.numel())]
    fig = go.Figure()
    for method, s in scores.items():
        fig.add_trace(
            go.Scatter(
                x=retrieval.flatten().tolist(),
                y=s.detach().float().flatten().tolist(),
                mode="markers",
                name=method,
                text=labels,
            )
        )
    fig.update_layout(xaxis_title="retrieval score (attention on the operand's definition)", yaxis_title="head score")
    return fig
