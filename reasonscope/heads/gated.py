"""Gated attention per KV head: ``α·full + (1−α)·window``, registered with HF's ``AttentionInterface``.

Query head ``h`` reads KV head ``h // G`` and its gate (RLKV ``HeadAdapterLayer``, DuoAttention; see
``../shared/research/heads.md`` §3.1). Mixing outputs equals mixing attention probabilities, so both
branches share q/k/v. Gates may carry gradients (gate-IG, the Duo and RLKV learners) and may be
per row (``[batch, L, H_kv]``: one masking pattern per replicated input, for exact windowing).

The window follows real token positions (the attention mask's non-pad keys), so left-padded rows
equal their unpadded selves. Which queries are windowed: all with ``prefill="window"``; otherwise
the decode queries: every query of a forward pass with a cache, none of a cache-less pass, unless
``GateState.prefill_lengths`` says where each row's prompt ends (teacher-forced traces).

:func:`gated_attention` installs it on a :class:`~reasonscope.models.ModelHandle` (``handle.model``
is the HF module under every backend) and restores the original implementation on exit, even when
the body raises. The physical cache of :mod:`reasonscope.heads.physical` runs through the same
function (its keys arrive as :class:`SplitKV`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .policy import CompressionPolicy

GATED_ATTN = "reasonscope_gated"
_STATES: dict[int, tuple[Any, GateState]] = {}  # id(config) -> (config, state)


@dataclass
class GateState:
    """What the installed attention reads at every call; change fields between forward passes.

    ``alpha``: gates ``[L, H_kv]`` or per row ``[batch, L, H_kv]`` in [0, 1] (1 = full attention).
    ``prefill_lengths``: ``[batch]`` real prompt tokens per row; queries at or after it are windowed.
    ``record``: keep each layer's full-attention pattern ``[batch, H, q, k]`` in ``patterns``.
    ``per_request``: ``alpha`` is ``[requests, L, H_kv]``, one gate set per request of
    :func:`reasonscope.generation.generate`; each batch row reads its request's gates (``current_batch().rows``).
    """

    alpha: torch.Tensor
    policy: CompressionPolicy
    prefill_lengths: torch.Tensor | None = None
    record: bool = False
    per_request: bool = False
    patterns: dict[int, torch.Tensor] = field(default_factory=dict)
    calls: int = 0
    original_attn: str | None = None  # the model's own implementation, restored on exit


@dataclass
class SplitKV:
    """Keys and values of one layer of a physical cache: full KV heads hold every token, compressed ones
    only ``positions`` (sink + recent + the new tokens)."""

    full_heads: list[int]
    stream_heads: list[int]
    full_k: torch.Tensor
    full_v: torch.Tensor
    stream_k: torch.Tensor
    stream_v: torch.Tensor
    positions: torch.Tensor  # [n_kept] real positions of the compressed heads' keys


def _state_for(module: Any) -> GateState:
    entry = _STATES.get(id(module.config))
    if entry is None or entry[0] is not module.config:
        raise RuntimeError(
            f"attention implementation {GATED_ATTN!r} is set but no gates are installed on this model; "
            "run the model inside `with gated_attention(handle, alpha, policy):`"
        )
    return entry[1]


def _base_mask(
    attention_mask: torch.Tensor | None, b: int, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor:
    """Bool ``[b, 1, q, kv]`` causal + padding mask (True = may attend)."""
    if attention_mask is None:
        k = torch.arange(kv_len, device=device)
        q = torch.arange(kv_len - q_len, kv_len, device=device)
        return (k[None] <= q[:, None]).expand(b, 1, q_len, kv_len)
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return attention_mask.expand(b, 1, q_len, kv_len)


def _decode_queries(state: GateState, q_rank: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """Bool ``[b, q]``: which queries read through the window."""
    if state.policy.prefill == "window":
        return torch.ones_like(q_rank, dtype=torch.bool)
    if state.prefill_lengths is not None:
        return q_rank >= state.prefill_lengths.to(q_rank.device)[:, None]
    from ..generation import current_batch

    batch = current_batch()  # inside generate a prompt pass may also read a cache (a shared prefix's rest)
    decoding = q_len < kv_len if batch is None else not batch.prefill
    return torch.full_like(q_rank, decoding, dtype=torch.bool)


def _no_empty_rows(mask: torch.Tensor) -> torch.Tensor:
    """Let fully masked rows (pad queries) see every key, so no NaN reaches outputs or gradients."""
    return mask | ~mask.any(-1, keepdim=True)


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None,
    repeat_kv: bool | None = None,
) -> torch.Tensor:
    """Masked SDPA with grouped KV heads. ``repeat_kv`` (default: off the CPU) repeats K/V to the query heads:
    on CUDA a masked ``enable_gqa`` call may fall back to the math kernel, which materialises ``[b, H, q, k]``."""
    group = q.shape[1] // k.shape[1]
    if group > 1 and (q.device.type != "cpu" if repeat_kv is None else repeat_kv):
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=_no_empty_rows(mask), scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def _layer_alpha(state: GateState, layer: int, b: int, group: int) -> torch.Tensor:
    """Gates of one layer broadcast to query heads: ``[b or 1, H, 1, 1]``."""
    a = state.alpha[..., layer, :]
    if state.per_request:
        from ..generation import current_batch

        batch = current_batch()
        if batch is None:
            raise RuntimeError(
                "per-request gates are read inside reasonscope.generation.generate only; "
                "give per-row gates (per_request=False) for a plain forward pass"
            )
        if batch.requests > a.shape[0]:  # checked on the host: no device sync inside the forward pass
            raise ValueError(
                f"per-request gates have {a.shape[0]} rows for the {batch.requests} requests of this generate "
                "call; give alpha [requests, L, H_kv]"
            )
        a = a[batch.rows.clamp(min=0).to(a.device)]  # idle rows (-1) compute discarded output
    a = a.reshape(-1, a.shape[-1])
    if a.shape[0] not in (1, b):
        raise ValueError(
            f"per-row gates have {a.shape[0]} rows but the batch has {b}; give alpha [L, H_kv] or [{b}, L, H_kv]"
        )
    return a.repeat_interleave(group, dim=-1)[:, :, None, None]


def gated_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: Any,
    value: Any,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered attention function; returns ``([b, q, H, d], None)`` like HF's implementations."""
    state = _state_for(module)
    state.calls += 1
    if isinstance(key, SplitKV):
        return _physical_forward(state, query, key, attention_mask, scaling), None
    b, n_heads, q_len, _ = query.shape
    kv_len, group = key.shape[2], n_heads // key.shape[1]
    base = _base_mask(attention_mask, b, q_len, kv_len, query.device)
    rank = base[:, 0, -1, :].long().cumsum(-1) - 1  # real position of each key (the last query sees every key)
    q_rank = rank[:, kv_len - q_len :]
    decode = _decode_queries(state, q_rank, q_len, kv_len)
    if state.record:
        k_rep = key.repeat_interleave(group, 1)
        scores = (query @ k_rep.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
        state.patterns[module.layer_idx] = scores.masked_fill(~_no_empty_rows(base), float("-inf")).softmax(-1).detach()
    a = _layer_alpha(state, module.layer_idx, b, group).to(query)  # the layer's device: a model split over GPUs
    need_win = bool(decode.any()) and (a.requires_grad or bool((a < 1).any()))
    need_full = a.requires_grad or bool((a > 0).any()) or not need_win
    full = _sdpa(query, key, value, base, scaling) if need_full else None
    if not need_win:
        assert full is not None  # need_full holds whenever the window is not needed
        return full.transpose(1, 2).contiguous(), None
    window = state.policy.window(rank, q_rank) | ~decode[:, :, None]
    win = _sdpa(query, key, value, base & window[:, None], scaling)
    out = win if full is None else a * full + (1 - a) * win
    return out.transpose(1, 2).contiguous(), None


def _physical_forward(
    state: GateState, query: torch.Tensor, kv: SplitKV, attention_mask: torch.Tensor | None, scaling: float | None
) -> torch.Tensor:
    """Full KV heads read every cached key; compressed ones the kept keys, through the window when decoding."""
    b, n_heads, q_len, d = query.shape
    n_kv = len(kv.full_heads) + len(kv.stream_heads)
    group = n_heads // n_kv
    kv_len = int(kv.positions[-1]) + 1 if kv.positions.numel() else q_len
    base = _base_mask(attention_mask, b, q_len, kv_len, query.device)
    if not bool(base[:, 0, -1, :].all()):
        raise ValueError(
            "the physical KV cache needs unpadded rows; decode one sequence at a time (or equal-length "
            "prompts), or use the mask simulation (gated_attention) for padded batches"
        )
    out = query.new_empty(b, n_heads, q_len, d)
    q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device).expand(b, q_len)
    if kv.full_heads:
        idx = torch.tensor([j * group + r for j in kv.full_heads for r in range(group)], device=query.device)
        out[:, idx] = _sdpa(query[:, idx], kv.full_k, kv.full_v, base, scaling)
    if kv.stream_heads:
        idx = torch.tensor([j * group + r for j in kv.stream_heads for r in range(group)], device=query.device)
        decode = _decode_queries(state, q_pos, q_len, kv_len)
        window = state.policy.window(kv.positions.expand(b, -1), q_pos) | ~decode[:, :, None]
        out[:, idx] = _sdpa(query[:, idx], kv.stream_k, kv.stream_v, base[..., kv.positions] & window[:, None], scaling)
    return out.transpose(1, 2).contiguous()


