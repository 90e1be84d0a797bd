"""Directions from activations: residuals of texts at named layers, mean difference and PCA of differences.

Residuals are read at ``blocks.L.hook_resid_post`` (the output of block ``L``) through ``handle.run``; texts are
tokenized without special tokens and left-padded, and every reduction indexes real tokens through the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from .vector import Positions, SteeringVector, VectorMeta

if TYPE_CHECKING:  # pragma: no cover
    from reasonscope.traces.record import Segment, Trace

__all__ = [
    "METHODS",
    "REDUCTIONS",
    "Method",
    "Reduce",
    "behaviour_vectors",
    "extract_vector",
    "mean_difference",
    "pca_difference",
    "residuals",
    "segment_residuals",
]

Reduce = Literal["last", "mean", "all"]
REDUCTIONS: tuple[Reduce, ...] = get_args(Reduce)
Method = Literal["mean_diff", "pca"]
METHODS: tuple[Method, ...] = get_args(Method)


def residuals(
    handle: Any, texts: Sequence[str], layers: Sequence[int], reduce: Reduce = "last", batch_size: int = 16
) -> torch.Tensor:
    """Residual stream after each of ``layers`` for each text, float32 on the CPU.

    ``reduce``: ``last`` (last token) or ``mean`` (mean over the text's tokens) give ``[n_texts, n_layers, d]``;
    ``all`` gives every token ``[n_tokens, n_layers, d]`` (texts concatenated in order).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce {reduce!r} is not one of {', '.join(REDUCTIONS)}")
    if not texts:
        raise ValueError("no texts to read residuals from")
    n_layers = handle.geometry.n_layers
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"layer {bad[0]} does not exist in {handle.source} (layers 0..{n_layers - 1})")
    tok = handle.tokenizer
    out: list[torch.Tensor] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in chunk]
        if any(not x for x in ids):
            raise ValueError("an empty text has no token to read; drop it")
        input_ids, mask = handle.left_padded(ids)
        acts = _residuals(handle, input_ids, mask, layers)  # [batch, pos, n_layers, d]
        real = mask.bool()
        if reduce == "last":
            out.append(acts[:, -1])
        elif reduce == "mean":
            w = real[..., None, None].float()
            out.append((acts * w).sum(1) / w.sum(1))
        else:
            out.append(acts[real])
    return torch.cat(out)


