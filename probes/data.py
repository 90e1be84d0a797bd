"""Labelled activations: a store's rows joined with a label table by (trace, token position), split by problem.

Rows stream from the store in storage order, every selected hook of a read batch together (``[L, b, d]``); only
labelled rows are kept, and passes are cached in memory when they fit ``cache_bytes``. The split is by problem
(no problem on both sides); the control labels are the task labels permuted within each problem.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from reasonscope.hooks import select_hooks
from reasonscope.store import ActivationStore

from .labels import LabelTable

TRAIN, VAL, TEST = 0, 1, 2


def store_hooks(store: ActivationStore, patterns: str) -> list[str]:
    """Hooks of ``store`` selected by ``patterns``; all must have the same width and have been captured."""
    have = store.manifest.hooks
    layers = [int(h.split(".")[1]) for h in have if h.startswith("blocks.")]
    chosen = select_hooks(patterns, max(layers) + 1 if layers else 1)
    missing = [h for h in chosen if h not in have]
    if missing:
        raise ValueError(f"hooks {missing[:4]} are not in the store at {store.path}; it has {sorted(have)}")
    widths = {have[h] for h in chosen}
    if len(widths) > 1:
        raise ValueError(f"hooks {chosen} have different widths {sorted(widths)}; fit one hook kind at a time")
    return chosen


def split_problems(problems: Sequence[str], test_fraction: float, val_fraction: float, seed: int) -> dict[str, int]:
    """Problem -> TRAIN/VAL/TEST, a seeded permutation of the sorted problems (each side gets at least one)."""
    uniq = sorted(set(problems))
    if len(uniq) < 3:
        raise ValueError(f"only {len(uniq)} problem(s): a problem-grouped train/val/test split needs at least 3")
    order = torch.randperm(len(uniq), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = max(1, round(test_fraction * len(uniq)))
    n_val = max(1, round(val_fraction * (len(uniq) - n_test)))
    if n_test + n_val >= len(uniq):
        raise ValueError(f"{len(uniq)} problems leave none to train on; lower test_fraction/val_fraction")
    side = {}
    for rank, i in enumerate(order):
        side[uniq[i]] = TEST if rank < n_test else VAL if rank < n_test + n_val else TRAIN
    return side


@dataclass
class Labelled:
    """Labelled store rows: ``row`` (store row), ``label`` (table row), ``y``, ``control``, ``group``, ``side``."""

    row: torch.Tensor
    label: torch.Tensor
    y: torch.Tensor
    control: torch.Tensor
    group: torch.Tensor
    side: torch.Tensor
    problems: list[str]


def match_labels(
    store: ActivationStore, labels: LabelTable, target: str
) -> tuple[torch.Tensor, list[int], torch.Tensor, list[str]]:
    """Store rows matching labelled chunks of ``target`` (finite values only): ``(store rows, label rows, y 0/1,
    problem of each)``."""
    values = labels.target(target)
    key = {(t, p): i for i, (t, p) in enumerate(zip(labels.trace_id, labels.position)) if not math.isnan(values[i])}
    rows = store.rows()
    ids = store.manifest.trace_ids
    found = ((r, key.get((ids[int(t)], int(p)))) for r, (t, p) in enumerate(zip(rows["trace"], rows["position"])))
    hit = [(r, i) for r, i in found if i is not None]
    _warn_unmatched(labels, key, {i for _, i in hit}, set(ids))
    if not hit:
        raise ValueError(
            f"no store row matches a labelled chunk of {target!r}: capture the same traces at the chunk ends "
            "(positions 'segment_ends' for step chunks, or 'think'/'all') and label them with the model's tokenizer"
        )
    if labels.token_id and "token_id" in rows:  # the same trace ids and positions, but other traces?
        wrong = sum(int(rows["token_id"][r]) != labels.token_id[i] for r, i in hit)
        if wrong:
            raise ValueError(
                f"the labels and the store disagree on the token at {wrong} of {len(hit)} joined chunk ends: they were "
                "made from different traces under the same ids; label the traces the store was captured from"
            )
    r_idx = torch.tensor([r for r, _ in hit])
    l_idx = [i for _, i in hit]
    y = torch.tensor([values[i] for i in l_idx], dtype=torch.float32)
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"target {target!r} is not binary (0/1); threshold it into a label first")
    return r_idx, l_idx, y, [labels.problem[i] for i in l_idx]


def _warn_unmatched(labels: LabelTable, key: dict[tuple[str, int], int], hit: set[int], stored: set[str]) -> None:
    """Warn when labelled chunks of traces the store holds have no row there: they would drop out silently (e.g.
    a capture at ``segment_ends`` of traces segmented with ``min_chars`` > 0 merges short steps away)."""
    missed = [i for (t, _), i in key.items() if t in stored and i not in hit]
    if missed:
        first = missed[0]
        warnings.warn(
            f"{len(missed)} of {len(missed) + len(hit)} labelled chunks of the store's traces have no store row and "
            f"are left out (e.g. trace {labels.trace_id[first]!r} position {labels.position[first]}: "
            f"{labels.text[first][:40]!r}); capture at positions 'think', or segment the traces with min_chars=0 "
            "before a 'segment_ends' capture (reasonscope.traces.segment.segment_trace(trace, tokenizer, min_chars=0) "
            "for each trace, then capture those)",
            stacklevel=3,
        )


def join_labels(
    store: ActivationStore, labels: LabelTable, target: str, test_fraction: float, val_fraction: float, seed: int
) -> Labelled:
    """Match store rows to labelled chunks of ``target`` (:func:`match_labels`) and split them by problem."""
    r_idx, l_idx, y, probs = match_labels(store, labels, target)
    uniq = sorted(set(probs))
    gid = {p: k for k, p in enumerate(uniq)}
    group = torch.tensor([gid[p] for p in probs])
    sides = split_problems(probs, test_fraction, val_fraction, seed)
    side = torch.tensor([sides[p] for p in probs])
    control = y.clone()
    gen = torch.Generator().manual_seed(seed + 1)
    for g in range(len(uniq)):
        m = torch.nonzero(group == g).flatten()
        control[m] = y[m[torch.randperm(len(m), generator=gen)]]
    for s, name in ((TRAIN, "train"), (TEST, "test")):
        ys = y[side == s]
        if len(ys) == 0 or ys.min() == ys.max():
            raise ValueError(
                f"target {target!r} has labels of one class only in the {name} split ({len(ys)} rows); "
                "label more traces or choose another target"
            )
    return Labelled(r_idx, torch.tensor(l_idx), y, control, group, side, uniq)


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (index into Labelled [b], x [L, b, d] float32)


class Stream:
    """Passes over the labelled rows of ``hooks`` from the store, as :data:`Batches`."""

    def __init__(
        self, store: ActivationStore, hooks: Sequence[str], rows: torch.Tensor, read_batch: int, cache_bytes: int
    ):
        self.store, self.hooks, self.read_batch = store, list(hooks), read_batch
        self.where = torch.full((len(store),), -1, dtype=torch.long)
        self.where[rows] = torch.arange(len(rows))
        width = store.manifest.hooks[self.hooks[0]]
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._want_cache = len(rows) * len(self.hooks) * width * 4 <= cache_bytes

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.cache is not None:
            yield from self.cache
            return
        keep: list[tuple[torch.Tensor, torch.Tensor]] = []
        start = 0
        for xs in zip(*(self.store.iter_batches(h, self.read_batch) for h in self.hooks)):
            n = xs[0].shape[0]
            idx = self.where[start : start + n]
            start += n
            sel = idx >= 0
            if not bool(sel.any()):
                continue
            x = torch.stack([a[sel] for a in xs])
            if not bool(torch.isfinite(x).all()):
                bad = [h for h, a in zip(self.hooks, x) if not bool(torch.isfinite(a).all())]
                raise ValueError(
                    f"activations of {bad[:4]} in the store at {self.store.path} hold NaN/inf; "
                    "recapture them (e.g. in float32 instead of fp16)"
                )
            item = (idx[sel], x)
            if self._want_cache:
                keep.append(item)
            yield item
        if self._want_cache:
            self.cache = keep
