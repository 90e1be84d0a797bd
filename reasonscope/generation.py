"""One generation engine for every stage: continuous batching over a slot KV cache, hooks active throughout.

``generate(handle, prompts, cfg, hooks=..., on_token=...)`` decodes up to ``cfg.batch_size`` requests at
once. Each batch row (a *slot*) owns one sequence of a preallocated KV cache; when a row ends (EOS, a stop
string, ``max_new_tokens``) its slot is refilled with a waiting prompt, so decode steps are not spent on
finished rows. Waiting prompts are prefilled in groups into free slots (left-padded within the group); per-row
position ids and a per-row attention mask make every row equal to its unbatched self. With SDPA attention on CPU, a
decode step splits its rows into :data:`SPAN_GROUPS` runs, each attending over its own longest sequence only, and
slots are renumbered longest sequence first after a refill (when that cuts the keys read by 10%), so short rows do
not read long rows' keys (the attention implementation is swapped for the call and restored on exit).

Prompts that share long prefixes (``DecodeConfig.share_prefixes``) compute them once: each member of a group copies
the keys and values of its group's longest prompt into its slot and runs only its own remaining tokens.

Hooks (``{hook_name: fn(tensor) -> tensor | None}``, as in ``ModelHandle.run``) run on the HF module during
prefill and every decode step, and are removed when generation ends or raises. Per-request parameters (a
steering strength, a gate set) are looked up through :func:`current_batch`: ``values[current_batch().rows]``
gives each batch row the value of the request it serves.

A *companion* model (same tokenizer) can decode the same tokens in lockstep over its own slot cache, with its own
hooks; ``on_token`` sees its logits (``Batch.companion_logits``) beside the model's. ``on_token`` may also
*re-run* the current pass for some rows (``Batch.rerun``) after changing per-request state its hooks read: the
model's logits for those rows come back and their keys and values replace the first run's in the cache (e.g.
steer only where two models disagree, keeping the steered position in the cache).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from transformers.cache_utils import Cache

from .hooks import HookFn, attach, expand_hooks, may_keep_tensors
from .models import cache_kwargs

_MASK64 = (1 << 64) - 1
_CURRENT: ContextVar[Batch | None] = ContextVar("reasonscope_generation_batch", default=None)
# decode steps of an SDPA model: (first row, end row, key span) of each group of batch rows, see _sliced_sdpa
_SPANS: ContextVar[tuple[tuple[int, int, int], ...] | None] = ContextVar("reasonscope_key_spans", default=None)
SLICED_SDPA = "reasonscope_sliced_sdpa"
SHARED_MIN = 16  # leading tokens a prompt must share with its group's root for share_prefixes (and half its length)
SPAN_GROUPS = 4  # row groups of a decode step (slots sorted by length, so that short rows skip long rows' keys)


@dataclass(frozen=True)
class DecodeConfig:
    """Length, stopping, sampling (temperature 0 = greedy) and batching of one :func:`generate` call."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0  # sampling: request i's token t draws from a stream fixed by (seed, i, t) (generate's streams)
    stop: tuple[str, ...] = ()  # end a row once its generated text contains one of these
    eos_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's and generation_config's EOS
    batch_size: int = 32  # rows decoded together; KV memory: batch_size x the longest sequence so far, rounded up
    # by doubling (at most batch_size x (longest prompt + max_new_tokens) tokens)
    refill: int | None = None  # prefill waiting prompts once this many slots are free; None: batch_size // 8
    prefill_tokens: int = 16384  # token budget (rows x padded length) of one prefill forward pass
    share_prefixes: bool = False  # prompts sharing >= SHARED_MIN leading tokens compute them once (see generate)

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)  # one string, not its characters
        object.__setattr__(self, "stop", stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        for name in ("batch_size", "prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.refill is not None and self.refill < 1:
            raise ValueError(f"refill must be >= 1 (or None: batch_size // 8), got {self.refill}")


@dataclass
class Completion:
    """One request's result: its prompt ids, the generated ids (ending with the EOS or stop token) and why."""

    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"


@dataclass(frozen=True)
class Batch:
    """The running forward pass as hooks and ``on_token`` see it (tensors on the model's device)."""

    rows: torch.Tensor  # [batch] request index each row serves; -1 = idle row (its output is discarded)
    positions: torch.Tensor  # [batch, pos] position of each input token in its request's sequence; -1 = padding
    n_generated: torch.Tensor  # [batch] tokens each row had generated before this pass
    prefill: bool  # True: prompts of newly admitted requests; False: one decode step
    requests: int  # requests of the generate call (rows index 0..requests-1): per-request state checks on the host
    companion_logits: torch.Tensor | None = None  # [batch, vocab] float32 of the companion model (in on_token)
    shared_by: tuple[int, ...] = ()  # share_prefixes root pass: the requests that reuse its keys and values
    _rerun: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    _keys: Callable[[], torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def key_positions(self) -> torch.Tensor:
        """``[batch, keys]``: the position in its request's sequence of each key column of this pass's attention
        (what ``attn.hook_pattern``'s last dim indexes: cache columns, shifted by a row's left padding); -1 = no real
        token. Call it during the pass (in a hook or ``on_token``). A prefill's keys are its input columns (a
        shared-prefix member's: its cache columns)."""
        return self.positions if self._keys is None else self._keys()

    def rerun(self, rows: torch.Tensor) -> torch.Tensor:
        """Run this pass again for batch rows ``rows`` (distinct indices into this batch) on the model, hooks active.

        Only inside the ``on_token`` call of this pass. During the re-run :func:`current_batch` is the sub-batch of
        those rows (``rows`` = their requests). Their keys and values replace those of the earlier run (a prefill
        re-runs the whole prompt); the companion is not re-run. Returns float32 last-position logits
        ``[len(rows), vocab]``.
        """
        if self._rerun is None:
            raise RuntimeError("this Batch cannot be re-run: only the batch given to on_token can")
        return self._rerun(rows)


OnToken = Callable[[Batch, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def current_batch() -> Batch | None:
    """The batch of the forward pass :func:`generate` is running (None outside generation)."""
    return _CURRENT.get()


@contextmanager
def running(batch: Batch) -> Iterator[None]:
    """Make ``batch`` the :func:`current_batch` inside the block, as during a pass of :func:`generate` (the
    engine's own passes; also for calling hooks outside the engine, e.g. to test or time them)."""
    token = _CURRENT.set(batch)
    try:
        yield
    finally:
        _CURRENT.reset(token)


class SlotCache(Cache):
    """KV cache of ``slots`` sequences, ``[slots, kv_heads, size, head_dim]`` per layer (allocated on first write).

    ``reserve(n)`` makes room for positions ``0..n-1``: ``size`` at least doubles when it grows, up to ``capacity``,
    so memory follows the longest sequence rather than the longest one possible (a few copies in all).

    After ``prefill(slots)`` a forward pass writes its prompts at positions ``0..T`` of those slots and attends
    among them only; after ``decode(positions, length)`` it writes one token per slot at that slot's position and
    attends over every slot's first ``length`` positions (the caller's mask says which of them are real);
    ``decode(positions, length, slots)`` does the same for the given slots only (one batch row per slot);
    ``extend(slots, positions, length)`` writes row ``i``'s tokens at ``positions[i]`` (one per input column) of
    ``slots[i]`` and attends over its first ``length`` positions, which ``load`` may have filled from another pass.
    """

    def __init__(self, slots: int, capacity: int):
        super().__init__(layers=[])
        self.slots, self.capacity = slots, capacity
        self.size = 0  # positions allocated (or to allocate) per slot
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._slots: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None  # decode: the slot of each batch row
        self._all = False  # decode: row i is slot i, every slot (the KV returned is a view, not a copy)
        self._length = 0

    def reserve(self, length: int) -> None:
        if length <= self.size:
            return
        if length > self.capacity:
            raise ValueError(f"{length} positions asked of a slot cache of capacity {self.capacity}")
        new = min(self.capacity, max(length, 2 * self.size))

        def grow(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], new - t.shape[2], t.shape[3])], 2)

        self.keys, self.values = [grow(k) for k in self.keys], [grow(v) for v in self.values]
        self.size = new

    def prefill(self, slots: torch.Tensor) -> None:
        self._slots, self._positions, self._length = slots, None, 0  # a prefill starts at position 0

    def decode(self, positions: torch.Tensor, length: int, slots: torch.Tensor | None = None) -> None:
        if slots is not None:
            self._rows, self._all = slots, False
        elif not self._all or self._rows is None or len(self._rows) != len(positions):
            self._rows, self._all = torch.arange(len(positions), device=positions.device), True
        self._slots, self._positions, self._length = None, positions, length

    def extend(self, slots: torch.Tensor, positions: torch.Tensor, length: int) -> None:
        self._slots, self._rows, self._positions, self._length, self._all = None, slots, positions, length, False

    def load(self, slot: int, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> None:
        """Copy positions ``0..length-1`` of a one-sequence cache's ``keys``/``values`` into ``slot``."""
        for buf, src in ((self.keys, keys), (self.values, values)):
            if not buf:
                buf.extend(x.new_zeros(self.slots, x.shape[1], self.size, x.shape[3]) for x in src)
            for t, x in zip(buf, src):
                t[slot, :, :length] = x[0, :, :length].to(t.device)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            for buf, x in ((self.keys, key_states), (self.values, value_states)):
                buf.append(x.new_zeros(self.slots, x.shape[1], self.size, x.shape[3]))  # zeros: never NaN
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self._slots is not None:
            n, slots = key_states.shape[2], self._slots.to(k.device)  # a no-op unless layers span devices
            k[slots, :, :n] = key_states
            v[slots, :, :n] = value_states
            return key_states, value_states
        rows, positions = self._rows.to(k.device), self._positions.to(k.device)  # type: ignore[union-attr]
        if positions.dim() == 2:  # extend: [rows, columns] of write positions
            k[rows[:, None], :, positions] = key_states.transpose(1, 2)
            v[rows[:, None], :, positions] = value_states.transpose(1, 2)
            return k[rows, :, : self._length], v[rows, :, : self._length]
        k[rows, :, positions] = key_states[:, :, 0]
        v[rows, :, positions] = value_states[:, :, 0]
        if self._all:
            return k[:, :, : self._length], v[:, :, : self._length]
        return k[rows, :, : self._length], v[rows, :, : self._length]

    def keep(self, slots: torch.Tensor, length: int) -> None:
        """Keep ``slots`` (renumbered in that order), drop the rest; positions ``0..length-1`` move with their slot.

        Later positions keep stale (finite) values that no mask lets a row attend to. Copies ``length`` positions
        per layer, in place.
        """
        for buf in (self.keys, self.values):
            for i, t in enumerate(buf):
                idx = slots.to(t.device)
                t[: len(idx), :, :length] = t[:, :, :length].index_select(0, idx)
                buf[i] = t[: len(idx)]
        self.slots, self._rows, self._all = len(slots), None, False

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self._length

    # what HF's mask builder asks of a cache when a pass gives no mask (only an unpadded prefill does); transformers
    # 5.9 reads the query offset from get_seq_length instead (0 in a prefill too)
    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if self._positions is not None or self._slots is None:
            raise RuntimeError("SlotCache: only a prefill pass may leave the attention mask to the model")
        return query_length, 0


def sample(logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row of ``logits`` ``[rows, vocab]`` by inverse CDF at ``uniforms`` ``[rows]`` in [0, 1).

    Temperature scales the logits; ``top_p`` < 1 keeps the smallest set of most likely tokens whose mass
    reaches ``top_p`` (nucleus sampling). A token of probability 0 is never drawn.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    cdf = probs.cumsum(-1)
    target = uniforms.to(cdf)[:, None] * cdf[:, -1:]
    # a uniform that rounds to 1 in float32 reaches past the total: take the last token of positive probability
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous())
    pick = torch.minimum(torch.searchsorted(cdf, target, right=True), last)
    return (order.gather(-1, pick) if order is not None else pick)[:, 0]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, request: int, step: int) -> float:
    """A uniform in [0, 1) fixed by (seed, request, step): the random draws do not depend on how rows are batched."""
    return (_splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ request) ^ step) >> 11) / 2**53