def _residuals(handle: Any, ids: torch.Tensor, mask: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """``[batch, pos, n_layers, d]`` float32 on the CPU: the output of each block in ``layers`` (no logits)."""
    names = [f"blocks.{x}.hook_resid_post" for x in layers]
    with torch.no_grad():
        cache = handle.run_with_cache(ids, mask, names)
    return torch.stack([cache[n].float().cpu() for n in names], dim=2)


def mean_difference(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """mean(target) − mean(source) over rows: ``[n, L, d]`` x2 -> ``[L, d]`` (paired or labelled rows)."""
    if target.shape[1:] != source.shape[1:]:
        raise ValueError(f"target rows {tuple(target.shape[1:])} and source rows {tuple(source.shape[1:])} differ")
    if len(target) == 0 or len(source) == 0:
        raise ValueError("mean difference needs at least one target and one source row")
    return target.float().mean(0) - source.float().mean(0)


def pca_difference(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """First principal direction of the paired differences (uncentred SVD), per layer, unit norm ``[L, d]``.

    Uncentred, as steering-vectors' ``pca_aggregator``, so a shift shared by all pairs is the direction; the sign is
    repeng's majority vote (most pairs project higher for target than source), where steering-vectors takes the sign
    of the mean projection: the two differ when a few large differences outweigh many small opposite ones.
    """
    if target.shape != source.shape:
        raise ValueError(f"PCA needs paired rows of one shape, got {tuple(target.shape)} and {tuple(source.shape)}")
    if len(target) < 2:
        raise ValueError("PCA of differences needs at least 2 pairs")
    diffs = (target - source).float().transpose(0, 1)  # [L, n, d]
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    pc = vh[:, 0]  # [L, d]
    votes = torch.sign(torch.einsum("lnd,ld->ln", diffs, pc)).sum(1)
    return pc * torch.where(votes < 0, -1.0, 1.0)[:, None]


def extract_vector(
    handle: Any,
    target_texts: Sequence[str],
    source_texts: Sequence[str],
    layers: Sequence[int],
    reduce: Reduce = "last",
    method: Method = "mean_diff",
    positions: Positions = "all",
    recipe: dict[str, Any] | None = None,
) -> SteeringVector:
    """A vector target − source from two sets of texts (``pca`` needs them paired, one target per source)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if method == "pca" and (reduce == "all" or len(target_texts) != len(source_texts)):
        raise ValueError("pca needs paired texts (as many targets as sources) and reduce 'last' or 'mean'")
    tgt = residuals(handle, target_texts, layers, reduce)
    src = residuals(handle, source_texts, layers, reduce)
    directions = mean_difference(tgt, src) if method == "mean_diff" else pca_difference(tgt, src)
    recipe = {
        "method": method,
        "reduce": reduce,
        "n_target": len(target_texts),
        "n_source": len(source_texts),
        "model_type": str(getattr(handle.model.config, "model_type", "")),
        **dict(recipe or {}),
    }
    meta = VectorMeta.for_model(handle, layers, positions, recipe)
    return SteeringVector(directions, meta)


def segment_residuals(
    handle: Any, traces: Sequence[Trace], layers: Sequence[int], batch_size: int = 16
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Mean residual over each thinking segment's token span: ``[n_segments, n_layers, d]`` and (trace, segment).

    Spans index ``Trace.token_ids`` (the model's own tokenization, see :func:`reasonscope.traces.segment_trace`).
    """
    n_layers = handle.geometry.n_layers
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"layer {bad[0]} does not exist in {handle.source} (layers 0..{n_layers - 1})")
    rows: list[torch.Tensor] = []
    owners: list[tuple[int, int]] = []
    for start in range(0, len(traces), batch_size):
        chunk = list(traces[start : start + batch_size])
        if any(not t.token_ids for t in chunk):
            raise ValueError("traces without token_ids have no spans; segment them with segment_trace first")
        ids, mask = handle.left_padded([t.token_ids for t in chunk])
        width = ids.shape[1]
        acts = _residuals(handle, ids, mask, layers)  # [batch, pos, n_layers, d]
        for b, t in enumerate(chunk):
            offset = width - len(t.token_ids)
            for k, seg in enumerate(t.segments):
                if seg.end > seg.start:
                    rows.append(acts[b, offset + seg.start : offset + seg.end].mean(0))
                    owners.append((start + b, k))
    if not rows:
        raise ValueError("the traces have no thinking segments; segment them with segment_trace first")
    return torch.stack(rows), owners


def behaviour_vectors(
    handle: Any,
    traces: Sequence[Trace],
    layers: Sequence[int],
    label: Callable[[Segment], str | None],
    positions: Positions = "all",
) -> dict[str, SteeringVector]:
    """One vector per behaviour: mean of its segments − mean of all labelled segments (segment means).

    ``label(segment)`` names a segment's behaviour (e.g. from annotated ``Segment.tags``), or None to skip it.
    """
    acts, owners = segment_residuals(handle, traces, layers)
    names = [label(traces[i].segments[k]) for i, k in owners]
    kept = [i for i, n in enumerate(names) if n is not None]
    if not kept:
        raise ValueError("no segment was labelled; check the label function against Segment.text / tags")
    pool = acts[kept]
    out = {}
    for name in sorted({n for n in names if n is not None}):
        mine = acts[[i for i in kept if names[i] == name]]
        recipe = {"method": "mean_diff", "reduce": "segment_mean", "behaviour": name, "n_target": len(mine)}
        meta = VectorMeta.for_model(handle, layers, positions, recipe)
        out[name] = SteeringVector(mean_difference(mine, pool), meta)
    return out