def _gated_mask(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Mask builder for :data:`GATED_ATTN`: HF's boolean SDPA mask, always materialised (padding is needed)."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    mask = sdpa_mask(*args, **kwargs)
    assert mask is not None  # causal skipping is off, so a mask is always built
    return mask


def register() -> None:
    """Register :data:`GATED_ATTN` with HF's attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(GATED_ATTN, gated_attention_forward)
    AttentionMaskInterface.register(GATED_ATTN, _gated_mask)


def check_alpha(alpha: torch.Tensor, n_layers: int, n_kv_heads: int) -> None:
    """Refuse gates of the wrong shape or outside [0, 1]."""
    if alpha.dim() not in (2, 3) or tuple(alpha.shape[-2:]) != (n_layers, n_kv_heads):
        raise ValueError(
            f"alpha has shape {tuple(alpha.shape)}; this model needs [{n_layers}, {n_kv_heads}] "
            f"(layers x KV heads) or [batch, {n_layers}, {n_kv_heads}]"
        )
    if bool(((alpha < 0) | (alpha > 1) | alpha.isnan()).any()):
        raise ValueError("alpha has values outside [0, 1]; clamp the gates (alpha.clamp(0, 1)) before installing")


@contextmanager
def gated_attention(
    handle: Any,
    alpha: torch.Tensor,
    policy: CompressionPolicy = CompressionPolicy(),
    prefill_lengths: torch.Tensor | None = None,
    record: bool = False,
    per_request: bool = False,
) -> Iterator[GateState]:
    """Run ``handle``'s model with gated attention inside the block; yields the live :class:`GateState`.

    ``per_request=True`` takes ``alpha [requests, L, H_kv]``: one gate set per prompt of a
    :func:`reasonscope.generation.generate` call run inside the block.

    The original attention implementation is restored on exit, also when the body raises. Installing
    twice on one model is refused.
    """
    g = handle.geometry
    check_alpha(alpha, g.n_layers, g.n_kv_heads)
    if per_request and alpha.dim() != 3:
        raise ValueError(
            f"per-request gates need alpha [requests, {g.n_layers}, {g.n_kv_heads}], got {tuple(alpha.shape)}"
        )
    model = handle.model
    config = model.config
    if id(config) in _STATES:
        raise RuntimeError("gated attention is already installed on this model; leave the outer `with` block first")
    register()
    state = GateState(
        alpha=alpha.to(handle.device),
        policy=policy,
        prefill_lengths=prefill_lengths,
        record=record,
        per_request=per_request,
    )
    state.original_attn = original = config._attn_implementation
    _STATES[id(config)] = (config, state)
    try:
        config._attn_implementation = GATED_ATTN
        yield state
    finally:
        config._attn_implementation = original
        _STATES.pop(id(config), None)


def pattern_hooks(state: GateState, attention_mask: torch.Tensor) -> dict[str, Any]:
    """The same gating as hook functions on ``blocks.L.attn.hook_pattern`` (for :meth:`ModelHandle.run`).

    For backends that compute attention themselves (TransformerBridge) instead of calling HF's
    attention interface: a softmax over the window equals the full softmax restricted to the window and
    renormalised, so ``α·p + (1−α)·renorm(p·window)`` equals the attention function's output.
    """
    mask = attention_mask.bool()
    rank = mask.long().cumsum(-1) - 1

    def make(layer: int) -> Any:
        def hook(p: torch.Tensor) -> torch.Tensor:
            b, n_heads, q_len, kv_len = p.shape
            r = rank.to(p.device)[:, :kv_len]
            q_rank = r[:, kv_len - q_len :]
            decode = _decode_queries(state, q_rank, q_len, kv_len)
            window = (state.policy.window(r, q_rank) | ~decode[:, :, None])[:, None]
            pw = p * window
            pw = pw / pw.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
            a = _layer_alpha(state, layer, b, n_heads // state.alpha.shape[-1]).to(p)
            return a * p + (1 - a) * pw

        return hook

    return {f"blocks.{layer}.attn.hook_pattern": make(layer) for layer in range(state.alpha.shape[-2])}


def gated_run(
    handle: Any,
    state: GateState,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    hidden: bool = False,
) -> torch.Tensor:
    """Logits of ``handle.run`` under the installed gates, on any backend (``hidden``: what the unembedding reads,
    ``handle.run_hidden``, whose ``handle.unembed`` gives those logits).

    Backends that bypass HF's attention interface (the attention function is not called) get the gates
    through :func:`pattern_hooks` instead; which route a handle takes is probed once and kept in
    ``handle.meta["heads.attention_route"]``.
    """
    run = handle.run_hidden if hidden else handle.run
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    route = handle.meta.get("heads.attention_route")
    if route is None:
        before = state.calls
        out = run(input_ids, attention_mask)
        route = handle.meta["heads.attention_route"] = "interface" if state.calls > before else "pattern_hooks"
        if route == "interface":
            return out
    if route == "interface":
        return run(input_ids, attention_mask)
    config = handle.model.config
    config._attn_implementation = state.original_attn  # what the backend really runs (it materialises patterns)
    try:
        return run(input_ids, attention_mask, hooks=pattern_hooks(state, attention_mask))
    finally:
        config._attn_implementation = GATED_ATTN
