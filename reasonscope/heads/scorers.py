"""Head scorers on teacher-forced traces, each returning ``[L, H_kv]`` (higher = keep full).

- :func:`windowing_scores`: exact per-head windowing, mean KL(full ‖ that head windowed) (heads.md §9.1);
- :func:`gate_ig_scores`: integrated gradients of the trace loss w.r.t. the gates along α: 1 → 0
  (Sundararajan et al. 2017, midpoint Riemann sum): ``-mean_k ∂L/∂α`` at ``α = 1 - (k - ½)/m``;
- :func:`duo_scores`: DuoAttention-style gates (Xiao et al. 2024) learned by distilling the
  full-attention model: KL(full ‖ gated) + λ·mean|α|, AdamW, clamped to [0, 1] after every step.

All run the model's own traces with the prompt read in full and the thinking under the gates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .. import budget
from .batches import TraceBatch
from .gated import gated_attention, gated_run
from .policy import CompressionPolicy


def token_kl(full_logits: torch.Tensor, logits: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p_full ‖ p) at ``where`` (a boolean mask over the leading dimensions, or the selected positions
    of ``[pos, vocab]`` logits), in runs of positions whose float32 copies fit the logit budget."""
    index = where.nonzero(as_tuple=True) if where.dtype == torch.bool else (where,)
    step = budget.rows_per_pass(1, logits.shape[-1])
    parts = []
    for a in range(0, len(index[0]), step):
        at = tuple(i[a : a + step] for i in index)
        lp_full = F.log_softmax(full_logits[at].float(), -1)
        lp = F.log_softmax(logits[at].float(), -1)
        parts.append((lp_full.exp() * (lp_full - lp)).sum(-1))
    return torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)


def full_logits(handle: Any, batch: TraceBatch) -> torch.Tensor:
    """Logits of the unmodified model (no gradient)."""
    with torch.no_grad():
        return handle.run(batch.input_ids, batch.attention_mask).detach()


def gated_logits(handle: Any, batch: TraceBatch, alpha: torch.Tensor, policy: CompressionPolicy) -> torch.Tensor:
    """Logits of ``batch`` under gates ``alpha`` (``[L, H_kv]`` or per row), prompt read in full."""
    with gated_attention(handle, alpha, policy, prefill_lengths=batch.prefill_lengths) as state:
        return gated_run(handle, state, batch.input_ids.to(handle.device), batch.attention_mask.to(handle.device))


def _check(batches: Sequence[TraceBatch]) -> None:
    if not batches or not any(bool(b.scored.any()) for b in batches):
        raise ValueError(
            "no trace is longer than the window plus its prompt, so no position can feel compression; "
            "use longer traces or a smaller sink + recent"
        )


@torch.no_grad()
def windowing_scores(
    handle: Any, batches: Sequence[TraceBatch], policy: CompressionPolicy, heads_per_pass: int = 8
) -> torch.Tensor:
    """Exact windowing: per KV head, mean KL(full ‖ only that head windowed) over scored positions; at most
    ``heads_per_pass`` heads (copies of the batch) a pass, fewer where their logits would pass the logit budget."""
    _check(batches)
    g = handle.geometry
    n = g.n_layers * g.n_kv_heads
    vocab = budget.vocab_size(handle)
    total, count = torch.zeros(n), 0
    for batch in batches:
        base = full_logits(handle, batch)
        where = batch.scored
        count += int(where.sum())
        fit = budget.rows_per_pass(batch.input_ids.shape[1], vocab) // len(batch.traces)
        per_pass = max(1, min(heads_per_pass, fit))
        for lo in range(0, n, per_pass):
            heads = list(range(lo, min(n, lo + per_pass)))
            alpha = torch.ones(len(heads), n)
            alpha[torch.arange(len(heads)), heads] = 0.0
            rows = batch.replicate(len(heads))
            logits = gated_logits(
                handle, rows, alpha.repeat_interleave(len(batch.traces), 0).view(-1, g.n_layers, g.n_kv_heads), policy
            )
            b = len(batch.traces)
            for i, h in enumerate(heads):
                total[h] += token_kl(base, logits[i * b : (i + 1) * b], where.to(base.device)).sum().item()
    return (total / max(count, 1)).view(g.n_layers, g.n_kv_heads)


def trace_loss(
    handle: Any,
    batch: TraceBatch,
    alpha: torch.Tensor,
    policy: CompressionPolicy,
    loss: Literal["kl", "ce"],
    base: torch.Tensor | None,
) -> torch.Tensor:
    """Mean KL(full ‖ gated) or cross-entropy of the trace tokens over the scored positions."""
    logits = gated_logits(handle, batch, alpha, policy).cpu()
    where = batch.scored
    if loss == "kl":
        if base is None:
            raise ValueError("the KL trace loss needs the full model's logits (base=full_logits(handle, batch))")
        return token_kl(base, logits, where).mean()
    targets = torch.roll(batch.input_ids, -1, dims=1)[where]
    return F.cross_entropy(logits[where].float(), targets)


def gate_ig_scores(
    handle: Any,
    batches: Sequence[TraceBatch],
    policy: CompressionPolicy,
    steps: int = 8,
    loss: Literal["kl", "ce"] = "kl",
) -> torch.Tensor:
    """Integrated gradients of the trace loss w.r.t. every gate along α: 1 → 0; Σ ≈ L(all windowed) − L(full)."""
    _check(batches)
    if steps < 1:
        raise ValueError(f"gate-IG needs steps >= 1, got {steps}")
    g = handle.geometry
    grads = torch.zeros(g.n_layers, g.n_kv_heads)
    for batch in batches:  # one batch's full logits held at a time
        base = full_logits(handle, batch).cpu() if loss == "kl" else None
        for k in range(1, steps + 1):
            alpha = torch.full((g.n_layers, g.n_kv_heads), 1.0 - (k - 0.5) / steps, requires_grad=True)
            (grad,) = torch.autograd.grad(trace_loss(handle, batch, alpha, policy, loss, base), alpha)
            grads += grad.detach().cpu()
    return -grads / (steps * len(batches))


def duo_scores(
    handle: Any,
    batches: Sequence[TraceBatch],
    policy: CompressionPolicy,
    steps: int = 200,
    lr: float = 0.02,
    l1: float = 0.05,
    seed: int = 0,
    log: list[dict] | None = None,
) -> torch.Tensor:
    """DuoAttention-style gates: minimise KL(full ‖ gated) + ``l1``·mean|α| by AdamW; init 1, clamped each step.

    The full model's logits are kept for every batch when they fit ``budget.CACHE_BUDGET``, else recomputed."""
    _check(batches)
    g = handle.geometry
    torch.manual_seed(seed)
    alpha = torch.ones(g.n_layers, g.n_kv_heads, requires_grad=True)
    opt = torch.optim.AdamW([alpha], lr=lr, weight_decay=0.0)
    held = sum(b.input_ids.numel() for b in batches) * budget.vocab_size(handle) <= budget.CACHE_BUDGET
    bases = [full_logits(handle, b).cpu() for b in batches] if held else None
    for step in range(steps):
        i = step % len(batches)
        base = bases[i] if bases is not None else full_logits(handle, batches[i]).cpu()
        distill = trace_loss(handle, batches[i], alpha, policy, "kl", base)
        total = distill + l1 * alpha.abs().mean()
        opt.zero_grad()
        total.backward()
        opt.step()
        with torch.no_grad():
            alpha.clamp_(0.0, 1.0)
        if log is not None:
            log.append({"step": step, "kl": float(distill.detach()), "alpha_mean": float(alpha.detach().mean())})
    return alpha.detach().clone()
