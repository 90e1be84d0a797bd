"""Reading a store: checked, lazy, one shard at a time (``safetensors.safe_open``, mmap).

Opening checks every captured shard's size against the manifest (a deleted or truncated shard is
an error there); the first read of each shard checks its sha256 (``check="hash"``, the default)
and row count, so an altered shard is an error before any of its rows are returned.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from ..artifacts import MANIFEST, Check, CorruptFileError, FileRecord, check_file, read_manifest
from ..dtypes import torch_dtype
from .manifest import (
    FORMAT,
    KIND,
    RECORD_SUFFIX,
    ROW_KEYS,
    SHARD_DIR,
    StoreManifest,
    load_record,
    record_path,
    shard_name,
)

if TYPE_CHECKING:  # pragma: no cover
    import datasets

META_KEY = "reasonscope.store"  # one metadata key: safetensors writes several keys in random order
_RECAPTURE = "delete that shard file and re-run the capture command, which recaptures it"


class CorruptShardError(CorruptFileError):
    """A shard is missing, truncated, altered, or from another job."""


def read_store_manifest(path: Path) -> StoreManifest:
    """The store manifest at ``path``, refusing anything that is not an activation store of this format."""
    m = read_manifest(path, KIND, FORMAT)
    return StoreManifest.from_manifest(m, path / MANIFEST)


class ActivationStore:
    """Sharded activations of one capture job, read lazily and checked (see the module docstring)."""

    def __init__(self, path: str | Path, manifest: StoreManifest, check: Check = "hash") -> None:
        """Use :meth:`open` (to read) or :meth:`StoreWriter.create` (to write)."""
        self.path = Path(path)
        self.manifest = manifest
        self.check: Check = check
        self._fp = manifest.fingerprint()
        self._trace_index = {t: i for i, t in enumerate(manifest.trace_ids)}
        self._rows: dict[int, dict[str, torch.Tensor]] = {}  # per-shard row index (small)
        self._checked: set[int] = set()

    @classmethod
    def open(cls, path: str | Path, allow_incomplete: bool = False, check: Check = "hash") -> ActivationStore:
        """Open a store for reading; an incomplete one only with ``allow_incomplete=True``.

        Every captured shard's size is checked now; with ``check="hash"`` (default) each shard's
        sha256 is also checked the first time it is read, with ``"size"`` never (fast mode; run
        :func:`reasonscope.artifacts.verify_artifact` to check the hashes).
        """
        path = Path(path)
        store = cls(path, read_store_manifest(path), check)
        if not store.manifest.complete and not allow_incomplete:
            done = len(store.completed_shards())
            raise ValueError(
                f"store at {path} is incomplete ({done} of {store.n_shards} shards captured); re-run the "
                "capture command to finish it, or open it with allow_incomplete=True to read the completed shards"
            )
        for i in store.completed_shards():
            store._check_shard(i, "size")
        return store

    # ---------------------------------------------------------------- shards
    @property
    def n_shards(self) -> int:
        """Number of shards the job has (captured or not)."""
        return self.manifest.n_shards

    def shard_path(self, index: int) -> Path:
        return self.path / shard_name(index)

    def completed_shards(self) -> list[int]:
        """Indices of the captured shards, ascending (all of them once the store is complete)."""
        if self.manifest.complete:
            return list(range(self.n_shards))
        d = self.path / SHARD_DIR
        if not d.is_dir():
            return []
        names = {p.name for p in d.iterdir()}
        return [i for i in range(self.n_shards) if Path(shard_name(i)).name + RECORD_SUFFIX in names]

    def _shard_traces(self, index: int) -> tuple[int, int]:
        s = self.manifest.shard_size
        return index * s, min((index + 1) * s, len(self.manifest.trace_ids))

    def _record(self, index: int) -> FileRecord:
        if self.manifest.complete:
            return self.manifest.files[shard_name(index)]
        return load_record(record_path(self.path, index))

    def _check_shard(self, index: int, check: Check) -> None:
        try:
            check_file(self.path, shard_name(index), self._record(index), check, fix=_RECAPTURE)
        except CorruptFileError as e:
            raise CorruptShardError(str(e)) from None

    @contextmanager
    def _open_shard(self, index: int) -> Iterator[Any]:
        """``safe_open`` a shard (mmap), checked on first use; problems raise :class:`CorruptShardError`."""
        p = self.shard_path(index)
        first = index not in self._checked
        if first:
            self._check_shard(index, self.check)
        try:
            with safe_open(p, framework="pt") as f:
                if first:
                    self._check_shard_meta(index, f)
                    self._checked.add(index)
                yield f
        except (SafetensorError, OSError) as e:
            raise CorruptShardError(f"shard file {p} is corrupt or truncated ({e}); {_RECAPTURE}") from e

    def _check_shard_meta(self, index: int, f: Any) -> None:
        p = self.shard_path(index)
        try:
            info = json.loads((f.metadata() or {})[META_KEY])
        except (KeyError, ValueError):
            raise CorruptShardError(f"shard file {p} has no reasonscope metadata; {_RECAPTURE}") from None
        if info.get("fingerprint") != self._fp or info.get("index") != index:
            raise CorruptShardError(f"shard file {p} was written by a different job or for another index; {_RECAPTURE}")
        n = f.get_slice("row/trace").get_shape()[0]
        if n != self._record(index).rows:
            raise CorruptShardError(
                f"shard file {p} has {n} rows, its record says {self._record(index).rows}; {_RECAPTURE}"
            )

    def _act_key(self, hook: str) -> str:
        if hook not in self.manifest.hooks:
            raise KeyError(f"unknown hook {hook!r}; this store has hooks {sorted(self.manifest.hooks)}")
        return f"act/{hook}"

    def _shard_rows(self, index: int, f: Any | None = None) -> dict[str, torch.Tensor]:
        if index not in self._rows:
            if f is None:
                with self._open_shard(index) as g:
                    return self._shard_rows(index, g)
            self._rows[index] = {k: f.get_tensor(f"row/{k}") for k in ROW_KEYS}
        return self._rows[index]

    # ---------------------------------------------------------------- reads
    def __len__(self) -> int:
        """Total rows over the captured shards (from the manifest's row counts)."""
        return sum(int(self._record(i).rows or 0) for i in self.completed_shards())

    def rows(self) -> dict[str, torch.Tensor]:
        """Row index over the captured shards, in storage order (aligned with ``get(hook)``)."""
        parts = [self._shard_rows(i) for i in self.completed_shards()]
        if not parts:
            return {k: torch.zeros(0, dtype=torch.int64) for k in ROW_KEYS}
        return {k: torch.cat([p[k] for p in parts]) for k in ROW_KEYS}

    def trace_index(self, trace: str | int) -> int:
        """Index in ``trace_ids`` of a trace given by id or index."""
        if isinstance(trace, str):
            if trace not in self._trace_index:
                raise KeyError(f"trace {trace!r} is not in this store ({len(self._trace_index)} traces)")
            return self._trace_index[trace]
        t = int(trace)
        if not 0 <= t < len(self.manifest.trace_ids):
            raise KeyError(f"trace index {t} out of range [0, {len(self.manifest.trace_ids)})")
        return t

    def get(
        self,
        hook: str,
        *,
        trace: str | int | None = None,
        segment: int | None = None,
        positions: int | Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Activations ``[n, d]`` of ``hook`` (storage dtype), in storage order.

        ``trace`` (id or index) reads only that trace's rows from its one shard; ``segment`` and
        ``positions`` (token positions in the trace) filter further. With a trace, asking for a
        position that was not captured raises ``KeyError``. Without a trace, every captured shard
        is read (use :meth:`iter_batches` to stream instead).
        """
        key = self._act_key(hook)
        pos = None if positions is None else torch.as_tensor(positions, dtype=torch.int64).reshape(-1)
        if trace is None:
            out = []
            for i in self.completed_shards():
                with self._open_shard(i) as f:
                    r = self._shard_rows(i, f)
                    mask = self._mask(r, segment, pos)
                    x = f.get_tensor(key)
                out.append(x if mask is None else x[mask])
            if not out:
                return torch.zeros(0, self.manifest.hooks[hook], dtype=torch_dtype(self.manifest.dtype))
            return torch.cat(out)

        t = self.trace_index(trace)
        shard = t // self.manifest.shard_size
        if shard not in self.completed_shards():
            raise KeyError(f"trace {self.manifest.trace_ids[t]!r} is in shard {shard}, which has not been captured yet")
        with self._open_shard(shard) as f:
            r = self._shard_rows(shard, f)
            lo = int(torch.searchsorted(r["trace"], t, side="left"))
            hi = int(torch.searchsorted(r["trace"], t, side="right"))
            x = f.get_slice(key)[lo:hi]  # reads only this trace's rows
        rr = {k: v[lo:hi] for k, v in r.items()}
        if pos is not None:
            missing = sorted(set(pos.tolist()) - set(rr["position"].tolist()))
            if missing:
                raise KeyError(
                    f"positions {missing[:10]} of trace {self.manifest.trace_ids[t]!r} were not captured "
                    f"(position rule {self.manifest.positions!r})"
                )
        mask = self._mask(rr, segment, pos)
        return x if mask is None else x[mask]

    @staticmethod
    def _mask(r: dict[str, torch.Tensor], segment: int | None, pos: torch.Tensor | None) -> torch.Tensor | None:
        mask = None
        if segment is not None:
            mask = r["segment"] == int(segment)
        if pos is not None:
            m2 = torch.isin(r["position"], pos)
            mask = m2 if mask is None else mask & m2
        return mask

    def iter_chunks(
        self, hook: str, batch_size: int, dtype: torch.dtype = torch.float32
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stream ``(activations [b, d], token ids [b])`` in storage order (the last batch may be short)."""
        key = self._act_key(hook)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        buf: list[torch.Tensor] = []
        tbuf: list[torch.Tensor] = []
        have = 0
        for i in self.completed_shards():
            with self._open_shard(i) as f:
                sl = f.get_slice(key)
                n = sl.get_shape()[0]
                tok = self._shard_rows(i, f)["token_id"]
                s = 0
                while s < n:
                    take = min(batch_size - have, n - s)
                    buf.append(sl[s : s + take].to(dtype))
                    tbuf.append(tok[s : s + take])
                    have, s = have + take, s + take
                    if have == batch_size:
                        yield torch.cat(buf), torch.cat(tbuf)
                        buf, tbuf, have = [], [], 0
        if have:
            yield torch.cat(buf), torch.cat(tbuf)

    def iter_batches(self, hook: str, batch_size: int, dtype: torch.dtype = torch.float32) -> Iterator[torch.Tensor]:
        """Stream ``[batch_size, d]`` batches of ``hook`` in storage order (last one may be short)."""
        for x, _ in self.iter_chunks(hook, batch_size, dtype):
            yield x

    def to_hf_dataset(
        self, hook: str, path: str | Path | None = None, *, context_size: int = 1, dtype: str = "float32"
    ) -> datasets.Dataset:
        """SAELens' cached-activations layout of one hook; see :func:`reasonscope.store.saelens.to_hf_dataset`."""
        from .saelens import to_hf_dataset

        return to_hf_dataset(self, hook, path, context_size=context_size, dtype=dtype)

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"ActivationStore({str(self.path)!r}, model={m.model_id!r}, hooks={list(m.hooks)}, "
            f"shards={len(self.completed_shards())}/{self.n_shards}, complete={m.complete})"
        )