class _StopStrings:
    """Detects stop strings in a row's generated text, decoding only when the new token could complete one."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.window = 4 * max(len(s) for s in self.stops) + 1  # tokens; byte-level tokens may be < 1 char
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        last = {s[-1] for s in self.stops}
        self.candidates = {i for i, t in enumerate(texts) if "\ufffd" in t or any(c in t for c in last)}

    def hit(self, tokens: list[int]) -> bool:
        if tokens[-1] not in self.candidates:
            return False
        tail = self.tokenizer.decode(tokens[-self.window :])
        return any(s in tail for s in self.stops)


def _check_model(model: Any) -> str:
    """The attention implementation, refused where a 4D mask cannot express per-row lengths."""
    cfg = getattr(model.config, "text_config", model.config)
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl.startswith(("flash", "flex", "paged")):
        raise ValueError(
            f"generate passes 4D attention masks, which {impl!r} attention does not take: load the model with "
            "attn_implementation='sdpa' (or 'eager' to read attention patterns)"
        )
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(
            f"generate supports full-attention layers only, this model has {sorted(kinds)}; "
            "disable sliding windows in its config (use_sliding_window=False) to use it"
        )
    return impl


def _check_companion(handle: Any, companion: Any) -> None:
    """Refuse a companion that cannot read the model's token ids, or that lives on another device."""
    n, m = len(handle.tokenizer), len(companion.tokenizer)
    if n != m:
        raise ValueError(
            f"the companion's tokenizer has {m} tokens, the model's {n}: a companion reads the model's token ids, "
            "so it must share the model's tokenizer"
        )
    if torch.device(companion.device) != torch.device(handle.device):
        raise ValueError(
            f"the companion is on {companion.device}, the model on {handle.device}: load both on one device"
        )


