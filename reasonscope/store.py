"""Activation store: sharded, append-only, memory-mappable activations on disk.

Layout of a store directory::

    manifest.json                      # StoreManifest (written atomically; ``complete`` set by finalize())
    shards/shard-00007.safetensors     # traces trace_ids[7*shard_size:(8)*shard_size]

Each shard is a plain safetensors file holding ``act/<hook>`` ``[n_rows, d]`` tensors in the
storage dtype and the int64 row index ``row/trace``, ``row/position``, ``row/token_id``,
``row/segment`` (rows grouped by trace in job order, positions in the order written). A shard is
written to a temporary name, fsynced and renamed, so a visible shard is always whole; a crashed
or failed job leaves a store that is readable up to its completed shards and is resumed by
running the same command again. Reads go through ``safetensors.safe_open`` (mmap), one shard at
a time, and never load the whole store.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from reasonscope.io import read_json, write_json

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = [
    "ActivationStore",
    "CorruptShardError",
    "StoreManifest",
    "StoreWriteError",
    "weight_hash",
]

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
STORE_FORMAT = 1
ROW_KEYS = ("trace", "position", "token_id", "segment")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
_META_KEY = "reasonscope.store"  # one metadata key: safetensors writes several keys in random order


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("reasonscope")
    except Exception:
        return "0+local"


class CorruptShardError(ValueError):
    """A shard file cannot be read (truncated, garbled, or from another job)."""


class StoreWriteError(OSError):
    """Writing a shard failed (disk full, I/O error); completed shards are untouched."""


@dataclass
class StoreManifest:
    """What a store holds and which job produced it (``manifest.json``)."""

    model_id: str
    weight_hash: str
    hooks: dict[str, int]
    positions: str
    dtype: str
    trace_ids: list[str]
    shard_size: int
    extra: dict = field(default_factory=dict)
    complete: bool = False
    version: str = field(default_factory=_version)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ValueError(f"shard_size must be a positive int, got {self.shard_size!r}")
        if not self.hooks:
            raise ValueError("hooks must name at least one hook")
        for h, d in self.hooks.items():
            if not isinstance(d, int) or d < 1:
                raise ValueError(f"hook {h!r}: width must be a positive int, got {d!r}")
        if len(set(self.trace_ids)) != len(self.trace_ids):
            dup = next(t for i, t in enumerate(self.trace_ids) if t in self.trace_ids[:i])
            raise ValueError(f"trace_ids must be unique; {dup!r} appears more than once")

    def _job(self) -> dict[str, Any]:
        d = asdict(self)
        del d["complete"], d["version"]
        return d

    def fingerprint(self) -> str:
        """sha256 of everything that defines the job (not ``complete`` nor the library ``version``)."""
        blob = json.dumps(self._job(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def n_shards(self) -> int:
        return math.ceil(len(self.trace_ids) / self.shard_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StoreManifest":
        names = {f.name for f in fields(cls)}
        unknown, missing = set(d) - names, {"model_id", "weight_hash", "hooks", "positions", "dtype", "trace_ids", "shard_size"} - set(d)
        if unknown or missing:
            raise ValueError(f"manifest has unknown keys {sorted(unknown)} / lacks keys {sorted(missing)}")
        return cls(**d)

    def describe_difference(self, other: "StoreManifest") -> list[str]:
        """Human-readable differences between the job of ``self`` (on disk) and ``other`` (this job)."""
        out = []
        if self.weight_hash != other.weight_hash:
            out.append(f"was captured from model weights {self.weight_hash}, this job has {other.weight_hash}")
        if self.model_id != other.model_id:
            out.append(f"was captured from model {self.model_id!r}, this job uses {other.model_id!r}")
        if self.hooks != other.hooks:
            out.append(f"has hooks {self.hooks}, this job asks for {other.hooks}")
        for name in ("positions", "dtype", "shard_size"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"has {name} {a!r}, this job has {b!r}")
        if self.trace_ids != other.trace_ids:
            i = next((i for i, (a, b) in enumerate(zip(self.trace_ids, other.trace_ids)) if a != b), None)
            if i is None:
                out.append(f"has {len(self.trace_ids)} traces, this job has {len(other.trace_ids)}")
            else:
                out.append(f"has trace {self.trace_ids[i]!r} at index {i}, this job has {other.trace_ids[i]!r}")
        if self.extra != other.extra:
            keys = sorted(k for k in set(self.extra) | set(other.extra) if self.extra.get(k) != other.extra.get(k))
            out.append(f"has different extra settings for {keys}")
        return out


def weight_hash(model: torch.nn.Module, chunk_elems: int = 1 << 24) -> str:
    """``"sha256:<hex>"`` over parameter names, shapes, dtypes and raw bytes, in name order.

    Tied parameters count once. Each parameter is copied to the CPU in chunks of ``chunk_elems``
    elements (from whatever device the model is on), so hashing a big GPU model needs only one
    chunk of host memory at a time; cost is one pass over the weights.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.device.type == "meta":
            raise ValueError(f"parameter {name!r} is on the meta device; load the weights before hashing")
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}\n".encode())
        flat = p.detach().reshape(-1)
        for s in range(0, flat.numel(), chunk_elems):
            piece = flat[s : s + chunk_elems].to("cpu").contiguous()
            h.update(piece.view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _int_rows(name: str, t: Any, n: int) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"rows[{name!r}] must have shape [{n}] (one entry per activation row), got {list(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"rows[{name!r}] must be an integer tensor, got {t.dtype}")
    return t.to("cpu", torch.int64).contiguous()


class ActivationStore:
    """Sharded activations of one capture job; see the module docstring for the layout."""

    def __init__(self, path: str | Path, manifest: StoreManifest) -> None:
        """Use :meth:`create` (to write) or :meth:`open` (to read)."""
        self.path = Path(path)
        self.manifest = manifest
        self._fp = manifest.fingerprint()
        self._trace_index = {t: i for i, t in enumerate(manifest.trace_ids)}
        self._rows: dict[int, dict[str, torch.Tensor]] = {}  # per-shard row index (small)
        self._checked: set[int] = set()

    # ---------------------------------------------------------------- create / open
    @classmethod
    def create(cls, path: str | Path, manifest: StoreManifest, resume: bool = True) -> "ActivationStore":
        """Start a new store at ``path``, or resume the same job's store there.

        A different job's store (other weights, hooks, traces, ...) raises ``ValueError`` saying
        what differs and touches nothing; so does a non-empty directory that is not a store.
        """
        path = Path(path)
        mpath = path / MANIFEST
        if mpath.exists():
            old = cls._read_manifest(path)
            if old.fingerprint() != manifest.fingerprint():
                diffs = old.describe_difference(manifest) or ["was written by a different job"]
                raise ValueError(f"store at {path} " + "; ".join(diffs) + "; use another --out or delete it")
            if not resume:
                raise FileExistsError(f"store at {path} already exists for this job; resume it or delete it")
            return cls(path, old)  # leftovers of a killed writer are removed by finalize()
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"{path} exists and is not a directory")
            others = [p.name for p in path.iterdir() if not (p.name.startswith(f".{MANIFEST}.") and p.name.endswith(".tmp"))]
            if others:
                raise ValueError(
                    f"{path} exists, is not empty and has no {MANIFEST}: not an activation store; "
                    "use another --out or delete it"
                )
        manifest = replace(manifest, complete=False)
        write_json(mpath, manifest.to_dict())
        _fsync_dir(path)
        return cls(path, manifest)

    @classmethod
    def open(cls, path: str | Path, allow_incomplete: bool = False) -> "ActivationStore":
        """Open a store for reading; an incomplete one only with ``allow_incomplete=True``."""
        path = Path(path)
        store = cls(path, cls._read_manifest(path))
        if not store.manifest.complete and not allow_incomplete:
            done = len(store.completed_shards())
            raise ValueError(
                f"store at {path} is incomplete ({done} of {store.n_shards} shards captured); re-run the "
                "capture command to finish it, or open it with allow_incomplete=True to read the completed shards"
            )
        return store

    @staticmethod
    def _read_manifest(path: Path) -> StoreManifest:
        if not path.is_dir():
            raise FileNotFoundError(f"activation store {path} does not exist")
        mpath = path / MANIFEST
        if not mpath.exists():
            raise FileNotFoundError(f"{path} has no {MANIFEST}: not an activation store (or its creation was cut short)")
        d = read_json(mpath)  # corrupt JSON -> ValueError naming the file
        try:
            return StoreManifest.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{mpath} is not a valid activation-store manifest: {e}") from None

    # ---------------------------------------------------------------- shards
    @property
    def n_shards(self) -> int:
        """Number of shards the job has (complete or not)."""
        return self.manifest.n_shards

    def shard_path(self, index: int) -> Path:
        return self.path / SHARD_DIR / f"shard-{index:05d}.safetensors"

    def completed_shards(self) -> list[int]:
        """Indices of the shards on disk (each written whole), ascending."""
        d = self.path / SHARD_DIR
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            m = _SHARD_RE.match(p.name)
            if m and int(m.group(1)) < self.n_shards:
                out.append(int(m.group(1)))
        return sorted(out)

    def _shard_traces(self, index: int) -> tuple[int, int]:
        s = self.manifest.shard_size
        return index * s, min((index + 1) * s, len(self.manifest.trace_ids))

    def write_shard(self, index: int, acts: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]) -> None:
        """Write shard ``index`` atomically.

        ``acts``: hook -> ``[n_rows, d]`` (cast to the store dtype); ``rows``: ``trace`` (index into
        ``trace_ids``, within this shard), ``position``, ``token_id``, ``segment`` (-1 = none), each
        ``[n_rows]`` int. Rows are stably grouped by trace. Rewriting an existing shard is allowed only
        with identical bytes. Non-finite activations, unknown/missing hooks and wrong widths raise.
        """
        m = self.manifest
        if not 0 <= index < self.n_shards:
            raise IndexError(f"shard index {index} out of range: this job has {self.n_shards} shards")
        if set(acts) != set(m.hooks):
            missing, unknown = sorted(set(m.hooks) - set(acts)), sorted(set(acts) - set(m.hooks))
            raise ValueError(f"shard {index}: acts must hold exactly the store's hooks; missing {missing}, unexpected {unknown}")
        if set(rows) != set(ROW_KEYS):
            raise ValueError(f"shard {index}: rows must have keys {list(ROW_KEYS)}, got {sorted(rows)}")
        n = None
        for h, a in acts.items():
            if a.dim() != 2 or a.shape[1] != m.hooks[h]:
                got = a.shape[1] if a.dim() == 2 else f"shape {list(a.shape)}"
                raise ValueError(f"hook {h!r}: expected activations [n_rows, {m.hooks[h]}], got width {got}")
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise ValueError(f"hook {h!r}: {a.shape[0]} rows, but other hooks have {n}")
        assert n is not None
        r = {k: _int_rows(k, rows[k], n) for k in ROW_KEYS}
        lo, hi = self._shard_traces(index)
        tr = r["trace"]
        if n and (int(tr.min()) < lo or int(tr.max()) >= hi):
            raise ValueError(f"shard {index} holds trace indices [{lo}, {hi}); rows['trace'] has values in [{int(tr.min())}, {int(tr.max())}]")
        if n and int(r["position"].min()) < 0:
            raise ValueError(f"shard {index}: rows['position'] must be >= 0")
        if n and int(r["segment"].min()) < -1:
            raise ValueError(f"shard {index}: rows['segment'] must be >= -1 (-1 = no segment)")
        order = None
        if n > 1 and bool((tr[1:] < tr[:-1]).any()):
            order = torch.sort(tr, stable=True).indices
            r = {k: v[order] for k, v in r.items()}

        dtype = DTYPES[m.dtype]
        tensors: dict[str, torch.Tensor] = {}
        for h in sorted(acts):
            a = acts[h].detach()
            if not bool(torch.isfinite(a).all()):
                bad = int((~torch.isfinite(a)).sum())
                raise ValueError(f"hook {h!r}: {bad} non-finite activation values (NaN/inf) in shard {index}; refusing to store them")
            a = a.to("cpu", dtype)
            if not bool(torch.isfinite(a).all()):
                raise ValueError(f"hook {h!r}: values overflow {m.dtype} (inf after casting) in shard {index}; store as float32 or bfloat16")
            if order is not None:
                a = a[order]
            tensors[f"act/{h}"] = a.contiguous()
        for k in ROW_KEYS:
            tensors[f"row/{k}"] = r[k]
        meta = {_META_KEY: json.dumps({"fingerprint": self._fp, "format": STORE_FORMAT, "index": index, "n_rows": n}, sort_keys=True)}
        self._save_atomic(index, tensors, meta)

    def _save_atomic(self, index: int, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        final = self.shard_path(index)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            try:
                save_file(tensors, tmp, metadata=meta)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                if final.exists():
                    if not filecmp.cmp(tmp, final, shallow=False):
                        raise FileExistsError(
                            f"shard {index} already exists at {final} with different content; this job's "
                            "activations differ from the ones captured before (nondeterminism?). Delete the "
                            "shard to recapture it."
                        )
                    return  # identical bytes: nothing to do
                os.replace(tmp, final)
                _fsync_dir(final.parent)
            except (OSError, SafetensorError) as e:
                if isinstance(e, FileExistsError):
                    raise
                done = len(self.completed_shards())
                err = StoreWriteError(
                    f"writing shard {index} of {self.path} failed ({e}); nothing partial was left behind. The "
                    f"store is still readable up to the {done} shards already complete "
                    "(ActivationStore.open(..., allow_incomplete=True)), and re-running the same command resumes it."
                )
                err.errno = getattr(e, "errno", None)
                raise err from e
        finally:
            tmp.unlink(missing_ok=True)

    def finalize(self) -> None:
        """Check every shard is present and readable, then mark the store complete (atomically)."""
        done = set(self.completed_shards())
        missing = [i for i in range(self.n_shards) if i not in done]
        if missing:
            raise ValueError(f"cannot finalize {self.path}: {len(missing)} shards missing (first: {missing[:10]}); re-run the capture")
        for i in range(self.n_shards):
            with self._open_shard(i):
                pass
        for p in (self.path / SHARD_DIR).glob(".shard-*.tmp"):  # temp files of killed writers
            p.unlink(missing_ok=True)
        if not self.manifest.complete:
            self.manifest.complete = True
            write_json(self.path / MANIFEST, self.manifest.to_dict())
            _fsync_dir(self.path)

    # ---------------------------------------------------------------- reads
    @contextmanager
    def _open_shard(self, index: int) -> Iterator[Any]:
        """``safe_open`` a shard (mmap); read errors become :class:`CorruptShardError` naming the file."""
        p = self.shard_path(index)
        hint = "delete it and re-run the capture command to recapture that shard"
        try:
            with safe_open(p, framework="pt") as f:
                if index not in self._checked:
                    try:
                        info = json.loads((f.metadata() or {})[_META_KEY])
                    except (KeyError, ValueError):
                        raise CorruptShardError(f"shard file {p} has no reasonscope metadata; {hint}") from None
                    if info.get("fingerprint") != self._fp or info.get("index") != index:
                        raise CorruptShardError(f"shard file {p} was written by a different job or for another index; {hint}")
                    self._checked.add(index)
                yield f
        except (SafetensorError, OSError) as e:
            raise CorruptShardError(f"shard file {p} is corrupt or truncated ({e}); {hint}") from e

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

    def __len__(self) -> int:
        """Total rows over the completed shards."""
        n = 0
        for i in self.completed_shards():
            if i in self._rows:
                n += len(self._rows[i]["trace"])
            else:
                with self._open_shard(i) as f:
                    n += f.get_slice("row/trace").get_shape()[0]
        return n

    def rows(self) -> dict[str, torch.Tensor]:
        """Row index over the completed shards, in storage order (aligned with ``get(hook)``)."""
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
        position that was not captured raises ``KeyError``. Without a trace, every completed shard
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
                return torch.zeros(0, self.manifest.hooks[hook], dtype=DTYPES[self.manifest.dtype])
            return torch.cat(out)

        t = self.trace_index(trace)
        shard = t // self.manifest.shard_size
        if not self.shard_path(shard).exists():
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

    def _iter_chunks(self, hook: str, batch_size: int, dtype: torch.dtype, with_tokens: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
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
                tok = self._shard_rows(i, f)["token_id"] if with_tokens else None
                s = 0
                while s < n:
                    take = min(batch_size - have, n - s)
                    buf.append(sl[s : s + take].to(dtype))
                    if tok is not None:
                        tbuf.append(tok[s : s + take])
                    have, s = have + take, s + take
                    if have == batch_size:
                        yield torch.cat(buf), (torch.cat(tbuf) if with_tokens else None)
                        buf, tbuf, have = [], [], 0
        if have:
            yield torch.cat(buf), (torch.cat(tbuf) if with_tokens else None)

    def iter_batches(self, hook: str, batch_size: int, dtype: torch.dtype = torch.float32) -> Iterator[torch.Tensor]:
        """Stream ``[batch_size, d]`` batches of ``hook`` in storage order (last one may be short)."""
        for x, _ in self._iter_chunks(hook, batch_size, dtype):
            yield x

    def to_hf_dataset(
        self,
        hook: str,
        path: str | Path | None = None,
        *,
        context_size: int = 1,
        dtype: str = "float32",
    ) -> "datasets.Dataset":
        """Convert one hook to the Arrow layout SAELens' ``CacheActivationsRunner`` writes.

        Columns: ``<hook>``: ``Array2D(shape=(context_size, d), dtype)`` and ``token_ids``:
        ``Sequence(int32, length=context_size)``; consecutive rows are packed ``context_size`` at a
        time (a final remainder shorter than ``context_size`` is dropped). With ``path`` the dataset
        is written there (``save_to_disk`` layout, atomically, plus a ``manifest.json``) and returned
        memory-mapped; a second call with the same arguments reuses it. Without ``path`` it is built
        in memory. SAELens then reads it with its own cached-activations reader and trains on it::

            store.to_hf_dataset(hook, "acts_hf")          # the one call
            acts = sae_lens.ActivationsStore(
                model=None, dataset=None, cached_activations_path="acts_hf", hook_name=hook,
                context_size=1, d_in=store.manifest.hooks[hook], streaming=False, hook_head_index=None,
                n_batches_in_buffer=512, total_training_tokens=len(store), store_batch_size_prompts=256,
                train_batch_size_tokens=512, prepend_bos=False, normalize_activations="none",
                device=torch.device("cpu"), dtype="float32")
            sae_lens.SAETrainer(SAETrainerConfig(total_training_samples=..., train_batch_size_samples=512,
                lr=3e-4, lr_end=3e-4), training_sae, data_provider=acts).fit()

        (``n_batches_in_buffer * context_size`` must be >= ``train_batch_size_tokens``.) SAELens'
        ``LanguageModelSAETrainingRunner`` is not usable here: it loads a model and a text dataset
        even with ``use_cached_activations=True``.
        """
        import datasets
        import pyarrow as pa
        from datasets import Array2D, Features, Sequence as HFSequence, Value
        from datasets.arrow_writer import ArrowWriter

        self._act_key(hook)
        if dtype not in ("float32", "float16"):
            raise ValueError(f"Arrow dtype must be 'float32' or 'float16' (Arrow has no bfloat16), got {dtype!r}")
        if context_size < 1:
            raise ValueError(f"context_size must be >= 1, got {context_size}")
        d = self.manifest.hooks[hook]
        features = Features({
            hook: Array2D(shape=(context_size, d), dtype=dtype),
            "token_ids": HFSequence(Value("int32"), length=context_size),
        })
        n_rows = len(self)
        info = {
            "kind": "reasonscope.store.hf_dataset", "store": str(self.path.resolve()), "store_fingerprint": self._fp,
            "shards": self.completed_shards(), "hook": hook, "context_size": context_size, "dtype": dtype,
            "n_rows": n_rows, "n_sequences": n_rows // context_size, "version": _version(),
        }
        if path is not None:
            path = Path(path)
            if path.exists():
                try:
                    same = read_json(path / MANIFEST) == info
                except (FileNotFoundError, ValueError):
                    same = False
                if not same:
                    raise FileExistsError(f"{path} exists and is not this conversion; delete it or choose another path")
                return datasets.load_from_disk(str(path))

        np_dtype = DTYPES[dtype]
        chunk = context_size * max(1, (1 << 24) // (d * context_size))  # ~64 MiB of float32 per write

        def fill(writer: Any) -> None:
            for x, tok in self._iter_chunks(hook, chunk, np_dtype, with_tokens=True):
                k = x.shape[0] // context_size * context_size  # only the last chunk can be short
                if k:
                    writer.write_batch({
                        hook: x[:k].reshape(-1, context_size, d).numpy(),
                        "token_ids": tok[:k].to(torch.int32).reshape(-1, context_size).numpy(),
                    })
            writer.finalize()

        if path is None:
            stream = pa.BufferOutputStream()
            with ArrowWriter(features=features, stream=stream) as w:
                fill(w)
            return datasets.Dataset.from_buffer(stream.getvalue())

        path.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            with ArrowWriter(features=features, path=str(work / "stream.arrow")) as w:
                fill(w)
            datasets.Dataset.from_file(str(work / "stream.arrow")).save_to_disk(str(work / "ds"))
            write_json(work / "ds" / MANIFEST, info)
            os.replace(work / "ds", path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return datasets.load_from_disk(str(path))

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ActivationStore({str(self.path)!r}, model={m.model_id!r}, hooks={list(m.hooks)}, "
                f"shards={len(self.completed_shards())}/{self.n_shards}, complete={m.complete})")
