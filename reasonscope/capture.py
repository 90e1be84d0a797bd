"""Activation capture: named hook points at chosen positions over a trace dataset, into a store.

The job is cut into shards of ``shard_size`` traces (in dataset order). Each shard is captured in
length-bucketed batches under a token budget, gathered *inside* the hooks (only the selected
positions leave the device), copied to pinned host memory on a side CUDA stream, and written as
one store shard. A re-run of the same job skips the shards already on disk, so a killed capture
resumes where it stopped and ends with the same bytes as a clean run.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .dtypes import DtypeName, dtype_name, torch_dtype
from .hooks import HookPoint, check_attention, parse_hook, select_hooks
from .identity import trace_digest
from .models import StopForward
from .store import PADDING_SIDES, POSITION_RULES, ActivationStore, PaddingSide, PositionRule, StoreManifest, StoreWriter
from .traces.record import Trace

if TYPE_CHECKING:  # pragma: no cover
    from .models import ModelHandle

LARGE_CAPTURE_BYTES = 4 << 30  # warn before a capture that will write more than this


class LargeCaptureWarning(UserWarning):
    """A capture is about to write more than :data:`LARGE_CAPTURE_BYTES`."""


@dataclass(frozen=True)
class CaptureConfig:
    """What to capture; validated on construction, so a typo is an error before any model runs.

    ``hooks`` takes hook names or the CLI's patterns (``blocks.*.hook_resid_post``, ``hook_resid_post``,
    ``blocks.2-5.attn.hook_z``, comma-separated or a list); they are resolved against the model by
    :func:`capture`. ``positions="spans"`` reads ``trace.meta["spans"]`` = ``[[start, end), ...]``.
    ``dtype`` is the storage dtype (aliases such as ``bf16`` accepted); ``token_budget`` bounds the
    padded tokens per forward batch; ``shard_size`` is traces per store shard; ``stop_early`` skips the
    layers after the last hooked one.
    """

    hooks: tuple[str, ...]
    positions: PositionRule = "think"
    dtype: DtypeName = "float32"
    token_budget: int = 8192
    shard_size: int = 64
    padding_side: PaddingSide = "left"
    stop_early: bool = True

    def __post_init__(self) -> None:
        hooks = (self.hooks,) if isinstance(self.hooks, str) else tuple(self.hooks)
        hooks = tuple(p.strip() for h in hooks for p in (h.split(",") if isinstance(h, str) else [h]))
        if not hooks or not all(isinstance(h, str) and h for h in hooks):
            raise ValueError(f"hooks must name at least one hook (names or patterns), got {self.hooks!r}")
        object.__setattr__(self, "hooks", hooks)
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.positions not in POSITION_RULES:
            raise ValueError(f"unknown position rule {self.positions!r}; choose one of {', '.join(POSITION_RULES)}")
        if self.padding_side not in PADDING_SIDES:
            raise ValueError(f"unknown padding side {self.padding_side!r}; choose one of {', '.join(PADDING_SIDES)}")
        for name in ("token_budget", "shard_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")


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
        pos = [p for a, b in trace.meta.get("spans", []) for p in range(a, b)]
    else:
        raise ValueError(f"unknown position rule {rule!r}; choose one of {POSITION_RULES}")
    pos = sorted(set(pos))  # segments given out of order (a JSONL) still give sorted, unique positions
    if pos and not (pos[0] >= 0 and pos[-1] < n):
        bad = pos[0] if pos[0] < 0 else pos[-1]
        raise ValueError(
            f"trace {trace.id!r}: rule {rule!r} selects position {bad}, outside its {n} tokens; check its segments "
            "or spans against its token_ids (or drop token_ids, think_span and segments to re-tokenize it)"
        )
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


class _Gatherer:
    """Hook callbacks that keep only the selected rows and ship them to host memory."""

    def __init__(
        self,
        points: list[HookPoint],
        index: tuple[torch.Tensor, torch.Tensor],
        dtype: torch.dtype,
        stop_early: bool,
        keys: torch.Tensor,
        key_ok: torch.Tensor,
    ) -> None:
        self.index, self.dtype, self.stop_early = index, dtype, stop_early  # stop the pass once all are gathered
        self.keys, self.key_ok = keys, key_ok  # per row: padded column of each trace key position, validity
        self.out: dict[str, torch.Tensor] = {}
        cuda = index[0].is_cuda
        self.stream = torch.cuda.Stream(device=index[0].device) if cuda else None
        self.fns = {p.name: self._make(p) for p in points}

    def _make(self, point: HookPoint) -> Callable[[torch.Tensor], None]:
        name = point.name

        def fn(x: torch.Tensor) -> None:
            if point.spec.per_key:  # [b, h, q, k] -> [rows, h * key_len] in trace coordinates
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
            if self.stop_early and len(self.out) == len(self.fns):  # every point gathered, in any firing order
                raise StopForward

        return fn

    def result(self) -> dict[str, torch.Tensor]:
        if self.stream is not None:
            self.stream.synchronize()
        return self.out


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def capture_batch(
    handle: ModelHandle,
    traces: Sequence[Trace],
    positions: Sequence[torch.Tensor],
    cfg: CaptureConfig,
    key_len: int | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Run one padded batch; returns hook -> per-trace ``[n_selected, d]`` tensors on the host.

    Attention-pattern rows hold ``key_len`` keys per head (default: this batch's longest trace).
    """
    g = handle.geometry
    points = [parse_hook(n, g.n_layers) for n in select_hooks(cfg.hooks, g.n_layers)]
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
    k = torch.arange(key_len or width)
    keys = (torch.cat(offs)[:, None] + k).clamp(max=width - 1)
    key_ok = k < torch.cat(lens)[:, None]
    gather = _Gatherer(points, index, torch_dtype(cfg.dtype), cfg.stop_early, keys.to(dev), key_ok.to(dev))
    with torch.inference_mode(), contextlib.suppress(StopForward):
        handle.run(ids, mask, hooks=gather.fns)
    flat = gather.result()
    counts = [len(p) for p in positions]
    return {p.name: list(torch.split(flat[p.name].cpu(), counts)) for p in points}