def _sliced_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """HF's SDPA attention; in a decode step of :func:`generate`, run per group of rows over that group's key span.

    Row ``i`` attends to its first ``n`` keys only (the mask hides the rest), so cutting the keys at ``n`` changes
    nothing but the memory read: a decode step reads each group's span, not the longest row's for every row.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans = _SPANS.get()
    if spans is None or query.shape[2] != 1 or attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    parts = [
        sdpa_attention_forward(
            module, query[a:b], key[a:b, :, :n], value[a:b, :, :n], attention_mask[a:b, ..., :n], **kwargs
        )[0]
        for a, b, n in spans
    ]
    return torch.cat(parts), None


@contextmanager
def _sliced(model: Any) -> Iterator[bool]:
    """Run an SDPA ``model`` on CPU with :func:`_sliced_sdpa` in the block (restored on exit); yields whether it does.

    CPU only: there a decode step's attention is bound by reading keys, and the groups read fewer (organism eval
    1.11x at 128 slots). On CUDA one SDPA call over the longest span was faster (H100: 1.13x on the organism eval,
    4.0x on the 1.5B shape at 32 slots), the launches and shapes of four calls per layer costing more than the keys.
    """
    cfg = getattr(model.config, "text_config", model.config)
    if cfg._attn_implementation != "sdpa" or model.device.type != "cpu":
        yield False
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SLICED_SDPA, _sliced_sdpa)
    AttentionMaskInterface.register(SLICED_SDPA, sdpa_mask)
    cfg._attn_implementation = SLICED_SDPA
    try:
        yield True
    finally:
        cfg._attn_implementation = "sdpa"


def _span_groups(ends: list[int], groups: int) -> tuple[tuple[int, int, int], ...]:
    """Split rows into ``groups`` runs of consecutive rows, each with the largest ``ends`` of its rows as its span
    (runs of equal span merged)."""
    size = -(-len(ends) // groups)
    spans: list[tuple[int, int, int]] = []
    for a in range(0, len(ends), size):
        b, n = min(a + size, len(ends)), max(ends[a : a + size])
        if spans and spans[-1][2] == n:
            spans[-1] = (spans[-1][0], b, n)
        else:
            spans.append((a, b, n))
    return tuple(spans)


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (bisection on slice equality: C-speed comparisons)."""
    a, b = list(a), list(b)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _prefix_groups(prompts: Sequence[Sequence[int]], minimum: int) -> list[list[int]]:
    """Indices of ``prompts`` in groups, each led by its root (the group's longest prompt), groups longest root first.

    Longest prompt first, a prompt joins the root it shares the longest prefix with when that prefix is at least
    ``minimum`` tokens and half the prompt (so sharing saves at least half of its prefill); otherwise it is a new root.
    The best root is a neighbour in the roots' lexicographic order, found by bisection.
    """
    roots: list[tuple[list[int], int]] = []  # (prompt, group index), sorted
    groups: list[list[int]] = []
    for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
        p = list(prompts[i])
        at = bisect.bisect(roots, (p, -1))
        near = [roots[j] for j in (at - 1, at) if 0 <= j < len(roots)]
        best = max(near, key=lambda r: _common(p, r[0]), default=None)
        if best is not None and _common(p, best[0]) >= max(minimum, len(p) / 2):
            groups[best[1]].append(i)
        else:
            bisect.insort(roots, (p, len(groups)))
            groups.append([i])
    return groups


