"""Steering page: ASC generation with and without the vector side by side, a γ slider, the γ sweep; hybrid runs."""

from __future__ import annotations

import html
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import streamlit as st

from app import analysis, figures
from app.artifacts import MissingStage, RunDir
from app.state import artifact, background, cached, model, need, stamp

N_PROBLEMS = 24
PALETTE = ("#f4a261", "#2a9d8f", "#e76f51", "#8ab17d", "#9b5de5", "#00bbf9", "#f15bb5", "#fee440")


@dataclass(frozen=True)
class Question:
    """A question the side-by-side generation can ask: its label, chat prompt (thinking opened), gold, grader."""

    label: str
    prompt: str
    gold: str | None
    grader: str


def _questions(run: RunDir, handle: Any) -> list[Question]:
    """Held-out organism problems on a demo run; on your own model, the prompts of the run's traces."""
    if not run.own_model:
        from reasonscope.organisms import task
        from reasonscope.organisms.evaluate import EVAL_SEED

        return [
            Question(f"level {p.level}: {p.question}", handle.chat_prompt(p.question), str(p.answer), "organism")
            for p in task.problems(N_PROBLEMS, EVAL_SEED)
        ]
    try:
        rows = artifact(run, "traces").traces["thinking"][:N_PROBLEMS]
    except LookupError:
        return []
    return [Question(f"{t.id}: {t.prompt[-120:]}", t.prompt, t.gold, t.meta.get("grader", "math")) for t in rows]


def render(run: RunDir) -> None:
    st.header("Steering")
    got = need(run, "asc")
    if got is None:
        return
    vec, report = got[0]
    b, s = report["baseline"], report["steered"]
    m1, m2, m3, m4 = st.columns(4)
    m1.metric(f"chosen γ ({report['gamma_rule']})", f"{report['gamma']:.3g}")
    m2.metric(
        "thinking tokens", f"{s['mean_think_tokens']:.0f}", f"{s['mean_think_tokens'] - b['mean_think_tokens']:+.0f}"
    )
    m3.metric("accuracy", f"{s['accuracy']:.2f}", f"{s['accuracy'] - b['accuracy']:+.2f}")
    m4.metric("length reduction", f"{report['length_reduction']:.0%}")
    left, right = st.columns([2, 3])
    with left:
        st.plotly_chart(figures.steering_sweep_figure(report), key="st_sweep")
        where = report.get("layers") or [report.get("layer")]
        st.caption(
            f"ASC at layer(s) {', '.join(map(str, where))}, KL bound γ = {report['kl_bound']['gamma']:.3g}; solid: "
            "held-out test problems, dotted: the selection split γ was chosen on"
        )
    with right:
        _side_by_side(run, vec, report)
    _hybrid(run)


def _side_by_side(run: RunDir, vec: Any, report: dict[str, Any]) -> None:
    handle = model("thinking")
    questions = _questions(run, handle)
    if not questions:
        st.info(f"no questions to generate on: this run has no traces (`{run.command('traces')}` writes them)")
        return
    pick = st.selectbox("problem", range(len(questions)), format_func=lambda i: questions[i].label, key="st_problem")
    chosen = float(report["gamma"])
    top = max([chosen, *[r["gamma"] for r in report["sweep"]]]) * 1.5 or 1.0
    step = float(f"{top / 100:.1g}")  # a KL-bound γ (~1e-3) is selectable, not rounded to 0
    gamma = st.slider("γ", 0.0, top, chosen, step=step, format="%.3g", key="st_gamma")
    q = questions[pick or 0]
    plain, steered = cached(
        f"steer/{run.path}/{stamp(run, 'asc')}/{q.prompt}/{gamma:.6g}",
        lambda: background(
            analysis.steer_compare,
            handle,
            vec,
            q.prompt,
            [0.0, gamma],
            q.gold,
            q.grader,
            int(report.get("config", {}).get("max_new_tokens", 512)),
            label=f"generating at γ = 0 and {gamma:g}",
        ),
    )
    c1, c2 = st.columns(2)
    for col, name, gen in ((c1, "without steering", plain), (c2, f"steered, γ = {gamma:g}", steered)):
        with col:
            if gen.think_tokens == len(gen.tokens):
                ok = "truncated: no answer"
            else:
                ok = "—" if gen.correct is None else ("✓ correct" if gen.correct else "✗ wrong")
            st.markdown(f"**{name}** · {gen.think_tokens} thinking tokens · answer `{gen.answer or '-'}` {ok}")
            st.html(_plain_tokens(gen.tokens))
    st.caption(f"gold answer: {q.gold}")


