"""Per-trace computations the explorer and notebooks show: token signals, probe trajectories, attention, steering.

Everything takes opened artifacts and loaded models (:class:`reasonscope.models.ModelHandle`); nothing here reads a
run directory itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from probes.labels import LabelTable
    from probes.probeset import ProbeSet
    from reasonscope.models import ModelHandle
    from reasonscope.store import ActivationStore
    from reasonscope.traces.record import Trace
    from steering.vector import SteeringVector

__all__ = [
    "Generation",
    "calibration_curve",
    "captured",
    "head_attention",
    "labels_match",
    "operand_reads",
    "probe_trajectory",
    "steer_compare",
    "token_signals",
    "token_strings",
]


def token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token id decoded on its own (special tokens kept), for token-by-token display."""
    return [tokenizer.decode([int(i)]) for i in ids]


def token_signals(handle: ModelHandle, trace: Trace, window: int = 8) -> dict[str, list[float]]:
    """Per token of ``trace``: ``entropy`` (nats) of the next-token distribution, the ``deviation index`` (mean
    entropy over the last ``window`` thinking tokens / mean since the thinking began; NaN before) and ``surprise``
    (``-log p`` of this token when the model wrote it; NaN at the first)."""
    from probes.entropy import deviation_index, token_stats

    ent, sur = token_stats(handle, [trace])[0]
    start = trace.think_span[0] if trace.think_span else 0
    dev = deviation_index(ent, start, window)
    return {"entropy": ent.tolist(), "deviation index": dev.tolist(), "surprise": [math.nan, *sur[:-1].tolist()]}


def readable_sets(sets: dict[str, ProbeSet], store: ActivationStore) -> tuple[dict[str, ProbeSet], list[str]]:
    """The probe sets that read ``store`` (their hook captured there, from their model), and why each other does not."""
    ok, why = {}, []
    for target, ps in sets.items():
        if ps.best_hook not in store.manifest.hooks:
            why.append(
                f"probes {target!r} read {ps.best_hook}, which the capture stage did not record: recapture with "
                f"--hooks {ps.best_hook}, or refit the probes on a captured hook"
            )
        elif ps.weight_hash != store.manifest.weight_hash:
            why.append(f"probes {target!r} were fitted on another model's activations: refit them on this capture")
        else:
            ok[target] = ps
    return ok, why


def captured(store: ActivationStore, traces: Sequence[Trace]) -> tuple[list[Trace], list[str]]:
    """The traces ``store`` holds as they are now, and why it holds no others: traces added after the capture, or
    changed since (regenerated under the same ids: their per-trace digests differ from those the store recorded)."""
    from reasonscope.identity import trace_digest

    m = store.manifest
    index = {tid: i for i, tid in enumerate(m.trace_ids)}
    kept, absent, changed = [], [], []
    for t in traces:
        i = index.get(t.id)
        if i is None:
            absent.append(t.id)
        elif m.trace_hashes and m.trace_hashes[i] != trace_digest(t):
            changed.append(t.id)
        else:
            kept.append(t)
    why = []
    if absent:
        why.append(
            f"{len(absent)} trace(s) are not in the capture stage (e.g. {absent[0]!r}): capture them into a new "
            "store to read probes on them"
        )
    if changed:
        why.append(
            f"{len(changed)} trace(s) changed since they were captured (e.g. {changed[0]!r}: the traces were "
            "regenerated): recapture them into a new store to read probes on them"
        )
    return kept, why


def labels_match(labels: LabelTable, rows: Sequence[int], trace: Trace) -> bool:
    """Whether the label rows ``rows`` of ``trace`` were made from this version of it (the token at every chunk end
    is the one recorded; labels that recorded no tokens are taken as they are)."""
    if not labels.token_id:
        return True
    ids = trace.token_ids
    ends = [(labels.position[i], labels.token_id[i]) for i in rows if labels.position[i] >= 0]  # -1: not located
    return all(p < len(ids) and ids[p] == tok for p, tok in ends)


def probe_trajectory(store: ActivationStore, ps: ProbeSet, trace_id: str, hook: str | None = None) -> dict[int, float]:
    """The probe's probability at every captured position of one trace: ``{token position: p}``."""
    hook = hook or ps.best_hook
    ps.check_model(store.manifest.weight_hash)
    rows = store.rows()
    mine = rows["trace"] == store.trace_index(trace_id)
    positions = rows["position"][mine].tolist()
    if not positions:
        return {}
    p = ps.predict(store.get(hook, trace=trace_id).float(), hook)
    return {int(q): float(v) for q, v in zip(positions, p.tolist())}


