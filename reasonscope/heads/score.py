"""``score_heads``: one entry point from a model and its traces to a :class:`HeadMap` artifact."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from .batches import trace_batches
from .headmap import HeadMap
from .policy import CompressionPolicy
from .retrieval import retrieval_scores
from .rlkv import RLKVConfig, rlkv_scores
from .scorers import DUO_LOSSES, DuoLoss, duo_scores, gate_ig_scores, windowing_scores

Method = Literal["window", "gate-ig", "duo", "rlkv", "retrieval"]
METHODS: tuple[str, ...] = get_args(Method)


@dataclass(frozen=True)
class HeadConfig:
    """What to score and how; validated on construction so nothing runs on bad input."""

    method: Method = "window"
    sink: int = 16
    recent: int = 64
    prefill: Literal["full", "window"] = "full"
    batch_size: int = 16
    ig_steps: int = 8
    ig_loss: Literal["kl", "ce"] = "kl"
    duo_steps: int = 200
    duo_lr: float = 0.02
    duo_l1: float = 0.05
    duo_loss: DuoLoss = "kl"
    rlkv: RLKVConfig = field(default_factory=RLKVConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown head scoring method {self.method!r}; choose one of {METHODS}")
        if self.ig_loss not in ("kl", "ce"):
            raise ValueError(f"ig_loss must be 'kl' or 'ce', got {self.ig_loss!r}")
        if self.duo_loss not in DUO_LOSSES:
            raise ValueError(f"duo_loss must be 'kl' or 'mse', got {self.duo_loss!r}")
        if self.batch_size < 1 or self.ig_steps < 1 or self.duo_steps < 1:
            raise ValueError("batch_size, ig_steps and duo_steps must be >= 1")
        CompressionPolicy(self.sink, self.recent, self.prefill)  # validates the window

    @property
    def policy(self) -> CompressionPolicy:
        return CompressionPolicy(self.sink, self.recent, self.prefill)


def traces_hash(traces: Sequence[Any]) -> str:
    """Content hash of the traces' ids, token ids, think spans and grades."""
    blob = json.dumps([[t.id, list(t.token_ids), t.think_span, t.grade] for t in traces], separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def score_heads(handle: Any, traces: Sequence[Any], cfg: HeadConfig, out: str | Path | None = None) -> HeadMap:
    """Score every KV head of ``handle`` on its own ``traces``; with ``out``, write the artifact there."""
    if out is not None and Path(out).exists():
        raise FileExistsError(f"{out} already exists; delete it or choose another output path")
    policy, log = cfg.policy, list[dict[str, Any]]()
    aggregation = "kv-head"
    if cfg.method == "retrieval":
        scores, _ = retrieval_scores(handle, traces)
        aggregation = "max over the query heads of the group"
    elif cfg.method == "rlkv":
        scores = rlkv_scores(handle, traces, policy, cfg.rlkv, log=log)
    else:
        batches = trace_batches(handle, traces, policy, cfg.batch_size)
        if cfg.method == "window":
            scores = windowing_scores(handle, batches, policy)
        elif cfg.method == "gate-ig":
            scores = gate_ig_scores(handle, batches, policy, cfg.ig_steps, cfg.ig_loss)
        else:
            scores = duo_scores(handle, batches, policy, cfg.duo_steps, cfg.duo_lr, cfg.duo_l1, log, cfg.duo_loss)
    hm = HeadMap(scores, cfg.method, handle.weight_hash, policy, aggregation, log)
    if out is None:
        return hm
    return hm.save(out, asdict(cfg), {"model": handle.weight_hash, "traces": traces_hash(traces)})
