"""Learned steering vectors: the decision between two continuations of a prompt, under a KL trust region.

In the spirit of ASC's ACL version (a vector learned under a KL trust region, research/steering.md §1), for pairs
of continuations of one prompt (e.g. concise and verbose thinking): with γ = 1 and ``v_ℓ`` added to the output of
each block ℓ in ``layers`` at ``positions`` (teacher-forced; ``last``: the last prompt token and every
continuation token, ASC's injection; ``prompt``: the last prompt token only), minimise

    −mean_i log p_v(target_i[j_i] | prompt_i ⊕ target_i[:j_i]) + λ · mean_t KL(p(·|t) ‖ p_v(·|t))

where ``j_i`` is the first token at which the pair's continuations differ (the decision) and ``t`` runs over
every other next-token prediction of both continuations (the trust region; ``p`` is the unsteered model).
Adam over the directions only: the model is frozen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch

from reasonscope.budget import passes, sum_by_runs, vocab_size

from .vector import SteeringVector, VectorMeta

__all__ = ["LEARN_POSITIONS", "LearnConfig", "LearnPositions", "learn_vector"]

LearnPositions = Literal["last", "prompt"]
LEARN_POSITIONS: tuple[LearnPositions, ...] = get_args(LearnPositions)


@dataclass(frozen=True)
class LearnConfig:
    """Optimisation of :func:`learn_vector`."""

    steps: int = 150
    batch_size: int = 16  # pairs per step
    lr: float = 0.05
    kl_weight: float = 30.0  # λ: the trust region's weight against the decision's log-likelihood
    positions: LearnPositions = "last"  # where v acts while it is learned (and in the vector's metadata)
    seed: int = 0
    micro_batch: int | None = None  # pairs per forward pass (gradients accumulate over a step); None: as many as
    # keep a pass's [rows, tokens, vocab] log-probs within LOGIT_BUDGET (a 150k vocabulary and long CoTs: 1-2 rows)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1 (or None: sized to the logit budget), got {self.micro_batch}")
        if not (math.isfinite(self.lr) and self.lr > 0) or not (math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise ValueError(f"lr must be > 0 and kl_weight >= 0 (finite), got {self.lr}, {self.kl_weight}")
        if self.positions not in LEARN_POSITIONS:
            raise ValueError(f"positions {self.positions!r} is not one of {', '.join(LEARN_POSITIONS)}")


Pair = tuple[list[int], list[int], list[int], int]  # prompt, target and source ids, the decision's index


def _decision(target: Sequence[int], source: Sequence[int], i: int) -> int:
    for j, (a, b) in enumerate(zip(target, source)):
        if a != b:
            return j
    raise ValueError(f"pair {i}: one continuation is a prefix of the other, so there is no token to decide between")


def learn_vector(
    handle: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    sources: Sequence[str],
    layers: Sequence[int],
    cfg: LearnConfig = LearnConfig(),
    recipe: Mapping[str, Any] | None = None,
) -> SteeringVector:
    """Learn ``v`` (one direction per layer) that moves ``prompts[i]``'s continuation from ``sources[i]`` toward
    ``targets[i]`` at their first differing token, within the KL trust region; the vector's γ is 1."""
    if not (len(prompts) == len(targets) == len(sources)) or not prompts:
        raise ValueError(
            f"learn_vector needs as many targets and sources as prompts (>= 1), got "
            f"{len(prompts)}, {len(targets)}, {len(sources)}"
        )
    g = handle.geometry
    layers = tuple(layers)
    for layer in layers:
        if not 0 <= layer < g.n_layers:
            raise ValueError(f"layer {layer} does not exist in {handle.source} (layers 0..{g.n_layers - 1})")

    def ids(text: str) -> list[int]:
        return list(handle.tokenizer(text, add_special_tokens=False)["input_ids"])

    pairs = []
    for i, (p, t, s) in enumerate(zip(prompts, targets, sources)):
        pi, ti, si = ids(p), ids(t), ids(s)
        pairs.append((pi, ti, si, _decision(ti, si, i)))
    frozen = [q.requires_grad for q in handle.model.parameters()]
    try:
        handle.model.requires_grad_(False)
        return _optimise(handle, pairs, layers, cfg, dict(recipe or {}))
    finally:
        for q, flag in zip(handle.model.parameters(), frozen):
            q.requires_grad_(flag)