def calibration_curve(
    store: ActivationStore, labels: LabelTable, ps: ProbeSet, hook: str | None = None, bins: int = 8
) -> tuple[list[float], list[float], list[int]]:
    """Reliability bins of ``ps`` on its held-out test problems: (mean predicted, observed rate, count) per bin."""
    from probes.data import TEST, join_labels

    ps.check_model(store.manifest.weight_hash)
    cfg = ps.config
    data = join_labels(store, labels, ps.target, cfg["test_fraction"], cfg["val_fraction"], cfg["seed"])
    test = data.side == TEST
    hook = hook or ps.best_hook
    rows, order = data.row[test].sort()
    parts, start = [torch.zeros(0, ps.width)], 0
    for x in store.iter_batches(hook, 8192):  # the test rows only, a read batch at a time
        lo, hi = (int(torch.searchsorted(rows, v)) for v in (start, start + len(x)))
        parts.append(x[rows[lo:hi] - start].float())
        start += len(x)
    p, y = ps.predict(torch.cat(parts), hook), data.y[test][order]
    which = (p * bins).long().clamp(max=bins - 1)
    pred, obs, counts = [], [], []
    for b in range(bins):
        m = which == b
        if bool(m.any()):
            pred.append(float(p[m].mean()))
            obs.append(float(y[m].mean()))
            counts.append(int(m.sum()))
    return pred, obs, counts


def operand_reads(trace: Trace, tokenizer: Any) -> list[tuple[int, tuple[int, ...]]]:
    """(query token, definition key tokens) of every operand the thinking reads back from the question."""
    from reasonscope.heads.retrieval import operand_reads as reads

    return [(r.query, r.keys) for r in reads(trace, tokenizer)]


@torch.no_grad()
def head_attention(handle: ModelHandle, trace: Trace, layer: int, kv_head: int) -> torch.Tensor:
    """Attention ``[query, key]`` of KV head ``kv_head`` in ``layer`` on ``trace``: the mean over the query heads
    sharing it. ``handle`` must compute attention eagerly (``load_model(..., attn_implementation="eager")``)."""
    g = handle.geometry
    if not (0 <= layer < g.n_layers and 0 <= kv_head < g.n_kv_heads):
        raise ValueError(f"no KV head L{layer}H{kv_head}: the model has {g.n_layers} layers x {g.n_kv_heads} KV heads")
    name = f"blocks.{layer}.attn.hook_pattern"
    pattern = handle.run_with_cache(torch.tensor([trace.token_ids]), names=name)[name].float().cpu()
    group = g.n_heads // g.n_kv_heads
    return pattern[0, kv_head * group : (kv_head + 1) * group].mean(0)


@dataclass(frozen=True)
class Generation:
    """One completion: its tokens (strings), thinking length, answer, grade."""

    tokens: list[str]
    think_tokens: int
    answer: str
    correct: bool | None


def _completion(handle: ModelHandle, ids: Sequence[int], gold: str | None, grader: str) -> Generation:
    from reasonscope.traces import GRADERS

    tok = handle.tokenizer
    end = handle.think_ids[1]
    k = list(ids).index(end) if end is not None and end in ids else len(ids)
    answer = tok.decode(list(ids[k + 1 :]), skip_special_tokens=True).strip() if k < len(ids) else ""
    g = GRADERS[grader]
    ok = None if gold is None or k == len(ids) else bool(g.is_correct(g.extract(answer), gold))  # None: no answer
    return Generation(token_strings(tok, ids), k, answer, ok)


def steer_compare(
    handle: ModelHandle,
    vec: SteeringVector,
    prompt: str,
    gammas: Sequence[float],
    gold: str | None = None,
    grader: str = "organism",
    max_new_tokens: int = 512,
) -> list[Generation]:
    """Greedy completions of ``prompt`` (chat-formatted, thinking opened) at each γ (γ = 0: unsteered), in one
    batched ``generate`` call, graded by ``grader`` against ``gold``."""
    from reasonscope.generation import DecodeConfig, generate

    cfg = DecodeConfig(max_new_tokens=max_new_tokens, batch_size=max(1, len(gammas)))
    with vec.apply(handle, gamma=[float(g) for g in gammas]):
        out = generate(handle, [prompt] * len(gammas), cfg)
    return [_completion(handle, c.token_ids, gold, grader) for c in out]


def finite_range(values: Sequence[float]) -> tuple[float, float]:
    """(min, max) of the finite values, (0, 1) when there are none."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    return (min(xs), max(xs)) if xs else (0.0, 1.0)
