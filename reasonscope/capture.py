"""Activation capture: named hook points at chosen positions over a trace dataset, into a store.

The job is cut into shards of ``shard_size`` traces (in dataset order). Each shard is captured in
length-bucketed batches under a token budget, gathered *inside* the hooks (only the selected
positions leave the device), copied to pinned host memory on a side CUDA stream, and written as
one store shard. A re-run of the same job skips the shards already on disk, so a killed capture
resumes where it stopped and ends with the same bytes as a clean run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from .hooks import parse_hook
from .store import ActivationStore, StoreManifest
from .traces.record import Trace

POSITION_RULES = ("all", "think", "segment_ends", "last", "spans")
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CaptureConfig:
    hooks: list[str]
    positions: str = "think"  # one of POSITION_RULES; "spans" reads trace.meta["spans"] = [[start, end), ...]
    dtype: str = "float32"  # storage dtype
    token_budget: int = 8192  # padded tokens per forward batch
    shard_size: int = 64  # traces per store shard
    padding_side: str = "left"
    stop_early: bool = True  # skip the layers after the last hooked one (hf backend)
    extra: dict = field(default_factory=dict)


def select_positions(trace: Trace, rule: str) -> torch.Tensor:
    """Token positions of ``trace`` selected by ``rule`` (sorted, unique)."""
    n = len(trace.token_ids)
    if rule == "all":
        pos = list(range(n))
    elif rule == "think":
        pos = list(range(*trace.think_span)) if trace.think_span else []
    elif rule == "segment_ends":
        pos = [s.end - 1 for s in trace.segments if s.end > s.start]
    elif rule == "last":
        pos = [n - 1] if n else []
    elif rule == "spans":
        pos = sorted({p for a, b in trace.meta.get("spans", []) for p in range(a, b)})
    else:
        raise ValueError(f"unknown position rule {rule!r}; choose one of {POSITION_RULES}")
    if pos and not (0 <= pos[0] and pos[-1] < n):
        raise ValueError(f"trace {trace.id!r}: rule {rule!r} selects positions outside its {n} tokens")
    return torch.tensor(pos, dtype=torch.long)


def segment_of(trace: Trace, positions: torch.Tensor) -> torch.Tensor:
    """Segment index of each position (-1 outside every segment)."""
    seg = torch.full_like(positions, -1)
    for k, s in enumerate(trace.segments):
        seg[(positions >= s.start) & (positions < s.end)] = k
    return seg


def length_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group indices by length (longest first) so that ``rows * longest <= token_budget``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= token_budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class _Stop(Exception):
    """Raised after the last hooked module to skip the rest of the forward pass."""


class _Gatherer:
    """Hook callbacks that keep only the selected rows and ship them to host memory."""

    def __init__(self, hooks: list[str], index: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype,
                 stop_after: str | None, keys: torch.Tensor | None = None, key_ok: torch.Tensor | None = None):
        self.index, self.dtype, self.stop_after = index, dtype, stop_after
        self.keys, self.key_ok = keys, key_ok  # per row: padded-column of each trace key position, validity
        self.out: dict[str, torch.Tensor] = {}
        cuda = index[0].is_cuda
        self.stream = torch.cuda.Stream(device=index[0].device) if cuda else None
        self.fns = {h: self._make(h) for h in hooks}

    def _make(self, name: str) -> Callable[[torch.Tensor], None]:
        def fn(x: torch.Tensor) -> None:
            if name.endswith("hook_pattern"):  # [b, h, q, k] -> [rows, h * key_len] in trace coordinates
                sel = x[self.index[0], :, self.index[1]].gather(-1, self.keys.unsqueeze(1).expand(-1, x.shape[1], -1))
                sel = sel.masked_fill(~self.key_ok.unsqueeze(1), 0)
            else:
                sel = x[self.index]
            sel = sel.detach().flatten(1).to(self.dtype)
            if self.stream is None:
                self.out[name] = sel
            else:  # async device->pinned-host copy on a side stream, overlapping the next layers
                host = torch.empty(sel.shape, dtype=sel.dtype, pin_memory=True)
                self.stream.wait_stream(torch.cuda.current_stream(sel.device))
                with torch.cuda.stream(self.stream):
                    host.copy_(sel, non_blocking=True)
                sel.record_stream(self.stream)
                self.out[name] = host
            if name == self.stop_after:
                raise _Stop

        return fn

    def result(self) -> dict[str, torch.Tensor]:
        if self.stream is not None:
            self.stream.synchronize()
        return self.out


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def capture_batch(handle, traces: Sequence[Trace], positions: Sequence[torch.Tensor], cfg: CaptureConfig
                  ) -> dict[str, list[torch.Tensor]]:
    """Run one padded batch; returns hook -> per-trace ``[n_selected, d]`` tensors on the host."""
    pad = handle.tokenizer.pad_token_id or 0
    width = max(len(t.token_ids) for t in traces)
    ids = torch.full((len(traces), width), pad, dtype=torch.long)
    mask = torch.zeros((len(traces), width), dtype=torch.long)
    rows, cols, offs, lens = [], [], [], []
    for b, (t, pos) in enumerate(zip(traces, positions)):
        n = len(t.token_ids)
        off = width - n if cfg.padding_side == "left" else 0
        ids[b, off : off + n] = torch.tensor(t.token_ids)
        mask[b, off : off + n] = 1
        rows.append(torch.full_like(pos, b))
        cols.append(pos + off)
        offs.append(torch.full_like(pos, off))
        lens.append(torch.full_like(pos, n))
    dev = handle.device
    index = (torch.cat(rows).to(dev), torch.cat(cols).to(dev))
    key_len = cfg.extra.get("pattern_keys", width)
    k = torch.arange(key_len)
    keys = (torch.cat(offs)[:, None] + k).clamp(max=width - 1)
    key_ok = k < torch.cat(lens)[:, None]
    g = handle.geometry
    last = max((parse_hook(h, g.n_layers) for h in cfg.hooks), key=lambda p: p.sort_key).name
    stop = last if (cfg.stop_early and handle.backend == "hf") else None
    gather = _Gatherer(cfg.hooks, index, STORAGE_DTYPES[cfg.dtype], stop, keys.to(dev), key_ok.to(dev))
    with torch.inference_mode():
        try:
            handle.run(ids, mask, hooks=gather.fns)
        except _Stop:
            pass
    flat = gather.result()
    counts = [len(p) for p in positions]
    return {h: list(torch.split(flat[h].cpu(), counts)) for h in cfg.hooks}


def _capture_shard(handle, traces: list[Trace], positions: list[torch.Tensor], cfg: CaptureConfig,
                   budget: int) -> tuple[dict[str, list[torch.Tensor]], int]:
    """Capture all traces of a shard, halving the token budget on out-of-memory."""
    per_trace: dict[str, list[torch.Tensor | None]] = {h: [None] * len(traces) for h in cfg.hooks}
    pending = length_batches([len(t.token_ids) for t in traces], budget)
    while pending:
        batch = pending.pop(0)
        try:
            got = capture_batch(handle, [traces[i] for i in batch], [positions[i] for i in batch], cfg)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is retried, on smaller batches
            if not _is_oom(e) or len(batch) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            budget = max(1, budget // 2)
            lengths = [len(traces[i].token_ids) for i in batch]
            pending = [[batch[j] for j in sub] for sub in length_batches(lengths, budget)] + pending
            continue
        for h in cfg.hooks:
            for i, x in zip(batch, got[h]):
                per_trace[h][i] = x
    return per_trace, budget  # type: ignore[return-value]


def prepare_traces(handle, traces: Sequence[Trace]) -> list[Trace]:
    """Fill missing ``token_ids``/segments by tokenizing each trace's full text."""
    from .traces.segment import segment_trace

    return [t if t.token_ids else segment_trace(t, handle.tokenizer) for t in traces]


