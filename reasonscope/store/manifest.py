"""The activation store's layout and its manifest: what a store holds and which job produced it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from ..artifacts import ARTIFACT_FORMATS, FileRecord, Manifest, read_json
from ..dtypes import DtypeName, dtype_name
from ..identity import traces_hash

KIND = "activation_store"
FORMAT = ARTIFACT_FORMATS[KIND]
SHARD_DIR = "shards"
ROW_KEYS = ("trace", "position", "token_id", "segment")
RECORD_SUFFIX = ".record.json"  # per-shard size/sha256/rows, written once the shard is in place

PositionRule = Literal["all", "think", "segment_ends", "last", "spans"]
PaddingSide = Literal["left", "right"]
POSITION_RULES: tuple[PositionRule, ...] = get_args(PositionRule)
PADDING_SIDES: tuple[PaddingSide, ...] = get_args(PaddingSide)


def shard_name(index: int) -> str:
    """Path of shard ``index`` relative to the store directory."""
    return f"{SHARD_DIR}/shard-{index:05d}.safetensors"


def record_path(root: Path, index: int) -> Path:
    return root / (shard_name(index) + RECORD_SUFFIX)


def record_dict(rec: FileRecord) -> dict[str, Any]:
    return {"size": rec.size, "sha256": rec.sha256, "rows": rec.rows}


def load_record(path: Path) -> FileRecord:
    """A shard's record file (written by the store writer once the shard is in place)."""
    d = read_json(path)
    try:
        return FileRecord(**d)
    except TypeError:
        raise ValueError(f"{path} is not a shard record; delete it and its shard, then re-run the capture") from None


@dataclass(frozen=True)
class StoreManifest:
    """What a store holds and which job produced it; stored as a :class:`~reasonscope.artifacts.Manifest`.

    The job's identity is its content: weight hash, hooks and widths, position rule, dtype, shard
    size, padding side, pattern key length, trace ids and per-trace content digests
    (``trace_hashes``, empty for synthetic stores). ``model_id`` and ``backend`` only record how the
    model was named and run.
    """

    weight_hash: str
    hooks: dict[str, int]
    positions: PositionRule
    dtype: DtypeName
    trace_ids: list[str]
    shard_size: int
    trace_hashes: list[str] = field(default_factory=list)
    padding_side: PaddingSide = "left"
    pattern_keys: int | None = None
    model_id: str = ""
    backend: str = ""
    complete: bool = False
    files: dict[str, FileRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.positions not in POSITION_RULES:
            raise ValueError(f"position rule must be one of {POSITION_RULES}, got {self.positions!r}")
        if self.padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {self.padding_side!r}")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ValueError(f"shard_size must be a positive int, got {self.shard_size!r}")
        if not self.hooks:
            raise ValueError("hooks must name at least one hook")
        for h, d in self.hooks.items():
            if not isinstance(d, int) or d < 1:
                raise ValueError(f"hook {h!r}: width must be a positive int, got {d!r}")
        if len(set(self.trace_ids)) != len(self.trace_ids):
            seen: set[str] = set()
            dup = next(t for t in self.trace_ids if t in seen or seen.add(t))  # type: ignore[func-returns-value]
            raise ValueError(f"trace_ids must be unique; {dup!r} appears more than once")
        if self.trace_hashes and len(self.trace_hashes) != len(self.trace_ids):
            raise ValueError(f"trace_hashes has {len(self.trace_hashes)} entries for {len(self.trace_ids)} traces")

    @property
    def n_shards(self) -> int:
        return -(-len(self.trace_ids) // self.shard_size)

    def to_manifest(self) -> Manifest:
        config = {
            "hooks": self.hooks,
            "positions": self.positions,
            "dtype": self.dtype,
            "shard_size": self.shard_size,
            "padding_side": self.padding_side,
            "pattern_keys": self.pattern_keys,
            "trace_ids": self.trace_ids,
        }
        inputs = {"model_weights": self.weight_hash}
        if self.trace_hashes:
            inputs["traces"] = traces_hash(self.trace_hashes)
        detail = {"model_id": self.model_id, "backend": self.backend, "trace_hashes": self.trace_hashes}
        return Manifest(
            kind=KIND,
            format=FORMAT,
            config=config,
            inputs=inputs,
            files=self.files,
            complete=self.complete,
            detail=detail,
        )

    @classmethod
    def from_manifest(cls, m: Manifest, where: Path) -> StoreManifest:
        c, d = dict(m.config), dict(m.detail)
        try:
            return cls(
                weight_hash=m.inputs["model_weights"],
                hooks=c["hooks"],
                positions=c["positions"],
                dtype=c["dtype"],
                trace_ids=c["trace_ids"],
                shard_size=c["shard_size"],
                trace_hashes=d.get("trace_hashes", []),
                padding_side=c["padding_side"],
                pattern_keys=c["pattern_keys"],
                model_id=d.get("model_id", ""),
                backend=d.get("backend", ""),
                complete=m.complete,
                files=dict(m.files),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where} is not a valid activation-store manifest ({e!r}); recreate the store") from None

    def fingerprint(self) -> str:
        """sha256 of everything that defines the job (not how the model was named, nor completion)."""
        return self.to_manifest().fingerprint()

    def finished(self, files: dict[str, FileRecord]) -> StoreManifest:
        """This manifest marked complete with its shard files."""
        return replace(self, complete=True, files=files)

    def describe_difference(self, new: StoreManifest) -> list[str]:
        """What differs between the job on disk (``self``) and ``new``, in words."""
        out = []
        if self.weight_hash != new.weight_hash:
            out.append(f"was captured from model weights {self.weight_hash}, this job has {new.weight_hash}")
        if self.hooks != new.hooks:
            out.append(f"has hooks {self.hooks}, this job asks for {new.hooks}")
        for name in ("positions", "dtype", "shard_size", "padding_side", "pattern_keys"):
            a, b = getattr(self, name), getattr(new, name)
            if a != b:
                out.append(f"has {name} {a!r}, this job has {b!r}")
        if self.trace_ids != new.trace_ids:
            i = next((i for i, (a, b) in enumerate(zip(self.trace_ids, new.trace_ids)) if a != b), None)
            if i is None:
                out.append(f"has {len(self.trace_ids)} traces, this job has {len(new.trace_ids)}")
            else:
                out.append(f"has trace {self.trace_ids[i]!r} at index {i}, this job has {new.trace_ids[i]!r}")
        elif self.trace_hashes != new.trace_hashes:
            if self.trace_hashes and new.trace_hashes:
                changed = [t for t, a, b in zip(self.trace_ids, self.trace_hashes, new.trace_hashes) if a != b]
                first = ", ".join(repr(t) for t in changed[:5]) + (", ..." if len(changed) > 5 else "")
                out.append(
                    f"traces changed since this store was started: {len(changed)} of {len(self.trace_ids)} "
                    f"differ ({first})"
                )
            else:
                out.append("records trace contents differently from this job")
        return out
