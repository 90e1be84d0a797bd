"""``heads eval``: generate with the compressed cache for every scorer and baseline at each sparsity.

Each selection (a bool ``[L, H_kv]`` of full heads) becomes binary gates; every (selection, problem) pair is a
request of one :func:`~reasonscope.heads.rollout.gated_rollouts` call (per-request gates), and identical
selections are generated once. Per method and sparsity: accuracy, mean thinking tokens, overlength rate,
KV-cache bytes (heads.md §9.4: ``2·d·bytes·Σ(n_full·T + n_stream·min(T, S+R))`` at each sequence's length),
the theoretical speedup ``1/((1−sp) + sp·W/T̄)`` and decode tokens/s timed with the physical cache
(:class:`~reasonscope.heads.physical.HeadwiseCache`). Baselines: random heads (mean ± sd over draws), uniform
per layer, and the exhaustive best subset (teacher-forced answer accuracy on the model's own traces).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..generation import DecodeConfig
from ..models import cache_kwargs
from .accuracy import exhaustive_best
from .batches import trace_batches
from .physical import compressed_cache, kv_bytes
from .policy import CompressionPolicy
from .rollout import Rollout, gated_rollouts
from .select import random_full_heads, select_full_heads, uniform_full_heads

KIND, FORMAT = "heads_eval", 1


@dataclass(frozen=True)
class EvalConfig:
    """Sweep settings; validated on construction so nothing runs on bad input."""

    sparsities: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    random_draws: int = 5
    uniform: bool = True
    exhaustive: bool = True
    max_new_tokens: int = 512
    batch_size: int = 64
    timing_prompts: int = 2
    timing_tokens: int = 64
    grader: str = "organism"
    seed: int = 0

    def __post_init__(self) -> None:
        for sp in self.sparsities:
            if not 0.0 <= sp <= 1.0:
                raise ValueError(f"sparsity {sp} is outside [0, 1]; it is the fraction of KV heads compressed")
        if not self.sparsities:
            raise ValueError("give at least one sparsity")
        if self.random_draws < 0 or self.timing_prompts < 0:
            raise ValueError("random_draws and timing_prompts must be >= 0")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.timing_tokens < 1:
            raise ValueError("max_new_tokens, batch_size and timing_tokens must be >= 1")


def window_for(lengths: Sequence[int], fraction: float = 0.125, sink_share: float = 0.25) -> CompressionPolicy:
    """A window scaled to typical generated lengths: ``sink + recent ≈ fraction·median`` (a quarter of it sink)."""
    if not lengths:
        raise ValueError("no trace lengths to scale the window to; generate traces first")
    kept = max(2, round(fraction * statistics.median(lengths)))
    sink = max(1, round(sink_share * kept))
    return CompressionPolicy(sink=sink, recent=kept - sink)


def check_window(policy: CompressionPolicy, lengths: Sequence[int]) -> None:
    """Refuse a window of a quarter or more of the median generated length (it would compress next to nothing)."""
    median = statistics.median(lengths) if lengths else 0
    if policy.kept * 4 > median:
        raise ValueError(
            f"the window (sink {policy.sink} + recent {policy.recent}) is over a quarter of the median "
            f"generated length ({median:g} tokens), so compression is barely felt; choose sink + recent "
            f"<= {int(median // 4)} (e.g. window_for(lengths))"
        )


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's ρ: Pearson correlation of the (tie-averaged) ranks of ``x`` and ``y`` (flattened)."""
    rx, ry = _ranks(x.flatten().double()), _ranks(y.flatten().double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denom if denom > 0 else 0.0


def _ranks(v: torch.Tensor) -> torch.Tensor:
    order = v.argsort()
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=v.dtype)
    for value in v.unique():  # ties share their mean rank
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def rank_agreement(scores: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Spearman ρ between every pair of head maps."""
    return {a: {b: round(spearman(scores[a], scores[b]), 4) for b in scores if b != a} for a in scores}


def selections(
    scores: Mapping[str, torch.Tensor],
    n_layers: int,
    n_kv_heads: int,
    sp: float,
    cfg: EvalConfig,
    best: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Every method's full-head mask at ``sp``: scorers, ``random/<draw>``, ``uniform``, ``exhaustive``."""
    out = {m: select_full_heads(s, sp, cfg.seed) for m, s in scores.items()}
    for d in range(cfg.random_draws):
        out[f"random/{d}"] = random_full_heads(n_layers, n_kv_heads, sp, cfg.seed * 1000 + d)
    if cfg.uniform:
        out["uniform"] = uniform_full_heads(n_layers, n_kv_heads, sp, cfg.seed)
    if best is not None:
        out["exhaustive"] = best
    return out


def _metrics(
    rollouts: Sequence[Rollout], full: torch.Tensor, policy: CompressionPolicy, head_dim: int, bytes_per_value: int
) -> dict[str, float]:
    n = len(rollouts)
    lengths = [len(r.token_ids) for r in rollouts]
    mean_len = sum(lengths) / n
    sp = 1.0 - float(full.float().mean())
    return {
        "accuracy": sum(bool(r.grade) for r in rollouts) / n,
        "mean_think_tokens": sum(r.think_tokens for r in rollouts) / n,
        "overlength_rate": sum(r.truncated for r in rollouts) / n,
        "kv_bytes": sum(kv_bytes(full, t, policy, head_dim, 1, bytes_per_value) for t in lengths) / n,
        "achieved_sparsity": sp,
        "theoretical_speedup": 1.0 / ((1.0 - sp) + sp * min(policy.kept, mean_len) / mean_len),
        "n": n,
    }


@torch.no_grad()
def decode_tokens_per_s(
    handle: Any, prompt_ids: Sequence[Sequence[int]], full: torch.Tensor, policy: CompressionPolicy, tokens: int
) -> float:
    """Greedy decode speed with the physical compressed cache, one sequence at a time (prefill excluded)."""
    total, seconds = 0, 0.0
    model = handle.decoder()
    for ids in prompt_ids:
        with compressed_cache(handle, full, policy) as (cache, _):
            x = torch.tensor([list(ids)], device=handle.device)
            logits = model(input_ids=x, use_cache=True, **cache_kwargs(model, cache)).logits
            if logits.is_cuda:  # the clock starts once the prefill has run
                torch.cuda.synchronize(logits.device)
            t0 = time.perf_counter()
            for _ in range(tokens):
                x = logits[:, -1:].argmax(-1)
                logits = model(input_ids=x, use_cache=True, **cache_kwargs(model, cache)).logits
            if logits.is_cuda:  # nothing in the loop waits for the GPU
                torch.cuda.synchronize(logits.device)
            seconds += time.perf_counter() - t0
            total += tokens
    return total / seconds if seconds > 0 else 0.0


def _summary(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over random draws, plus the accuracy's sample sd."""
    out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    acc = [r["accuracy"] for r in rows]
    out["accuracy_sd"] = statistics.stdev(acc) if len(acc) > 1 else 0.0
    out["draws"] = len(rows)
    return out


def evaluate_heads(
    handle: Any,
    prompts: Sequence[str],
    golds: Sequence[str],
    scores: Mapping[str, torch.Tensor],
    policy: CompressionPolicy,
    cfg: EvalConfig = EvalConfig(),
    own_traces: Sequence[Any] | None = None,
    retrieval: torch.Tensor | None = None,
    log: list[dict[str, Any]] | None = None,
    name_reads: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Sweep every method over ``cfg.sparsities``; returns ``{"curves", "rank_agreement", "retrieval_spearman",
    ...}``. ``own_traces`` (the model's graded greedy traces) enable the exhaustive-best baseline.

    ``retrieval`` and ``name_reads`` (:func:`~reasonscope.heads.retrieval.read_scores`, value and name reads) are
    ground truths each scorer's ranking and top head are compared with."""
    g = handle.geometry
    for m, s in scores.items():
        if tuple(s.shape) != (g.n_layers, g.n_kv_heads):
            raise ValueError(
                f"head map {m!r} is {list(s.shape)} but the model has [{g.n_layers}, {g.n_kv_heads}] "
                "(layers x KV heads); score this model's heads"
            )
    if len(prompts) != len(golds) or not prompts:
        raise ValueError(f"{len(prompts)} prompts and {len(golds)} golds; give one gold per prompt (at least one)")
    best_batches = None
    if cfg.exhaustive and own_traces is not None:
        best_batches = trace_batches(handle, own_traces, policy)
    masks: dict[float, dict[str, torch.Tensor]] = {}
    exhaustive_tf: dict[float, float] = {}
    for sp in cfg.sparsities:
        best = None
        if best_batches is not None and 0.0 < sp < 1.0:
            best, exhaustive_tf[sp] = exhaustive_best(handle, best_batches, sp, policy)
        masks[sp] = selections(scores, g.n_layers, g.n_kv_heads, sp, cfg, best)
    unique: dict[bytes, torch.Tensor] = {}
    for per_sp in masks.values():
        for full in per_sp.values():
            unique.setdefault(_key(full), full)
    order = list(unique)
    n = len(prompts)
    alpha = torch.stack([unique[k].float() for k in order]).repeat_interleave(n, 0)
    decode = DecodeConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed)
    rollouts, seconds = gated_rollouts(
        handle, list(prompts) * len(order), alpha, policy, decode, list(golds) * len(order), cfg.grader
    )
    by_key = {k: rollouts[i * n : (i + 1) * n] for i, k in enumerate(order)}
    bytes_per_value = torch.finfo(handle.model.dtype).bits // 8
    tok = handle.tokenizer
    timing_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[: cfg.timing_prompts]]
    speed = (
        {k: decode_tokens_per_s(handle, timing_ids, unique[k], policy, cfg.timing_tokens) for k in order}
        if timing_ids
        else {}
    )
    curves: dict[str, dict[str, dict[str, float]]] = {}
    for sp, per_sp in masks.items():
        random_rows = []
        for method, full in per_sp.items():
            row = _metrics(by_key[_key(full)], full, policy, g.head_dim, bytes_per_value)
            if speed:
                row["decode_tokens_per_s"] = speed[_key(full)]
            if method == "exhaustive":
                row["teacher_forced_accuracy"] = exhaustive_tf[sp]
            if method.startswith("random/"):
                random_rows.append(row)
            else:
                curves.setdefault(method, {})[f"{sp:g}"] = row
        if random_rows:
            curves.setdefault("random", {})[f"{sp:g}"] = _summary(random_rows)
    if log is not None:
        log.append({"requests": len(rollouts), "unique_selections": len(order), "generate_seconds": seconds})
    truths = {k: v for k, v in (("retrieval", retrieval), ("name_reads", name_reads)) if v is not None}
    result: dict[str, Any] = {
        "curves": curves,
        # the truths as "truth:<name>": a map may itself be named "retrieval" (heads score --method retrieval)
        "rank_agreement": rank_agreement({**scores, **{f"truth:{k}": v for k, v in truths.items()}}),
        "policy": {"sink": policy.sink, "recent": policy.recent, "prefill": policy.prefill},
        "n_problems": n,
        "generate_seconds": round(seconds, 2),
    }
    if truths:
        result["top_head"] = {m: {"head": _head(int(s.flatten().argmax()), g.n_kv_heads)} for m, s in scores.items()}
    for name, truth in truths.items():
        result[f"{name}_spearman"] = {m: round(spearman(s, truth), 4) for m, s in scores.items()}
        top2 = truth.flatten().argsort(descending=True)[:2].tolist()
        for m, s in scores.items():
            result["top_head"][m][f"in_{name}_top2"] = int(s.flatten().argmax()) in top2
        result[f"{name}_top2"] = [_head(i, g.n_kv_heads) for i in top2]
    return result


def _key(full: torch.Tensor) -> bytes:
    return bytes(full.bool().flatten().tolist())


def _head(flat: int, n_kv_heads: int) -> str:
    return f"L{flat // n_kv_heads}H{flat % n_kv_heads}"
