"""Content identity of a job's inputs: model weights and traces, independent of paths and backends."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .traces.record import Trace

# TransformerBridge wraps every HF submodule in place, inserting this segment into parameter names
_BRIDGE_SEGMENT = "._original_component"


def canonical_param_name(name: str) -> str:
    """The HF name of a parameter, also when a TransformerBridge has wrapped the model in place."""
    return name.replace(_BRIDGE_SEGMENT, "")


def weight_hash(model: torch.nn.Module, chunk_elems: int = 1 << 24) -> str:
    """``"sha256:<hex>"`` over canonical HF parameter names, shapes, dtypes and raw bytes, in name order.

    Invariant to where the weights were loaded from and to the backend: names are mapped back to
    HF's (:func:`canonical_param_name`) and all-zero biases, which compute nothing and which the
    bridge adds to bias-free layers, are skipped. Tied parameters count once. Each parameter is
    copied to the CPU in chunks of ``chunk_elems`` elements, so a big GPU model needs one chunk of
    host memory at a time; the cost is one pass over the weights.
    """
    named = sorted(((canonical_param_name(n), p) for n, p in model.named_parameters()), key=lambda kv: kv[0])
    h = hashlib.sha256()
    for name, p in named:
        if p.device.type == "meta":
            raise ValueError(f"parameter {name!r} is on the meta device; load the weights before hashing")
        if name.endswith("bias") and not bool(p.detach().any()):
            continue
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}\n".encode())
        flat = p.detach().reshape(-1)
        for s in range(0, flat.numel(), chunk_elems):
            piece = flat[s : s + chunk_elems].to("cpu").contiguous()
            h.update(piece.view(torch.uint8).numpy().data)
    return "sha256:" + h.hexdigest()


def trace_digest(trace: Trace) -> str:
    """128-bit hex digest of what a capture reads from a trace: token ids, text, think span, segments, spans."""
    record = {
        "token_ids": list(trace.token_ids),
        "text": hashlib.sha256((trace.prompt + "\x00" + trace.thinking + "\x00" + trace.answer).encode()).hexdigest(),
        "think_span": list(trace.think_span) if trace.think_span else None,
        "segments": [[s.start, s.end] for s in trace.segments],
        "spans": trace.meta.get("spans"),
    }
    blob = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def traces_hash(digests: Iterable[str]) -> str:
    """``"sha256:<hex>"`` of an ordered list of per-trace digests."""
    return "sha256:" + hashlib.sha256("\n".join(digests).encode()).hexdigest()
