"""Capture past one GPU or machine with Ray actors (``pip install reasonscope[distributed]``).

Each actor holds a model replica and captures the shards ``rank, rank + W, rank + 2W, ...`` of
the job into the same store directory (a shared filesystem on a cluster). Shards are written
atomically and independently, so the result equals a single-process capture shard for shard; the
driver finalizes the store once every worker is done. A re-run resumes like a local capture.

On one multi-GPU node: one worker per GPU (``num_gpus_per_worker=1``) in a Ray instance started here.
On a Ray cluster: start it (``ray start --head`` / ``ray start --address=...``), point ``out`` at
a path every node sees, and run the same call with ``address="auto"`` (or ``RAY_ADDRESS`` set).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .capture import CaptureConfig, LargeCaptureWarning, capture
from .store import ActivationStore, StoreWriter
from .traces.record import Trace

INSTALL = "pip install 'reasonscope[distributed]'"


class _Worker:
    """Holds one model replica; ``run`` captures the given shard indices."""

    def __init__(self, model: str, load_kwargs: dict[str, Any]):
        import torch

        from .models import load_model

        torch.set_num_threads(1) if not torch.cuda.is_available() else None
        self.error: Exception | None = None
        try:
            self.handle = load_model(model, **load_kwargs)
        except Exception as e:  # noqa: BLE001 - run() raises it, so the driver gets it as itself, not "actor died"
            self.error = e

    def run(self, traces: list[dict], cfg: dict, out: str, shards: list[int] | None) -> list[tuple[str, str]]:
        """Capture ``shards`` (None: create the store and size the whole job, writing no shard); returns the warnings
        raised, as (category name, message), for the driver to raise again: a share's size warning is left out (the
        store-creating call warned about the whole job's)."""
        if self.error is not None:
            raise self.error
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            capture(
                self.handle,
                [Trace.from_dict(t) for t in traces],
                CaptureConfig(**cfg),
                out,
                shards=[] if shards is None else shards,
                finalize=False,
                progress=False,
                estimate_all=shards is None,
            )
        share = shards is not None
        return [
            (type(w.message).__name__, str(w.message))
            for w in caught
            if not (share and isinstance(w.message, LargeCaptureWarning))
        ]


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError(f"capture with workers needs Ray: {INSTALL}") from None
    return ray


def _fit(ray: Any, num_gpus_per_worker: float) -> int:
    """How many workers (a CPU and ``num_gpus_per_worker`` GPUs each, on one node) the alive nodes can hold."""
    fit = 0
    for node in ray.nodes():
        if node.get("Alive"):
            res = node.get("Resources", {})
            by_gpu = int(res.get("GPU", 0) // num_gpus_per_worker) if num_gpus_per_worker else 1 << 30
            fit += min(int(res.get("CPU", 0)), by_gpu)
    return fit


def _check_resources(ray: Any, num_workers: int, num_gpus_per_worker: float) -> None:
    """Refuse a job the Ray instance can never schedule (it would wait for ever), naming the fix."""
    fit = _fit(ray, num_gpus_per_worker)
    if fit >= num_workers:
        return
    each = f"a CPU and {num_gpus_per_worker:g} GPU" if num_gpus_per_worker else "a CPU"
    if fit == 0 and num_gpus_per_worker:
        fix = "no node of this Ray instance has that many GPUs: capture on CPUs (num_gpus_per_worker=0)"
    elif fit == 0:
        fix = "no node of this Ray instance has a CPU"
    else:
        fix = f"its nodes hold {fit} such workers: use num_workers (--workers) {fit} or fewer"
    raise ValueError(f"{num_workers} workers need {each} each, on one node; {fix}")


def _raise_again(caught: Sequence[tuple[str, str]]) -> None:
    for name, message in dict.fromkeys(caught):  # once each: workers may warn alike
        warnings.warn(message, LargeCaptureWarning if name == "LargeCaptureWarning" else UserWarning, stacklevel=3)


def capture_distributed(
    model: str,
    traces: Sequence[Trace],
    cfg: CaptureConfig,
    out: str,
    num_workers: int = 2,
    num_gpus_per_worker: float | None = 0,
    load_kwargs: dict[str, Any] | None = None,
    address: str | None = None,
) -> ActivationStore:
    """Capture over ``num_workers`` Ray actors (at most one per shard); returns the finalized store.

    ``address`` (or ``RAY_ADDRESS``): join that Ray cluster; otherwise a local instance is started with a CPU per
    worker and shut down when the job ends. ``num_gpus_per_worker=None``: one GPU each when the Ray instance has
    GPUs, else none. A worker's error, loading its model included, is raised as itself (its message names the
    fix); a worker that died leaves the store resumable."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}; capture in one process with capture()")
    ray = _ray()
    out = str(Path(out).resolve())  # the workers' working directory is not the driver's
    n_shards = -(-len(traces) // cfg.shard_size)
    num_workers = max(1, min(num_workers, n_shards))
    address = address or os.environ.get("RAY_ADDRESS")
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"address": address} if address else {"address": "local", "num_cpus": num_workers}
        ray.init(**kwargs, include_dashboard=False, log_to_driver=False)
    actors: list[Any] = []
    try:
        if num_gpus_per_worker is None:
            num_gpus_per_worker = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        _check_resources(ray, num_workers, num_gpus_per_worker)
        worker = ray.remote(num_cpus=1, num_gpus=num_gpus_per_worker)(_Worker)
        actors = [worker.remote(model, load_kwargs or {}) for _ in range(num_workers)]
        payload = [t.to_dict() for t in traces]
        cfgd = asdict(cfg)
        try:
            # the first worker creates the store (manifest) so the others only ever resume into it
            _raise_again(ray.get(actors[0].run.remote(payload, cfgd, out, None)))
            mine = [list(range(r, n_shards, num_workers)) for r in range(num_workers)]
            runs = [a.run.remote(payload, cfgd, out, shards) for a, shards in zip(actors, mine)]
            _raise_again([w for caught in ray.get(runs) for w in caught])
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        except ray.exceptions.RayActorError as e:
            raise ChildProcessError(
                f"a capture worker died ({type(e).__name__}); the shards written are kept: re-run the same command to "
                "resume"
            ) from e
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()
    return StoreWriter.reopen(out).finalize()