class _Engine:
    """The state of one :func:`generate` call: slots, the waiting queue, and finished completions."""

    def __init__(
        self,
        handle: Any,
        prompts: list[list[int]],
        cfg: DecodeConfig,
        on_token: OnToken | None,
        progress: bool,
        companion: Any = None,
        streams: Sequence[tuple[int, int]] | None = None,
    ):
        tok, self.model, self.cfg, self.on_token = handle.tokenizer, handle.decoder(), cfg, on_token
        self.impl = _check_model(self.model)
        self.device = handle.device
        self.running: str | None = None  # "model" | "companion": whose pass runs (the other's hooks stay idle)
        self.passes = 0  # forward passes so far; a Batch may re-run only while on_token handles its pass
        self.live = -1
        self.prompts = prompts
        self.streams = list(streams) if streams is not None else [(i, 0) for i in range(len(prompts))]
        eos = cfg.eos_token_ids
        if eos is None:
            gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
            eos = tuple({tok.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None})
        self.eos = set(eos)
        self.pad = next(t for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None)
        self.stops = _StopStrings(tok, cfg.stop) if cfg.stop else None
        self.queue = deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))  # long first: short tail
        # share_prefixes: request r reads its first shared[r] tokens' keys and values from its group's root prompt
        # (the longest), computed once into stores[group] and dropped when the group's last request is admitted
        self.shared = [0] * len(prompts)
        self.group = [-1] * len(prompts)
        self.roots: list[int] = []
        self.waiting: list[int] = []  # requests of each group not admitted yet
        self.stores: dict[int, list[tuple[list[torch.Tensor], list[torch.Tensor]]]] = {}
        if cfg.share_prefixes:
            self.queue.clear()
            for members in _prefix_groups(prompts, SHARED_MIN):
                self.queue.extend(members)
                if len(members) == 1:
                    continue
                root = members[0]
                for r in members:
                    self.shared[r] = min(_common(prompts[r], prompts[root]), len(prompts[r]) - 1)
                    self.group[r] = len(self.roots)
                self.roots.append(root)
                self.waiting.append(len(members))
        self.width = min(cfg.batch_size, len(prompts))
        self.refill = cfg.refill or max(1, cfg.batch_size // 8)
        self.cache = SlotCache(self.width, max(map(len, prompts)) + cfg.max_new_tokens)
        self.caches = [self.cache]  # every slot operation applies to each
        self.models: dict[str, tuple[Any, str, SlotCache]] = {"model": (self.model, self.impl, self.cache)}
        if companion is not None:
            self.caches.append(SlotCache(self.width, self.cache.capacity))
            self.models["companion"] = (companion.model, _check_model(companion.model), self.caches[1])
        self.mask = torch.zeros(self.width, 0, dtype=torch.bool, device=self.device)  # [slot, position]: real keys
        self.req = [-1] * self.width  # request served by each slot (-1 idle)
        self.start = [0] * self.width  # first real position (left padding of its prefill group)
        self.length = [0] * self.width  # next write position
        self.next = [self.pad] * self.width  # next input token
        self.out: list[list[int]] = [[] for _ in range(self.width)]
        self.rows = torch.arange(self.width, device=self.device)
        self.done: list[Completion | None] = [None] * len(prompts)
        self.progress, self.bar = progress, None
        self.sliced = False  # the model runs _sliced_sdpa: decode steps sort slots by length and pass key spans
        self.unsorted = False  # a prefill admitted rows since the slots were last sorted

    def run(self) -> list[Completion]:
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=len(self.prompts), desc="generate", unit="seq")
        try:
            while self.queue or any(r >= 0 for r in self.req):
                free = [s for s, r in enumerate(self.req) if r < 0]
                if self.queue and (len(free) >= min(self.refill, len(self.queue)) or len(free) == self.width):
                    self._prefill(free)
                    continue
                if not self.queue and self.width - len(free) <= self.width // 2:
                    self._compact()
                self._decode()
        finally:
            if self.bar is not None:
                self.bar.close()
        return self.done  # type: ignore[return-value]

    def _uniform(self, request: int, step: int) -> float:
        key, start = self.streams[request]
        return uniform(self.cfg.seed, key, start + step)

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def guard(self, hooks: Mapping[str, HookFn] | None, companion: bool) -> dict[str, HookFn]:
        """``hooks`` for the model (or the companion), idle during the other model's passes (they may be one module)."""
        hooks = dict(hooks or {})
        if len(self.models) == 1:
            return hooks
        mine = "companion" if companion else "model"

        def only(fn: HookFn, x: torch.Tensor) -> torch.Tensor | None:
            return fn(x) if self.running == mine else None

        return {name: partial(only, fn) for name, fn in hooks.items()}

    def _run(
        self,
        who: str,
        ids: torch.Tensor,
        allowed: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: SlotCache | None = None,
    ) -> torch.Tensor:
        """Last-position logits of one pass; ``allowed`` None: unpadded prompts, causal (the model builds the mask,
        or with SDPA needs none)."""
        model, impl, own = self.models[who]
        cache = own if cache is None else cache
        mask = allowed
        # eager: an additive mask, as HF builds it for eager; sdpa and custom functions get bools
        if impl == "eager" and allowed is not None:
            dtype = model.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill_(
                ~allowed, torch.finfo(dtype).min
            )
        self.running = who
        try:
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **cache_kwargs(model, cache),
            )
        finally:
            self.running = None
        return out.logits[:, -1].float()

    def _forward(
        self,
        ids: torch.Tensor,
        allowed: torch.Tensor | None,
        position_ids: torch.Tensor,
        batch: Batch,
        slots: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Batch]:
        """One pass of the model (and the companion) over ``slots``; returns its logits and the batch for on_token.

        ``positions``: the cache position each row writes (decode, ``[rows]``) or each input column writes (extend,
        ``[rows, columns]``); None: a prefill.
        """
        self.passes += 1
        with running(batch):
            logits = self._run("model", ids, allowed, position_ids)
            companion = self._run("companion", ids, allowed, position_ids) if len(self.models) > 1 else None
        ctx = (self.passes, ids, allowed, position_ids, batch, slots, positions, logits.shape[-1])
        return logits, replace(batch, companion_logits=companion, _rerun=partial(self._rerun, ctx))

    def _rerun(self, ctx: tuple, rows: torch.Tensor) -> torch.Tensor:
        n, ids, allowed, position_ids, batch, slots, positions, vocab = ctx
        if n != self.live:
            raise RuntimeError("Batch.rerun works only inside the on_token call of its own pass")
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        if not len(rows):
            return torch.empty(0, vocab, device=self.device)
        if positions is None:
            self.cache.prefill(slots[rows])
        elif allowed is None:
            raise AssertionError("only a prefill runs without a mask")
        elif positions.dim() == 2:
            self.cache.extend(slots[rows], positions[rows], allowed.shape[-1])
        else:
            self.cache.decode(positions[rows], allowed.shape[-1], slots[rows])
        keys = batch.key_positions()[rows]
        sub = Batch(
            batch.rows[rows],
            batch.positions[rows],
            batch.n_generated[rows],
            batch.prefill,
            batch.requests,
            _keys=lambda: keys,
        )
        token, spans = _CURRENT.set(sub), _SPANS.set(None)  # any rows: the whole span
        try:
            return self._run("model", ids[rows], None if allowed is None else allowed[rows], position_ids[rows])
        finally:
            _SPANS.reset(spans)
            _CURRENT.reset(token)

    def _prefill(self, free: list[int]) -> None:
        """Admit waiting prompts (longest first) into free slots with one forward pass; choose their first token."""
        if self.shared[self.queue[0]]:
            self._extend(free)
            return
        width = len(self.prompts[self.queue[0]])
        n = max(1, min(len(free), len(self.queue), self.cfg.prefill_tokens // width))
        reqs: list[int] = []
        while len(reqs) < n and self.queue and not self.shared[self.queue[0]]:
            reqs.append(self.queue.popleft())
        n = len(reqs)
        slots = free[:n]
        pads = [width - len(self.prompts[r]) for r in reqs]
        ids = self._tensor([[self.pad] * p + self.prompts[r] for p, r in zip(pads, reqs)])
        real = self._tensor([[0] * p + [1] * (width - p) for p in pads]).bool()
        position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)
        allowed = None  # no padding: causal, and SDPA runs without a [rows, T, T] mask
        if any(pads):
            allowed = torch.ones(n, 1, width, width, dtype=torch.bool, device=self.device).tril_()
            allowed &= real[:, None, None, :]
            allowed.diagonal(dim1=-2, dim2=-1).fill_(True)  # padding attends to itself: never NaN
        slot_t = self._tensor(slots)
        self._reserve(width)
        for cache in self.caches:
            cache.prefill(slot_t)
        batch = Batch(
            rows=self._tensor(reqs),
            positions=position_ids.masked_fill(~real, -1),
            n_generated=torch.zeros(n, dtype=torch.long, device=self.device),
            prefill=True,
            requests=len(self.prompts),
        )
        logits, batch = self._forward(ids, allowed, position_ids, batch, slot_t)
        self.mask[slot_t] = False
        self.mask[slot_t, :width] = real
        for s, r, p in zip(slots, reqs, pads):
            self.req[s], self.start[s], self.length[s], self.out[s] = r, p, width, []
        self.unsorted = True
        self._accept(slots, logits, batch)

    def _extend(self, free: list[int]) -> None:
        """Admit waiting requests of prefix groups: copy each one's shared prefix from its group's store into its slot,
        then run the rest of its prompt (left-padded; padding columns write at the row's next free position, which
        nothing attends to before a decode step overwrites it) in one forward pass; choose their first token."""
        reqs: list[int] = []
        width = 0
        while self.queue and self.shared[self.queue[0]] and len(reqs) < len(free):
            r = self.queue[0]
            tail = len(self.prompts[r]) - self.shared[r]
            if reqs and (len(reqs) + 1) * max(width, tail) > self.cfg.prefill_tokens:
                break
            reqs.append(self.queue.popleft())
            width = max(width, tail)
        slots = free[: len(reqs)]
        starts = [self.shared[r] for r in reqs]
        ends = [len(self.prompts[r]) for r in reqs]
        self._reserve(max(ends) + 1)
        for s, r, m in zip(slots, reqs, starts):
            g = self.group[r]
            if g not in self.stores:
                self.stores[g] = self._root(g)
            for cache, (keys, values) in zip(self.caches, self.stores[g]):
                cache.load(s, keys, values, m)
            self.waiting[g] -= 1
            if not self.waiting[g]:
                del self.stores[g]
        pads = [width - (e - m) for m, e in zip(starts, ends)]
        ids = self._tensor([[self.pad] * p + self.prompts[r][m:] for p, r, m in zip(pads, reqs, starts)])
        column = torch.arange(width, device=self.device)
        pad_t, start_t, end_t = self._tensor(pads), self._tensor(starts), self._tensor(ends)
        real = column[None, :] >= pad_t[:, None]
        position_ids = torch.where(real, start_t[:, None] + column[None, :] - pad_t[:, None], 0)
        writes = torch.where(real, position_ids, end_t[:, None])
        key_at = torch.arange(max(ends), device=self.device)
        allowed = (key_at[None, None, :] <= position_ids[:, :, None]) & real[:, :, None]
        allowed[:, :, 0] |= ~real  # a padding column attends to position 0 only: never NaN, discarded
        slot_t = self._tensor(slots)
        for cache in self.caches:
            cache.extend(slot_t, writes, max(ends))
        batch = Batch(
            rows=self._tensor(reqs),
            positions=position_ids.masked_fill(~real, -1),
            n_generated=torch.zeros(len(reqs), dtype=torch.long, device=self.device),
            prefill=True,
            requests=len(self.prompts),
            _keys=lambda: torch.where(key_at[None] < end_t[:, None], key_at[None], -1),
        )
        logits, batch = self._forward(ids, allowed[:, None], position_ids, batch, slot_t, writes)
        self.mask[slot_t] = False
        for s, r, e in zip(slots, reqs, ends):
            self.mask[s, :e] = True
            self.req[s], self.start[s], self.length[s], self.out[s] = r, 0, e, []
        self.unsorted = True
        self._accept(slots, logits, batch)

    def _root(self, group: int) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Keys and values of ``group``'s root prompt, per cache (one forward pass; hooks see it as a prefill of the
        root's request)."""
        root = self.roots[group]
        n = len(self.prompts[root])
        ids = self._tensor([self.prompts[root]])
        positions = torch.arange(n, device=self.device)[None]
        zero = self._tensor([0])
        batch = Batch(
            rows=self._tensor([root]),
            positions=positions,
            n_generated=zero,
            prefill=True,
            requests=len(self.prompts),
            shared_by=tuple(r for r, g in enumerate(self.group) if g == group),
        )
        out = []
        with running(batch):
            for who in self.models:
                cache = SlotCache(1, n)
                cache.reserve(n)
                cache.prefill(zero)
                self._run(who, ids, None, positions, cache)
                out.append((cache.keys, cache.values))
        return out

    def _reserve(self, length: int) -> None:
        """Room for positions ``0..length-1`` of every slot, in each cache and in the mask."""
        for cache in self.caches:
            cache.reserve(length)
        extra = self.cache.size - self.mask.shape[1]
        if extra > 0:
            self.mask = torch.cat([self.mask, self.mask.new_zeros(self.width, extra)], 1)

    def _decode(self) -> None:
        """One decode step over every slot (idle ones compute discarded garbage)."""
        if self.sliced and self.unsorted:
            self._sort()
        ends = self._ends()
        span = max(ends)
        self._reserve(span)
        positions = self._tensor(self.length)
        self.mask[self.rows, positions] = True
        idle = torch.tensor([r < 0 for r in self.req], device=self.device)
        position_ids = self._tensor([ln - st for ln, st in zip(self.length, self.start)])[:, None]
        for cache in self.caches:
            cache.decode(positions, span)
        batch = Batch(
            rows=self._tensor(self.req),
            positions=position_ids.masked_fill(idle[:, None], -1),
            n_generated=self._tensor([len(o) for o in self.out]),
            prefill=False,
            requests=len(self.prompts),
            _keys=partial(self._decode_keys, span),
        )
        ids, allowed = self._tensor(self.next)[:, None], self.mask[:, None, None, :span]
        token = _SPANS.set(_span_groups(ends, SPAN_GROUPS) if self.sliced else None)
        try:
            logits, batch = self._forward(ids, allowed, position_ids, batch, self.rows, positions)
        finally:
            _SPANS.reset(token)
        for s, r in enumerate(self.req):
            self.length[s] += r >= 0
        self._accept(list(range(self.width)), logits, batch)

    def _decode_keys(self, span: int) -> torch.Tensor:
        """A decode step's :meth:`Batch.key_positions` (slot ``s``'s column ``c`` holds position ``c - start[s]``)."""
        column = torch.arange(span, device=self.device)[None] - self._tensor(self.start)[:, None]
        live = self._tensor(self.req)[:, None] >= 0  # an idle slot's column 0 is marked real only to avoid NaN
        return torch.where(self.mask[:, :span] & live, column, -1)

    def _accept(self, slots: list[int], logits: torch.Tensor, batch: Batch) -> None:
        """Choose the next token of each row of the pass (row i serves ``slots[i]``); retire finished rows."""
        cfg = self.cfg
        if cfg.temperature > 0:
            u = [self._uniform(self.req[s], len(self.out[s])) if self.req[s] >= 0 else 0.0 for s in slots]
            tokens = sample(logits, cfg.temperature, cfg.top_p, torch.tensor(u, device=self.device))
        else:
            tokens = logits.argmax(-1)
        if self.on_token is not None:
            self.live = self.passes
            try:
                forced = self.on_token(batch, tokens, logits)
            finally:
                self.live = -1
            tokens = tokens if forced is None else forced
        finished = []
        for s, t in zip(slots, tokens.tolist()):
            r = self.req[s]
            if r < 0:
                continue
            out = self.out[s]
            out.append(t)
            reason = (
                "eos"
                if t in self.eos
                else "stop"
                if self.stops is not None and self.stops.hit(out)
                else "length"
                if len(out) >= cfg.max_new_tokens
                else None
            )
            if reason is None:
                self.next[s] = t
                continue
            self.done[r] = Completion(self.prompts[r], out, reason)
            self.req[s], self.start[s], self.length[s], self.next[s] = -1, 0, 0, self.pad
            finished.append(s)
            if self.bar is not None:
                self.bar.update(1)
        if finished:  # an idle row attends to its slot's position 0 only (finite garbage, discarded)
            f = self._tensor(finished)
            self.mask[f] = False
            self.mask[f, 0] = True

    def _compact(self) -> None:
        """Drop idle slots once no prompt waits, so the tail of the run decodes a narrower batch."""
        self._keep([s for s, r in enumerate(self.req) if r >= 0])

    def _sort(self) -> None:
        """Renumber slots longest sequence first (idle last), so that each group of rows has a short key span.

        Only when that cuts the keys a step reads by 10% or more: the sort copies every slot's keys once, which the
        shorter spans of the steps until the next refill must repay.
        """
        ends = self._ends()
        order = sorted(range(self.width), key=lambda s: -ends[s])  # idle slots (end 1) last

        def read(e: list[int]) -> int:
            return sum((b - a) * n for a, b, n in _span_groups(e, SPAN_GROUPS))

        if read([ends[s] for s in order]) < 0.9 * read(ends):
            self._keep(order)
        self.unsorted = False

    def _ends(self) -> list[int]:
        """Keys each slot's next decode step attends to: its sequence and the new token (an idle slot: 1)."""
        return [ln + 1 if r >= 0 else 1 for ln, r in zip(self.length, self.req)]

    def _keep(self, live: list[int]) -> None:
        """Keep slots ``live`` (renumbered in that order), drop the rest."""
        idx = self._tensor(live)
        for cache in self.caches:
            cache.keep(idx, max(self.length[s] for s in live))
        self.mask = self.mask[idx]
        for name in ("req", "start", "length", "next", "out"):
            values = getattr(self, name)
            setattr(self, name, [values[s] for s in live])
        self.width = len(live)
        self.rows = torch.arange(self.width, device=self.device)


def generate(
    handle: Any,
    prompts: Sequence[str | Sequence[int]],
    cfg: DecodeConfig = DecodeConfig(),
    hooks: Mapping[str, HookFn] | None = None,
    on_token: OnToken | None = None,
    progress: bool = False,
    companion: Any = None,
    companion_hooks: Mapping[str, HookFn] | None = None,
    streams: Sequence[tuple[int, int]] | None = None,
) -> list[Completion]:
    """Generate a completion for each prompt (text, tokenized without special tokens, or token ids).

    ``hooks`` run during prefill and every decode step (see :func:`current_batch` for per-request state).
    ``on_token(batch, tokens, logits)`` is called after each token choice with the chosen ``tokens`` ``[batch]``
    and the float32 ``logits`` ``[batch, vocab]``; a returned tensor replaces ``tokens`` (e.g. force
    ``</think>`` on rows where a probe fired). Idle rows' entries are ignored. Output order = input order.
    It may call ``batch.rerun(rows)`` (see :meth:`Batch.rerun`).

    ``companion``: a second model handle (same tokenizer and device) that reads the same tokens in lockstep, with
    ``companion_hooks`` attached; its logits reach ``on_token`` as ``batch.companion_logits``. Each hook set fires
    in its own model's passes only (the two may be one module).

    ``cfg.share_prefixes``: a prompt that shares at least half its tokens (and :data:`SHARED_MIN`) with a longer one
    (one trace cut at many points, one prompt sampled many times) joins that prompt's group; the group's longest
    prompt runs once on its own and every member copies its shared keys and values from that run, then runs only its
    remaining tokens. Outputs equal
    the unshared run's (to float rounding). Hooks see the shared tokens once, in the root's pass (``Batch.rows`` = the
    root's request): per-request edits of the prompt need it off.

    ``streams``: when sampling, request ``i``'s ``t``-th token draws ``uniform(cfg.seed, key, start + t)`` for
    ``streams[i] = (key, start)``; the default ``(i, 0)``. A split run (or a continuation from a prefix of ``start``
    generated tokens) given the original streams draws exactly what the original run drew.
    """
    if cfg.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    if cfg.temperature > 0 and not 0 < cfg.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {cfg.top_p}")
    if isinstance(prompts, str) or any(isinstance(p, int) or getattr(p, "ndim", 1) == 0 for p in prompts):
        raise TypeError(
            "prompts must be a list of prompts, each a string or a list of token ids; "
            f"got a {'string' if isinstance(prompts, str) else 'flat list of ids'}: wrap it in a list"
        )
    tok = handle.tokenizer
    ids = [tok(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(map(int, p)) for p in prompts]
    if any(len(p) == 0 for p in ids):
        raise ValueError("empty prompt: every prompt needs at least one token (e.g. the chat template's BOS)")
    if not ids:
        return []
    if companion is None and companion_hooks:
        raise ValueError("companion_hooks were given without a companion model")
    if companion is not None:
        _check_companion(handle, companion)
    if streams is not None and len(streams) != len(ids):
        raise ValueError(f"{len(streams)} streams for {len(ids)} prompts; give one (key, start) per prompt")
    engine = _Engine(handle, ids, cfg, on_token, progress, companion, streams)
    g = handle.geometry
    # inference_mode skips autograd's bookkeeping (8% faster on the organism eval on CPU), but a tensor made under it
    # cannot enter autograd later (probe training on kept activations): only where no hook (hooks.may_keep_tensors),
    # callback, companion or custom attention function could keep one; elsewhere no_grad
    sealed = not hooks and on_token is None and companion is None and engine.impl in ("sdpa", "eager")
    grad_mode = torch.inference_mode() if sealed and not may_keep_tensors(handle.model) else torch.no_grad()
    with grad_mode, ExitStack() as stack:
        mine = engine.guard(expand_hooks(hooks or {}, g.n_layers), companion=False)
        stack.enter_context(attach(handle.model, mine, g.n_layers, g.n_heads))
        engine.sliced = stack.enter_context(_sliced(handle.model))
        if companion is not None:
            cg = companion.geometry
            theirs = engine.guard(expand_hooks(companion_hooks or {}, cg.n_layers), companion=True)
            stack.enter_context(attach(companion.model, theirs, cg.n_layers, cg.n_heads))
            stack.enter_context(_sliced(companion.model))
        return engine.run()
