"""Writing a store: create or resume a job's directory, write shards atomically, finalize.

A shard is written to a temporary file, fsynced and renamed; then its record (size, sha256, rows)
is written beside it. A shard counts as captured only once its record exists, so a writer killed
between the two leaves a shard that the next run rewrites (identical bytes) and records.
"""

from __future__ import annotations

import filecmp
import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..artifacts import MANIFEST, TMP_SUFFIX, Check, atomic_path, file_record, write_json, write_manifest
from ..dtypes import torch_dtype
from .manifest import FORMAT, RECORD_SUFFIX, ROW_KEYS, SHARD_DIR, StoreManifest, record_dict, record_path, shard_name
from .reader import META_KEY, ActivationStore, CorruptShardError, read_store_manifest


class StoreWriteError(OSError):
    """Writing a shard failed (disk full, I/O error); completed shards are untouched."""


def _int_rows(name: str, t: Any, n: int) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"rows[{name!r}] must have shape [{n}] (one entry per activation row), got {list(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"rows[{name!r}] must be an integer tensor, got {t.dtype}")
    return t.to("cpu", torch.int64).contiguous()


class StoreWriter(ActivationStore):
    """A store being written: :meth:`create` (or resume), :meth:`write_shard`, :meth:`finalize`."""

    # manifest.json's (inode, mtime) when _completed_elsewhere last read it, and whether it was complete then
    _manifest_seen: tuple[tuple[int, int], bool] | None = None

    @classmethod
    def create(cls, path: str | Path, manifest: StoreManifest, resume: bool = True) -> StoreWriter:
        """Start a new store at ``path``, or resume the same job's store there.

        A different job's store (other weights, hooks, trace contents, ...) raises ``ValueError``
        saying what differs and touches nothing; so does a non-empty directory that is not a store.
        """
        path = Path(path)
        manifest = replace(manifest, complete=False, files={})
        if (path / MANIFEST).exists():
            old = read_store_manifest(path)
            if old.fingerprint() != manifest.fingerprint():
                diffs = old.describe_difference(manifest) or ["was written by a different job"]
                raise ValueError(f"store at {path} " + "; ".join(diffs) + "; use another --out or delete it")
            if not resume:
                raise FileExistsError(f"store at {path} already exists for this job; resume it or delete it")
            writer = cls(path, old)
            if old.complete:
                writer._reopen_damaged()
            else:  # recorded shards now missing or cut short are captured again
                writer._drop_damaged(writer.completed_shards())
            return writer
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"{path} exists and is not a directory; choose another --out")
            others = [p.name for p in path.iterdir() if not p.name.endswith(TMP_SUFFIX)]
            if others:
                raise ValueError(
                    f"{path} exists, is not empty and has no {MANIFEST}: not an activation store, or one that lost "
                    "its manifest; use another --out, or delete it and capture again"
                )
        path.mkdir(parents=True, exist_ok=True)
        write_manifest(path, manifest.to_manifest())
        return cls(path, manifest)

    @classmethod
    def reopen(cls, path: str | Path) -> StoreWriter:
        """The store at ``path`` for writing, as it is (e.g. to finalize shards written by other processes)."""
        return cls(Path(path), read_store_manifest(Path(path)))

    def write_shard(self, index: int, acts: Mapping[str, torch.Tensor], rows: Mapping[str, Any]) -> None:
        """Write shard ``index`` atomically, then its record.

        ``acts``: hook -> ``[n_rows, d]`` (cast to the store dtype); ``rows``: ``trace`` (index into
        ``trace_ids``, within this shard), ``position``, ``token_id``, ``segment`` (-1 = none), each
        ``[n_rows]`` int. Rows are stably grouped by trace. Rewriting an existing shard is allowed only
        with identical bytes. Non-finite activations, unknown/missing hooks and wrong widths raise.
        """
        tensors, n = self._shard_tensors(index, acts, rows)
        meta = {
            META_KEY: json.dumps(
                {"fingerprint": self._fp, "format": FORMAT, "index": index, "n_rows": n}, sort_keys=True
            )
        }
        self._save_atomic(index, tensors, meta, n)

    def _shard_tensors(
        self, index: int, acts: Mapping[str, torch.Tensor], rows: Mapping[str, Any]
    ) -> tuple[dict[str, torch.Tensor], int]:
        m = self.manifest
        if not 0 <= index < self.n_shards:
            raise IndexError(f"shard index {index} out of range: this job has {self.n_shards} shards")
        if set(acts) != set(m.hooks):
            missing, unknown = sorted(set(m.hooks) - set(acts)), sorted(set(acts) - set(m.hooks))
            raise ValueError(
                f"shard {index}: acts must hold exactly the store's hooks; missing {missing}, unexpected {unknown}"
            )
        if set(rows) != set(ROW_KEYS):
            raise ValueError(f"shard {index}: rows must have keys {list(ROW_KEYS)}, got {sorted(rows)}")
        n = -1
        for h, a in acts.items():
            if a.dim() != 2 or a.shape[1] != m.hooks[h]:
                got = a.shape[1] if a.dim() == 2 else f"shape {list(a.shape)}"
                raise ValueError(f"hook {h!r}: expected activations [n_rows, {m.hooks[h]}], got width {got}")
            if n < 0:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise ValueError(f"hook {h!r}: {a.shape[0]} rows, but other hooks have {n}")
        r = {k: _int_rows(k, rows[k], n) for k in ROW_KEYS}
        lo, hi = self._shard_traces(index)
        tr = r["trace"]
        if n and (int(tr.min()) < lo or int(tr.max()) >= hi):
            raise ValueError(
                f"shard {index} holds trace indices [{lo}, {hi}); rows['trace'] has values in "
                f"[{int(tr.min())}, {int(tr.max())}]"
            )
        if n and int(r["position"].min()) < 0:
            raise ValueError(f"shard {index}: rows['position'] must be >= 0")
        if n and int(r["segment"].min()) < -1:
            raise ValueError(f"shard {index}: rows['segment'] must be >= -1 (-1 = no segment)")
        order = None
        if n > 1 and bool((tr[1:] < tr[:-1]).any()):
            order = torch.sort(tr, stable=True).indices
            r = {k: v[order] for k, v in r.items()}
        dtype = torch_dtype(m.dtype)
        tensors: dict[str, torch.Tensor] = {}
        for h in sorted(acts):
            a = acts[h].detach()
            if not bool(torch.isfinite(a).all()):
                bad = int((~torch.isfinite(a)).sum())
                hint = (
                    "; a float16 store turns values beyond ±65504 into inf: capture with --dtype bfloat16 or float32"
                    if m.dtype == "float16"
                    else ""
                )
                raise ValueError(
                    f"hook {h!r}: {bad} non-finite activation values (NaN/inf) in shard {index}; refusing to store "
                    f"them{hint}"
                )
            a = a.to("cpu", dtype)
            if not bool(torch.isfinite(a).all()):
                raise ValueError(
                    f"hook {h!r}: values overflow {m.dtype} (inf after casting) in shard {index}; "
                    "store as float32 or bfloat16"
                )
            tensors[f"act/{h}"] = (a if order is None else a[order]).contiguous()
        for k in ROW_KEYS:
            tensors[f"row/{k}"] = r[k]
        return tensors, n

    def _save_atomic(self, index: int, tensors: dict[str, torch.Tensor], meta: dict[str, str], n_rows: int) -> None:
        final = self.shard_path(index)
        if self._completed_elsewhere():  # another process of this job finished the store: its shards stand
            return
        try:
            recorded = index in self.completed_shards()
            with atomic_path(final, replace=True) as tmp:
                save_file(tensors, tmp, metadata=meta)
                # a recorded shard is kept unless rewritten identically; one at its name without a record (a job
                # killed between the two) is replaced: a recapture need not be byte-identical (batching, GPUs)
                if recorded and final.exists() and not filecmp.cmp(tmp, final, shallow=False):
                    raise FileExistsError(
                        f"shard {index} is already captured at {final} with different content; this job's "
                        "activations differ from the ones captured before (nondeterminism?). Delete the shard and "
                        f"its record {record_path(self.path, index).name} to recapture it."
                    )
            write_json(record_path(self.path, index), record_dict(file_record(final, n_rows)))
        except (OSError, SafetensorError) as e:
            if isinstance(e, FileExistsError):
                raise
            done = len(self.completed_shards())
            err = StoreWriteError(
                f"writing shard {index} of {self.path} failed ({e}); nothing partial was left behind. The store is "
                f"still readable up to the {done} shards already complete "
                "(ActivationStore.open(..., allow_incomplete=True)), and re-running the same command resumes it."
            )
            err.errno = getattr(e, "errno", None)
            raise err from e

    def _completed_elsewhere(self) -> bool:
        """Whether another writer of this job (same fingerprint: checked when this one opened) completed the store
        while this one ran; its finalize removed the records this writer would otherwise go by."""
        if self.manifest.complete:
            return False
        try:
            st = (self.path / MANIFEST).stat()
        except FileNotFoundError:
            return False
        stamp = (st.st_ino, st.st_mtime_ns)  # a rewrite is an atomic rename: a new inode
        if self._manifest_seen is None or self._manifest_seen[0] != stamp:  # a stat per shard; a parse on change
            self._manifest_seen = (stamp, read_store_manifest(self.path).complete)
        return self._manifest_seen[1]

    def finalize(self) -> ActivationStore:
        """Check every shard against its record, write the complete manifest, return the store for reading."""
        if self._completed_elsewhere():
            self.manifest = read_store_manifest(self.path)
        if not self.manifest.complete:
            missing = [i for i in range(self.n_shards) if not record_path(self.path, i).exists()]
            if missing:
                raise ValueError(
                    f"cannot finalize {self.path}: {len(missing)} shards missing (first: {missing[:10]}); "
                    "re-run the capture"
                )
            for i in range(self.n_shards):
                self._check_shard(i, "hash")
            files = {shard_name(i): self._record(i) for i in range(self.n_shards)}
            self.manifest = self.manifest.finished(files)
            write_manifest(self.path, self.manifest.to_manifest())
        shard_dir = self.path / SHARD_DIR
        for p in shard_dir.iterdir() if shard_dir.is_dir() else []:
            if p.name.endswith(TMP_SUFFIX) or p.name.endswith(RECORD_SUFFIX):
                p.unlink(missing_ok=True)
        return ActivationStore.open(self.path)

    def _drop_damaged(self, indices: Iterable[int], check: Check = "size") -> list[int]:
        """Those of ``indices`` whose shard is now missing or of the wrong size (``check="hash"``: or altered), file
        and record removed so that the resumed job captures them again."""
        bad = []
        for i in indices:
            try:
                self._check_shard(i, check)
            except CorruptShardError:
                self.shard_path(i).unlink(missing_ok=True)
                record_path(self.path, i).unlink(missing_ok=True)  # a leftover record would skip its recapture
                bad.append(i)
        return bad

    def _reopen_damaged(self) -> None:
        """On a re-run over a complete store: shards now missing or altered (sha256) are captured again."""
        bad = self._drop_damaged(range(self.n_shards), "hash")
        if not bad:
            return
        for i in range(self.n_shards):
            if i not in bad:
                write_json(record_path(self.path, i), record_dict(self._record(i)))
        self.manifest = replace(self.manifest, complete=False, files={})
        write_manifest(self.path, self.manifest.to_manifest())