def _plain_tokens(tokens: Sequence[str]) -> str:
    text = html.escape("".join(tokens)).replace("\n", "<br>")
    return f'<div style="font-family:monospace;white-space:pre-wrap;font-size:0.85em">{text}</div>'


def behaviour_html(tokens: Sequence[str], behaviours: Sequence[str | None], colours: dict[str, str]) -> str:
    """Tokens with the steered ones highlighted in their behaviour's colour (tooltip: the behaviour)."""
    out = []
    for tok, b in zip(tokens, behaviours):
        text = html.escape(tok).replace("\n", "↵<br>")
        if b is None:
            out.append(text)
        else:
            out.append(f'<span title="{html.escape(b)}" style="background:{colours[b]}">{text}</span>')
    return '<div style="font-family:monospace;line-height:1.8;white-space:pre-wrap">' + "".join(out) + "</div>"


def _hybrid(run: RunDir) -> None:
    st.subheader("hybrid steering: the base model steered where the thinking model would reason")
    try:
        hy = artifact(run, "hybrid")
    except MissingStage as e:
        if e.damaged is not None:
            st.warning(str(e))
        elif importlib.util.find_spec("steering.hybrid") is None:
            st.info(f"{e}. Hybrid steering comes from `steering.hybrid` (run_hybrid), which is not installed.")
        else:
            st.info(str(e))
        return
    summary = dict(hy.summary)
    cols = st.columns(4)
    for col, key in zip(cols, ("base_accuracy", "thinking_accuracy", "hybrid_accuracy", "gap_recovered")):
        if isinstance(summary.get(key), (int, float)):
            col.metric(key.replace("_", " "), f"{summary[key]:.2f}")
    if isinstance(summary.get("steered_token_fraction"), (int, float)):
        st.caption(f"steered tokens: {summary['steered_token_fraction']:.1%} of the generated tokens")
    if summary.get("controls"):
        st.dataframe(pd.DataFrame(_rows(summary["controls"])), hide_index=True)
    records = list(hy.records)
    if not records:
        return
    pick = st.selectbox(
        "hybrid run",
        range(len(records)),
        format_func=lambda i: (
            f"{i}: "
            + (f"level {records[i]['level']} · " if records[i].get("level") is not None else "")
            + str(records[i]["question"])[:120]
        ),
        key="st_hybrid",
    )
    r = records[pick or 0]
    behaviours = [None if b is None else str(b) for b in r["behaviours"]]
    names = sorted({b for b in behaviours if b is not None})
    colours = {b: PALETTE[i % len(PALETTE)] for i, b in enumerate(names)}
    legend = " ".join(f'<span style="background:{c};padding:0 4px">{html.escape(b)}</span>' for b, c in colours.items())
    mark = "✓ correct" if r["correct"] else "✗ wrong"
    st.html(f"<div><b>hybrid</b> {mark} (gold {r.get('gold')}) · steered behaviours: {legend or 'none'}</div>")
    st.html(behaviour_html(r["tokens"], behaviours, colours))
    c1, c2 = st.columns(2)
    for col, who in ((c1, "base"), (c2, "thinking")):
        if f"{who}_text" in r:
            col.markdown(f"**{who} alone** · {'✓' if r.get(f'{who}_correct') else '✗'}")
            col.html(_plain_tokens([r[f"{who}_text"]]))


def _rows(controls: Any) -> list[dict[str, Any]]:
    if isinstance(controls, dict):
        return [{"control": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in controls.items()]
    return [c if isinstance(c, dict) else {"value": c} for c in controls]