def _optimise(
    handle: Any,
    pairs: list[Pair],
    layers: tuple[int, ...],
    cfg: LearnConfig,
    recipe: dict[str, Any],
) -> SteeringVector:
    g = handle.geometry
    v = torch.zeros(len(layers), g.d_model, device=handle.device, requires_grad=True)
    opt = torch.optim.Adam([v], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    vocab = vocab_size(handle)
    last_kl, last_p = 0.0, 0.0
    for _ in range(cfg.steps):
        batch = [pairs[i] for i in torch.randperm(len(pairs), generator=gen)[: cfg.batch_size].tolist()]
        n_kl = max(1, sum(len(b[1]) + len(b[2]) - 2 for b in batch))  # every prediction but the decision's
        opt.zero_grad()
        p_sum, kl_sum = 0.0, 0.0
        for part in _parts(batch, cfg.micro_batch, vocab):  # the step's loss, accumulated part by part
            loss, p, kl = _part_loss(handle, v, layers, part, cfg.positions, 1 / len(batch), cfg.kl_weight / n_kl)
            loss.backward()
            p_sum += p
            kl_sum += kl
        opt.step()
        last_p, last_kl = p_sum / len(batch), kl_sum / n_kl
    info = {
        **recipe,
        "method": "learned",
        "objective": "decision log-likelihood + kl_weight * mean KL(unsteered || steered)",
        "n_pairs": len(pairs),
        "final_p_target": round(last_p, 4),
        "final_mean_kl": round(last_kl, 6),
        **asdict(cfg),
    }
    meta = VectorMeta.for_model(handle, layers, cfg.positions, info)
    return SteeringVector(v.detach(), meta)


def _parts(batch: list[Pair], rows: int | None, vocab: int) -> list[list[Pair]]:
    """The step's pairs in forward passes of ``rows`` pairs, or (None) of as many as keep a pass's log-probs
    (rows x widest prompt ⊕ continuation x vocab) within ``reasonscope.budget.LOGIT_BUDGET``; at least one a pass."""
    if rows is not None:
        return [batch[i : i + rows] for i in range(0, len(batch), rows)]
    widths = [len(p[0]) + max(len(p[1]), len(p[2])) for p in batch]
    return [[batch[i] for i in group] for group in passes(widths, vocab)]


def _part_loss(
    handle: Any,
    v: torch.Tensor,
    layers: tuple[int, ...],
    part: list[Pair],
    rule: str,
    lp_weight: float,
    kl_weight: float,
) -> tuple[torch.Tensor, float, float]:
    """For these pairs: ``−lp_weight·Σ log p(target at its decision) + kl_weight·Σ KL(unsteered ‖ steered)`` over
    every other prediction of both continuations, whose gradient reaches ``v``; and the two sums' parts
    ``(Σ p(target at the decision), Σ KL)``. Each pass runs to the final norm and its predictions are unembedded a run
    of positions at a time (:func:`reasonscope.budget.sum_by_runs`), so no pass holds ``[rows, T, vocab]`` log-probs."""
    sums = {"p": 0.0, "kl": 0.0}
    decisions = [b[3] for b in part]
    loss = _rows_loss(handle, v, layers, [(p, t) for p, t, _, _ in part], decisions, rule, lp_weight, kl_weight, sums)
    loss = loss + _rows_loss(handle, v, layers, [(p, s) for p, _, s, _ in part], decisions, rule, 0.0, kl_weight, sums)
    return loss, sums["p"], sums["kl"]


def _rows_loss(
    handle: Any,
    v: torch.Tensor,
    layers: tuple[int, ...],
    rows: list[tuple[list[int], list[int]]],
    decisions: list[int],
    rule: str,
    lp_weight: float,
    kl_weight: float,
    sums: dict[str, float],
) -> torch.Tensor:
    """:func:`_part_loss`'s terms for the left-padded ``prompt ⊕ continuation`` rows (``lp_weight`` 0: no decision
    term, the sources); adds to ``sums``."""
    seqs, mask = handle.left_padded([p + c for p, c in rows])
    seqs, mask = seqs.to(handle.device), mask.to(handle.device)
    width = seqs.shape[1]
    start = torch.tensor([width - len(c) - 1 for _, c in rows], device=handle.device)[:, None]
    pos = torch.arange(width, device=handle.device)[None]
    where = ((pos >= start) if rule == "last" else (pos == start)).float()[..., None]
    hooks = {
        f"blocks.{layer}.hook_resid_post": (lambda x, k=k: x + where.to(x) * v[k].to(x))
        for k, layer in enumerate(layers)
    }
    hidden = handle.run_hidden(seqs, mask, hooks=hooks)[:, :-1]  # the predictions of tokens 1..T-1
    with torch.no_grad():
        plain = handle.run_hidden(seqs, mask)[:, :-1]
    decision = pos[:, :-1] == start + torch.tensor(decisions, device=handle.device)[:, None]
    nxt = seqs[:, 1:]

    def term(x: torch.Tensor, at: tuple) -> torch.Tensor:
        logp = handle.unembed(x).float().log_softmax(-1)
        with torch.no_grad():
            logp0 = handle.unembed(plain[at]).float().log_softmax(-1)
        dec = decision[at]
        kl = ((logp0.exp() * (logp0 - logp)).sum(-1) * ~dec).sum()
        sums["kl"] += float(kl.detach())
        out = kl_weight * kl
        if lp_weight:
            lp = logp.gather(-1, nxt[at][:, None])[:, 0][dec]  # each target's token at its decision
            sums["p"] += float(lp.detach().exp().sum())
            out = out - lp_weight * lp.sum()
        return out

    return sum_by_runs(hidden, pos[:, :-1].expand(len(rows), -1) >= start, vocab_size(handle), term)
