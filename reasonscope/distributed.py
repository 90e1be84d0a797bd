"""Capture past one GPU or machine with Ray actors (``pip install reasonscope[distributed]``).

Each actor holds a model replica and captures the shards ``rank, rank + W, rank + 2W, ...`` of
the job into the same store directory (a shared filesystem on a cluster). Shards are written
atomically and independently, so the result equals a single-process capture shard for shard; the
driver finalizes the store once every worker is done. A re-run resumes like a local capture.

On one multi-GPU node: ``ray.init()`` and one worker per GPU (``num_gpus_per_worker=1``).
On a Ray cluster: start it (``ray start --head`` / ``ray start --address=...``), point ``out`` at
a path every node sees, and run the same call with ``address="auto"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from .capture import CaptureConfig, capture
from .store import ActivationStore, StoreWriter
from .traces.record import Trace


class _Worker:
    """Holds one model replica; ``run`` captures the given shard indices."""

    def __init__(self, model: str, load_kwargs: dict[str, Any]):
        import torch

        from .models import load_model

        torch.set_num_threads(1) if not torch.cuda.is_available() else None
        self.handle = load_model(model, **load_kwargs)

    def run(self, traces: list[dict], cfg: dict, out: str, shards: list[int]) -> list[int]:
        capture(
            self.handle,
            [Trace.from_dict(t) for t in traces],
            CaptureConfig(**cfg),
            out,
            shards=shards,
            finalize=False,
            progress=False,
        )
        return shards


def capture_distributed(
    model: str,
    traces: Sequence[Trace],
    cfg: CaptureConfig,
    out: str,
    num_workers: int = 2,
    num_gpus_per_worker: float = 0,
    load_kwargs: dict[str, Any] | None = None,
    address: str | None = None,
) -> ActivationStore:
    """Capture over ``num_workers`` Ray actors; returns the finalized store."""
    import ray

    if not ray.is_initialized():
        num_cpus = None if address else max(num_workers, 1)  # a cluster brings its own resources
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    worker = ray.remote(num_cpus=1, num_gpus=num_gpus_per_worker)(_Worker)
    actors: list[Any] = [worker.remote(model, load_kwargs or {}) for _ in range(num_workers)]
    payload = [t.to_dict() for t in traces]
    n_shards = -(-len(traces) // cfg.shard_size)
    cfgd = asdict(cfg)
    # the first worker creates the store (manifest) so the others only ever resume into it
    ray.get(actors[0].run.remote(payload, cfgd, out, []))
    ray.get([a.run.remote(payload, cfgd, out, list(range(r, n_shards, num_workers))) for r, a in enumerate(actors)])
    return StoreWriter.reopen(out).finalize()