def hook_widths(handle, hooks: Sequence[str], key_len: int) -> dict[str, int]:
    """Stored row width of each hook; a pattern row is ``n_heads * key_len`` (keys zero-padded)."""
    g = handle.geometry
    widths = {}
    for h in hooks:
        point = parse_hook(h, g.n_layers)
        if h.endswith("hook_pattern"):
            widths[h] = g.n_heads * key_len
        else:
            widths[h] = g.n_heads * g.head_dim if point.spec.module.endswith("o_proj") else g.d_model
    return widths


def capture(
    handle,
    traces: Sequence[Trace],
    cfg: CaptureConfig,
    out: str,
    shards: Sequence[int] | None = None,
    finalize: bool = True,
    progress: bool = False,
) -> ActivationStore:
    """Capture ``cfg.hooks`` at ``cfg.positions`` over ``traces`` into the store at ``out``.

    Resumes an interrupted job (same model weights, hooks, rule, dtype and traces); refuses a
    store made by another job. ``shards`` restricts work to some shard indices (distributed workers).
    """
    if cfg.dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {cfg.dtype!r}; choose one of {sorted(STORAGE_DTYPES)}")
    traces = prepare_traces(handle, traces)
    key_len = max(len(t.token_ids) for t in traces)
    cfg = replace(cfg, extra={**cfg.extra, "pattern_keys": key_len})
    widths = hook_widths(handle, cfg.hooks, key_len)
    positions = [select_positions(t, cfg.positions) for t in traces]
    if sum(len(p) for p in positions) == 0:
        raise ValueError(f"position rule {cfg.positions!r} selects no token in these {len(traces)} traces "
                         "(e.g. 'think' on traces without a thinking span); choose another --positions")
    manifest = StoreManifest(
        model_id=handle.source, weight_hash=handle.weight_hash, hooks=widths, positions=cfg.positions,
        dtype=cfg.dtype, trace_ids=[t.id for t in traces], shard_size=cfg.shard_size,
        extra={"padding_side": cfg.padding_side, **cfg.extra},
    )
    store = ActivationStore.create(out, manifest, resume=True)
    done = set(store.completed_shards())
    todo = [s for s in (shards if shards is not None else range(store.n_shards)) if s not in done]
    if progress:
        from tqdm import tqdm

        todo = tqdm(todo, desc="capture", unit="shard")
    budget = cfg.token_budget
    for s in todo:
        lo, hi = s * cfg.shard_size, min(len(traces), (s + 1) * cfg.shard_size)
        per_trace, budget = _capture_shard(handle, traces[lo:hi], positions[lo:hi], cfg, budget)
        rows = {
            "trace": torch.cat([torch.full_like(positions[i], i) for i in range(lo, hi)]),
            "position": torch.cat(positions[lo:hi]),
            "token_id": torch.cat([torch.tensor(traces[i].token_ids, dtype=torch.long)[positions[i]]
                                   for i in range(lo, hi)]),
            "segment": torch.cat([segment_of(traces[i], positions[i]) for i in range(lo, hi)]),
        }
        acts = {h: torch.cat(per_trace[h]) for h in cfg.hooks}
        store.write_shard(s, acts, rows)
    if finalize and shards is None:
        store.finalize()
    return store
