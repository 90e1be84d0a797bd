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
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

from .. import budget
from ..budget import position_runs, sum_by_runs
from .batches import TraceBatch
from .gated import gated_attention, gated_run
from .policy import CompressionPolicy

DuoLoss = Literal["kl", "mse"]  # KL of the next-token distributions, or DuoAttention's hidden-state MSE
DUO_LOSSES: tuple[DuoLoss, ...] = get_args(DuoLoss)


def kl_rows(full_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_full ‖ p) of each row of two ``[..., vocab]`` logits, from float32 log-softmaxes."""
    lp_full = F.log_softmax(full_logits.float(), -1)
    lp = F.log_softmax(logits.float(), -1)
    return (lp_full.exp() * (lp_full - lp)).sum(-1)


def token_kl(full_logits: torch.Tensor, logits: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p_full ‖ p) at ``where`` (a boolean mask over the leading dimensions, or the selected positions
    of ``[pos, vocab]`` logits), in runs of positions whose float32 copies fit the logit budget."""
    parts = [kl_rows(full_logits[at], logits[at]) for at in position_runs(where, logits.shape[-1])]
    return torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)


def hidden_kl(handle: Any, full_hidden: torch.Tensor, hidden: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """:func:`token_kl` of two ``handle.run_hidden`` outputs, each run of positions unembedded only when it is read."""
    runs = position_runs(where.to(hidden.device), budget.vocab_size(handle))
    parts = [kl_rows(handle.unembed(full_hidden[at]), handle.unembed(hidden[at])) for at in runs]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def full_hidden(handle: Any, batch: TraceBatch) -> torch.Tensor:
    """What the unembedding reads (``handle.run_hidden``) in the unmodified model (no gradient)."""
    with torch.no_grad():
        return handle.run_hidden(batch.input_ids, batch.attention_mask).detach()


def gated_hidden(handle: Any, batch: TraceBatch, alpha: torch.Tensor, policy: CompressionPolicy) -> torch.Tensor:
    """``handle.run_hidden`` of ``batch`` under gates ``alpha`` (``[L, H_kv]`` or per row), prompt read in full."""
    with gated_attention(handle, alpha, policy, prefill_lengths=batch.prefill_lengths) as state:
        ids, mask = batch.input_ids.to(handle.device), batch.attention_mask.to(handle.device)
        return gated_run(handle, state, ids, mask, hidden=True)


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
        base = full_hidden(handle, batch)
        where = batch.scored
        count += int(where.sum())
        fit = budget.rows_per_pass(batch.input_ids.shape[1], vocab) // len(batch.traces)
        per_pass = max(1, min(heads_per_pass, fit))
        for lo in range(0, n, per_pass):
            heads = list(range(lo, min(n, lo + per_pass)))
            alpha = torch.ones(len(heads), n)
            alpha[torch.arange(len(heads)), heads] = 0.0
            rows = batch.replicate(len(heads))
            hidden = gated_hidden(
                handle, rows, alpha.repeat_interleave(len(batch.traces), 0).view(-1, g.n_layers, g.n_kv_heads), policy
            )
            b = len(batch.traces)
            for i, h in enumerate(heads):
                total[h] += hidden_kl(handle, base, hidden[i * b : (i + 1) * b], where).sum().item()
    return (total / max(count, 1)).view(g.n_layers, g.n_kv_heads)


def trace_loss(
    handle: Any,
    batch: TraceBatch,
    alpha: torch.Tensor,
    policy: CompressionPolicy,
    loss: Literal["kl", "ce"],
    base: torch.Tensor | None,
) -> torch.Tensor:
    """Mean KL(full ‖ gated) or cross-entropy of the trace tokens over the scored positions; ``base`` is the full
    model's :func:`full_hidden` (KL). Read a run of positions at a time (:func:`sum_by_runs`)."""
    if loss == "kl" and base is None:
        raise ValueError("the KL trace loss needs the full model's hidden states (base=full_hidden(handle, batch))")
    hidden = gated_hidden(handle, batch, alpha, policy)
    where = batch.scored.to(hidden.device)
    targets = torch.roll(batch.input_ids, -1, dims=1).to(hidden.device)

    def part(x: torch.Tensor, at: tuple) -> torch.Tensor:
        logits = handle.unembed(x)
        if loss == "kl":
            assert base is not None
            return kl_rows(handle.unembed(base[at]), logits).sum()
        return F.cross_entropy(logits.float(), targets[at], reduction="sum")

    return sum_by_runs(hidden, where, budget.vocab_size(handle), part) / max(int(where.sum()), 1)


def gate_ig_scores(
    handle: Any,
    batches: Sequence[TraceBatch],
    policy: CompressionPolicy,
    steps: int = 8,
    loss: Literal["kl", "ce"] = "kl",
) -> torch.Tensor:
    """Integrated gradients of the trace loss w.r.t. every gate along α: 1 → 0; Σ ≈ L(all windowed) − L(full),
    the loss a mean over every scored position of all batches (so the grouping into passes does not matter)."""
    _check(batches)
    if steps < 1:
        raise ValueError(f"gate-IG needs steps >= 1, got {steps}")
    g = handle.geometry
    grads = torch.zeros(g.n_layers, g.n_kv_heads)
    counts = [int(b.scored.sum()) for b in batches]
    for batch, n in zip(batches, counts):
        if not n:  # no position of this pass feels compression
            continue
        base = full_hidden(handle, batch) if loss == "kl" else None
        for k in range(1, steps + 1):
            alpha = torch.full((g.n_layers, g.n_kv_heads), 1.0 - (k - 0.5) / steps, requires_grad=True)
            (grad,) = torch.autograd.grad(trace_loss(handle, batch, alpha, policy, loss, base), alpha)
            grads += n * grad.detach().cpu()
    return -grads / (steps * sum(counts))


def duo_scores(
    handle: Any,
    batches: Sequence[TraceBatch],
    policy: CompressionPolicy,
    steps: int = 200,
    lr: float = 0.02,
    l1: float = 0.05,
    log: list[dict] | None = None,
    loss: DuoLoss = "kl",
) -> torch.Tensor:
    """DuoAttention-style gates: minimise a distillation loss + ``l1``·mean|α| by AdamW (constant ``lr``); init 1,
    clamped each step. ``loss``: KL(full ‖ gated) of the next-token distributions, or ``"mse"``, DuoAttention's
    mean squared error of the final hidden states (Xiao et al. 2024), both over the scored positions.

    The full model's hidden states (``d_model`` numbers a token) are kept for every batch when they fit
    ``budget.CACHE_BUDGET``, else recomputed."""
    _check(batches)
    if loss not in DUO_LOSSES:
        raise ValueError(f"duo loss must be 'kl' or 'mse', got {loss!r}")
    batches = [b for b in batches if bool(b.scored.any())]  # a pass with nothing to distil teaches no gate
    g = handle.geometry
    alpha = torch.ones(g.n_layers, g.n_kv_heads, requires_grad=True)
    opt = torch.optim.AdamW([alpha], lr=lr, weight_decay=0.0)
    first = full_hidden(handle, batches[0])
    held = sum(b.input_ids.numel() for b in batches) * first.shape[-1] <= budget.CACHE_BUDGET
    bases = [first, *(full_hidden(handle, b) for b in batches[1:])] if held else None
    for step in range(steps):
        i = step % len(batches)
        base = bases[i] if bases is not None else full_hidden(handle, batches[i])
        distill = (
            trace_loss(handle, batches[i], alpha, policy, "kl", base)
            if loss == "kl"
            else _mse(handle, batches[i], alpha, policy, base)
        )
        total = distill + l1 * alpha.abs().mean()
        opt.zero_grad()
        total.backward()
        opt.step()
        with torch.no_grad():
            alpha.clamp_(0.0, 1.0)
        if log is not None:
            log.append({"step": step, loss: float(distill.detach()), "alpha_mean": float(alpha.detach().mean())})
    return alpha.detach().clone()


def _mse(
    handle: Any, batch: TraceBatch, alpha: torch.Tensor, policy: CompressionPolicy, base: torch.Tensor
) -> torch.Tensor:
    """Mean squared error between the gated and the full model's final hidden states over the scored positions."""
    hidden = gated_hidden(handle, batch, alpha, policy)
    where = batch.scored.to(hidden.device)
    return F.mse_loss(hidden[where].float(), base.to(hidden.device)[where].float())
