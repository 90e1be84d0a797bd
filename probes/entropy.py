"""Next-token entropies and the reasoning path deviation index (Guan et al. 2026, arXiv 2603.14251; probes.md §3).

``H_t = -sum_v p_t(v) log p_t(v)`` (nats) of the distribution the model predicts after token ``t``. The index at
``t`` (inside the thinking, ``t - start + 1 >= W``) is ``mean(H[t-W+1..t]) / mean(H[start..t])``; the transition
variant replaces ``H`` by ``1[token t+1 is a transition word and H_t > tau]`` (a high-entropy transition).
The self-surprise ``S_t = -log p_t(token t+1)`` is how unlikely the model found the token it went on to write; a
chunk's ``surprise`` is its maximum over the thinking so far (the least likely step taken: a training-free
confidence baseline, as a sampled slip is an unlikely token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from reasonscope.budget import rows_per_pass, vocab_size
from reasonscope.capture import length_batches
from reasonscope.traces import Trace

if TYPE_CHECKING:  # pragma: no cover
    from reasonscope.models import ModelHandle

TRANSITION_WORDS = ("wait", "but", "alternatively", "hmm", "however")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) over the last dimension, from ``log_softmax`` in float32."""
    return _entropy(logits.float().log_softmax(-1))


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def token_entropies(handle: ModelHandle, traces: Sequence[Trace], token_budget: int = 8192) -> list[torch.Tensor]:
    """Per trace, ``H_t`` for every token position (``[n_tokens]``, float32, CPU); see :func:`token_stats`."""
    return [h for h, _ in token_stats(handle, traces, token_budget)]


def token_stats(
    handle: ModelHandle, traces: Sequence[Trace], token_budget: int = 8192
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per trace, ``(H_t, S_t)`` for every token position (``[n_tokens]`` each, float32, CPU; ``S`` is NaN at the
    last token), from one pass: left-padded length batches of at most ``token_budget`` tokens whose logits also fit
    the logit budget (:mod:`reasonscope.budget`); a longer row's logits are read a run of positions at a time."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(traces)
    tokens = min(token_budget, rows_per_pass(1, vocab_size(handle)))
    for batch in length_batches([len(t.token_ids) for t in traces], tokens):
        ids, mask = handle.left_padded([traces[i].token_ids for i in batch])
        width = ids.shape[1]
        nxt = torch.roll(ids, -1, dims=1)
        h, s = torch.empty(ids.shape), torch.empty(ids.shape)
        with torch.inference_mode():
            for cols, logits in handle.run_chunks(ids, mask):
                lp = logits.float().log_softmax(-1)
                h[:, cols] = _entropy(lp).cpu()
                s[:, cols] = (-lp.gather(-1, nxt[:, cols, None].to(lp.device))[..., 0]).cpu()
                del lp
        s[:, -1] = math.nan  # no token follows the last
        for r, i in enumerate(batch):
            n = len(traces[i].token_ids)
            out[i] = (h[r, width - n :], s[r, width - n :])
    return [x for x in out if x is not None]


def deviation_index(x: torch.Tensor, start: int, window: int) -> torch.Tensor:
    """``mean(x[t-W+1..t]) / mean(x[start..t])`` per position ``t``; NaN before ``start + W - 1``."""
    out = torch.full(x.shape, math.nan, dtype=torch.float64)
    seg = x[start:].double()
    if len(seg) < window:
        return out
    c = torch.cat([torch.zeros(1, dtype=torch.float64), seg.cumsum(0)])
    t = torch.arange(window - 1, len(seg))
    local = (c[t + 1] - c[t + 1 - window]) / window
    glob = c[t + 1] / (t + 1)
    out[start + window - 1 :] = local / glob.clamp_min(1e-12)
    return out


def transition_mask(handle: ModelHandle, token_ids: Sequence[int]) -> torch.Tensor:
    """``[n]`` bool: token ``t+1`` starts a transition word (so ``H_t`` is the entropy that chose it)."""
    texts = handle.tokenizer.convert_ids_to_tokens(list(token_ids))
    words = [handle.tokenizer.convert_tokens_to_string([s]).strip().lower() for s in texts]
    nxt = [any(w.startswith(tw) and tw.startswith(w) for tw in TRANSITION_WORDS) and len(w) > 0 for w in words]
    return torch.tensor(nxt[1:] + [False])


def chunk_signals(
    handle: ModelHandle,
    traces: Sequence[Trace],
    positions: Sequence[Sequence[int]],
    window: int,
    tau: float | None = None,
) -> dict[str, list[list[float]]]:
    """Per trace and position: ``rpdi``, ``rpdi_transition``, ``entropy`` (mean H since the previous position) and
    ``surprise`` (max S over the thinking up to the position: the predictions of its tokens)."""
    stats = token_stats(handle, traces)
    ents = [h for h, _ in stats]
    if tau is None:
        tau = float(
            torch.cat([h[t.think_span[0] : t.think_span[1]] for h, t in zip(ents, traces) if t.think_span]).median()
        )
    out: dict[str, list[list[float]]] = {"rpdi": [], "rpdi_transition": [], "entropy": [], "surprise": []}
    for t, (h, sur), pos in zip(traces, stats, positions):
        if t.think_span is None:
            raise ValueError(f"trace {t.id!r} has no think span; segment it with a tokenizer first")
        start = t.think_span[0]
        rpdi = deviation_index(h, start, window)
        trans = deviation_index((transition_mask(handle, t.token_ids) & (h > tau)).double(), start, window)
        prev = [start, *[p + 1 for p in pos[:-1]]]
        out["rpdi"].append([float(rpdi[p]) for p in pos])
        out["rpdi_transition"].append([float(trans[p]) for p in pos])
        out["entropy"].append([float(h[a : p + 1].mean()) if p >= a else math.nan for a, p in zip(prev, pos)])
        first = max(start - 1, 0)  # the prediction of the first thinking token
        out["surprise"].append([float(sur[first:p].max()) if p > first else math.nan for p in pos])
    return out