def _capture_shard(
    handle: ModelHandle,
    traces: list[Trace],
    positions: list[torch.Tensor],
    cfg: CaptureConfig,
    budget: int,
    key_len: int,
) -> tuple[dict[str, list[torch.Tensor]], int]:
    """Capture all traces of a shard, halving the token budget on out-of-memory."""
    per_trace: dict[str, list[torch.Tensor]] = {}
    pending = length_batches([len(t.token_ids) for t in traces], budget)
    while pending:
        batch = pending.pop(0)
        try:
            got = capture_batch(handle, [traces[i] for i in batch], [positions[i] for i in batch], cfg, key_len)
        except Exception as e:
            if not _is_oom(e) or len(batch) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            budget = max(1, budget // 2)
            lengths = [len(traces[i].token_ids) for i in batch]
            pending = [[batch[j] for j in sub] for sub in length_batches(lengths, budget)] + pending
            continue
        for h, xs in got.items():
            slots = per_trace.setdefault(h, [torch.empty(0)] * len(traces))
            for i, x in zip(batch, xs):
                slots[i] = x
    return per_trace, budget


def prepare_traces(handle: ModelHandle, traces: Sequence[Trace]) -> list[Trace]:
    """Fill missing ``token_ids``/segments by tokenizing each trace's full text."""
    from .traces.segment import segment_trace

    return [t if t.token_ids else segment_trace(t, handle.tokenizer) for t in traces]


def check_traces(handle: ModelHandle, traces: Sequence[Trace]) -> None:
    """Refuse traces this model cannot run: none at all, empty, ids outside its vocabulary or from another tokenizer
    (no ``</think>`` where the thinking ends), longer than its context."""
    if not traces:
        raise ValueError(
            "no traces to capture: the traces list (or file) is empty; pass a file with at least one trace"
        )
    vocab = int(handle.model.get_input_embeddings().num_embeddings)
    think_end = handle.think_ids[1]
    context = getattr(getattr(handle.model.config, "text_config", handle.model.config), "max_position_embeddings", None)
    problems: list[str] = []
    for t in traces:
        ids = t.token_ids
        if not ids:
            problems.append(f"trace {t.id!r} has no tokens (empty prompt, thinking and answer)")
        elif bad := [(i, x) for i, x in enumerate(ids) if not 0 <= x < vocab]:
            problems.append(
                f"trace {t.id!r} has token id {bad[0][1]} at position {bad[0][0]} (and {len(bad) - 1} "
                f"more) outside this model's vocabulary of {vocab} ids; were its token ids made by "
                "another tokenizer? drop token_ids from the file to re-tokenize with this model"
            )
        elif (
            think_end is not None
            and t.think_span is not None
            and t.think_span[1] < len(ids)
            and ids[t.think_span[1]] != think_end
        ):
            problems.append(
                f"trace {t.id!r} has token id {ids[t.think_span[1]]} where its thinking ends (position "
                f"{t.think_span[1]}), not this model's </think> ({think_end}); were its token ids made by another "
                "tokenizer? drop token_ids and think_span from the file to re-tokenize with this model"
            )
        elif context is not None and len(ids) > context:
            problems.append(
                f"trace {t.id!r} has {len(ids)} tokens, longer than this model's context of {context}; "
                "drop or shorten it"
            )
    if problems:
        more = f" (and {len(problems) - 3} more traces)" if len(problems) > 3 else ""
        raise ValueError("; ".join(problems[:3]) + more)


def hook_widths(handle: ModelHandle, hooks: Sequence[str], key_len: int) -> dict[str, int]:
    """Stored row width of each hook name; a pattern row is ``n_heads * key_len`` (keys zero-padded)."""
    g = handle.geometry
    widths = {}
    for h in hooks:
        spec = parse_hook(h, g.n_layers).spec
        widths[h] = spec.width(g, key_len if spec.per_key else None)
    return widths


def _shard_rows(
    traces: Sequence[Trace], positions: Sequence[torch.Tensor], lo: int, hi: int
) -> dict[str, torch.Tensor]:
    return {
        "trace": torch.cat([torch.full_like(positions[i], i) for i in range(lo, hi)]),
        "position": torch.cat(list(positions[lo:hi])),
        "token_id": torch.cat(
            [torch.tensor(traces[i].token_ids, dtype=torch.long)[positions[i]] for i in range(lo, hi)]
        ),
        "segment": torch.cat([segment_of(traces[i], positions[i]) for i in range(lo, hi)]),
    }


def _warn_if_large(n_rows: int, widths: dict[str, int], dtype: DtypeName, out: str) -> None:
    size = n_rows * (sum(widths.values()) * torch_dtype(dtype).itemsize + 8 * 4)
    if size > LARGE_CAPTURE_BYTES:
        warnings.warn(
            f"this capture will write about {size / 2**30:.1f} GiB to {out} ({n_rows} rows x "
            f"{sum(widths.values())} values, {dtype}); narrow --hooks or --positions, or use bfloat16, "
            "if that is more than intended",
            LargeCaptureWarning,
            stacklevel=3,
        )


def capture(
    handle: ModelHandle,
    traces: Sequence[Trace],
    cfg: CaptureConfig,
    out: str,
    shards: Sequence[int] | None = None,
    finalize: bool = True,
    progress: bool = True,
    estimate_all: bool = False,
) -> ActivationStore:
    """Capture ``cfg.hooks`` at ``cfg.positions`` over ``traces`` into the store at ``out``.

    Every input is checked before anything is written. Resumes an interrupted job with the same
    content (weights, hooks, rule, dtype, traces), whatever path or backend the model came from;
    refuses a store made by another job, naming what differs. ``shards`` restricts work to some
    shard indices (distributed workers); ``progress`` shows a bar over traces; ``estimate_all``: the size warning
    covers every shard not yet written, not only ``shards`` (a distributed job's driver, which writes none).
    """
    g = handle.geometry
    names = select_hooks(cfg.hooks, g.n_layers)
    check_attention(names, handle.attn_implementation)
    traces = prepare_traces(handle, traces)
    check_traces(handle, traces)
    key_len = max(len(t.token_ids) for t in traces)
    widths = hook_widths(handle, names, key_len)
    per_key = any(parse_hook(n, g.n_layers).spec.per_key for n in names)
    positions = [select_positions(t, cfg.positions) for t in traces]
    if sum(len(p) for p in positions) == 0:
        raise ValueError(
            f"position rule {cfg.positions!r} selects no token in these {len(traces)} traces "
            "(e.g. 'think' on traces without a thinking span); choose another --positions"
        )
    manifest = StoreManifest(
        weight_hash=handle.weight_hash,
        hooks=widths,
        positions=cfg.positions,
        dtype=cfg.dtype,
        trace_ids=[t.id for t in traces],
        shard_size=cfg.shard_size,
        trace_hashes=[trace_digest(t) for t in traces],
        padding_side=cfg.padding_side,
        pattern_keys=key_len if per_key else None,
        model_id=handle.source,
        backend=handle.backend,
    )
    store = StoreWriter.create(out, manifest, resume=True)
    done = set(store.completed_shards())
    todo = [s for s in (shards if shards is not None else range(store.n_shards)) if s not in done]

    def span(s: int) -> range:
        return range(s * cfg.shard_size, min(len(traces), (s + 1) * cfg.shard_size))

    left = [s for s in range(store.n_shards) if s not in done] if estimate_all else todo
    _warn_if_large(sum(len(positions[i]) for s in left for i in span(s)), widths, cfg.dtype, out)
    ranges = [(span(s).start, span(s).stop) for s in todo]
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(hi - lo for lo, hi in ranges), desc="capture", unit="trace", disable=not progress)
    budget = cfg.token_budget
    with bar:
        for s, (lo, hi) in zip(todo, ranges):
            per_trace, budget = _capture_shard(handle, traces[lo:hi], positions[lo:hi], cfg, budget, key_len)
            store.write_shard(s, {h: torch.cat(per_trace[h]) for h in names}, _shard_rows(traces, positions, lo, hi))
            bar.update(hi - lo)
    if finalize and shards is None:
        return store.finalize()
    return ActivationStore.open(out, allow_incomplete=True)
