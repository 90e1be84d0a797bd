"""The artifact convention: atomic writes, ``manifest.json`` with content hashes, and checked opens.

Every stage writes a directory holding ``manifest.json`` (:class:`Manifest`: kind, format version,
package version, config, inputs by content hash, creation time and every data file with its size,
row count and sha256) next to its data files. Files and directories are written under a temporary
name, fsynced and renamed into place (:func:`atomic_file`, :func:`atomic_dir`); they get the
permissions of the umask like any ordinary file. :meth:`ArtifactDir.open` refuses a directory that is
missing, half-written, of another kind or format, or whose files are missing or differ from the
manifest, naming the file and the fix; :func:`verify_artifact` checks every hash.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Literal

__all__ = [
    "ARTIFACT_FORMATS",
    "MANIFEST",
    "ArtifactDir",
    "ArtifactError",
    "CorruptFileError",
    "FileRecord",
    "ForeignArtifactError",
    "IncompleteArtifactError",
    "JsonResult",
    "Manifest",
    "VerifyReport",
    "atomic_dir",
    "atomic_file",
    "atomic_path",
    "check_file",
    "file_record",
    "find_artifacts",
    "fsync_dir",
    "package_version",
    "read_json",
    "read_manifest",
    "reading",
    "sha256_file",
    "verify_artifact",
    "write_artifact",
    "write_json",
    "write_manifest",
]

MANIFEST = "manifest.json"
TMP_SUFFIX = ".tmp"
# every artifact kind and the one format version this reasonscope reads and writes (add new stages here)
ARTIFACT_FORMATS: dict[str, int] = {
    "activation_store": 2,
    "emergent_heads": 1,
    "head_map": 1,
    "heads_eval": 1,
    "hybrid_run": 1,
    "json_result": 1,
    "organism": 1,
    "probe_labels": 1,
    "probe_set": 1,
    "saelens_activations": 1,
    "steering_vector": 1,
    "trace_set": 1,
    "vector_exports": 1,
}
Check = Literal["size", "hash"]


class ArtifactError(ValueError):
    """An artifact directory cannot be used as it is; the message names the file and the fix."""


class ForeignArtifactError(ArtifactError):
    """The directory holds another kind of artifact, or a format this version does not read."""


class IncompleteArtifactError(ArtifactError):
    """The directory was not written to the end (no manifest, or one not marked complete)."""


class CorruptFileError(ArtifactError):
    """A data file is missing, or its size, row count or sha256 differs from the manifest."""


def package_version() -> str:
    """Installed reasonscope version (``0+local`` when run from a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reasonscope")
    except PackageNotFoundError:
        return "0+local"


# ---------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename inside it survives a crash (a no-op where unsupported)."""
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


def _settle_tree(root: Path, mask: int) -> None:
    """Give every file and directory under ``root`` the umask's permissions (some writers, e.g. safetensors, create
    files 0o600), then fsync them."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path) and os.stat(path).st_nlink == 1:  # never another file's permissions
                os.chmod(path, 0o666 & ~mask)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(dirpath, 0o777 & ~mask)
        fsync_dir(dirpath)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    if sys.platform != "linux":
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _publish(tmp: Path, final: Path, replace: bool) -> None:
    """Rename ``tmp`` to ``final`` (a directory already at ``final`` is swapped out only with ``replace``; the swap
    is one atomic exchange where the system has it, so a crash leaves the old or the new directory there)."""
    if tmp.is_dir() and final.is_dir() and not final.is_symlink():
        if not replace:
            raise FileExistsError(f"{final} already exists; delete it or choose another output path")
        if _exchange(tmp, final):  # tmp now holds the old directory, which the caller's cleanup would also remove
            fsync_dir(final.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", suffix=TMP_SUFFIX, dir=final.parent))
        os.replace(final, old / final.name)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old / final.name, final)  # put the old one back
            shutil.rmtree(old, ignore_errors=True)
            raise
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, final)
    fsync_dir(final.parent)


@contextmanager
def atomic_path(path: str | Path, directory: bool = False, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success fsync it and rename it to ``path``.

    The one atomic-write primitive: with ``directory=True`` the temporary is a directory (fsynced
    whole), else an empty file. It gets the umask's permissions (``0o666``/``0o777 & ~umask``). An
    existing directory at ``path`` is swapped out only with ``replace=True`` (refused before any
    work otherwise); an existing file is replaced. On an exception the temporary is removed and
    ``path`` is untouched.
    """
    path = Path(path)
    if directory and not replace and path.exists():
        raise FileExistsError(f"{path} already exists; delete it or choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=TMP_SUFFIX, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        mask = _umask()
        if directory:
            _settle_tree(tmp, mask)
        else:
            os.chmod(tmp, 0o666 & ~mask)  # after: a writer may have recreated it
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        _publish(tmp, path, replace=replace)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a file to write through :func:`atomic_path` (text modes are UTF-8)."""
    with atomic_path(path, replace=True) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        yield f


@contextmanager
def atomic_dir(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Build a directory through :func:`atomic_path`; an existing one is replaced only with ``replace=True``."""
    with atomic_path(path, directory=True, replace=replace) as tmp:
        yield tmp


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing or garbled file raises naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); the file is corrupt or was cut short") from None


# ---------------------------------------------------------------------------- files and manifest


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """``"sha256:<hex>"`` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class FileRecord:
    """One data file of an artifact: byte size, content hash and (where meaningful) its row count."""

    size: int
    sha256: str
    rows: int | None = None


def file_record(path: str | Path, rows: int | None = None) -> FileRecord:
    """Size and sha256 of the file at ``path``."""
    return FileRecord(size=os.path.getsize(path), sha256=sha256_file(path), rows=rows)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of an artifact directory.

    ``config`` and ``inputs`` (name -> content hash) define the job: :meth:`fingerprint` hashes them
    with ``kind`` and ``format``. ``detail`` is bulky or informational (how the model was named,
    per-input hashes for diagnostics) and not part of the job's identity. ``files`` maps paths
    relative to the directory to their :class:`FileRecord`.
    """

    kind: str
    format: int
    config: Mapping[str, Any]
    inputs: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, FileRecord] = field(default_factory=dict)
    complete: bool = True
    detail: Mapping[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=_now)
    version: str = field(default_factory=package_version)

    def fingerprint(self) -> str:
        """sha256 of what defines the job: kind, format, config and inputs."""
        job = {"kind": self.kind, "format": self.format, "config": self.config, "inputs": self.inputs}
        blob = json.dumps(job, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["files"] = {k: asdict(v) for k, v in self.files.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str | Path = MANIFEST) -> Manifest:
        """Parse a manifest dict; a wrong shape raises :class:`ArtifactError` naming ``where``."""
        if not isinstance(d, Mapping) or not isinstance(d.get("kind"), str) or not isinstance(d.get("format"), int):
            raise ForeignArtifactError(
                f"{where} has no 'kind' and integer 'format': it was written by an older reasonscope or another "
                "program; recreate the artifact with this version (into a new output directory)"
            )
        try:
            files = {str(k): FileRecord(**v) for k, v in dict(d.get("files", {})).items()}
            return cls(**{**d, "files": files})
        except TypeError as e:
            raise ArtifactError(f"{where} is not a valid reasonscope manifest ({e}); recreate the artifact") from None


def write_manifest(root: str | Path, manifest: Manifest) -> None:
    """Write ``root/manifest.json`` atomically and fsync ``root``."""
    write_json(Path(root) / MANIFEST, manifest.to_dict())
    fsync_dir(root)


def read_manifest(root: str | Path, kind: str | None = None, format: int | None = None) -> Manifest:
    """Read ``root/manifest.json``, refusing a missing or half-written directory, another kind or format."""
    root = Path(root)
    if not root.exists():
        kept = root.parent.glob(f".{root.name}.old.*{TMP_SUFFIX}/{root.name}")
        last = max(kept, key=lambda p: p.stat().st_mtime, default=None)
        if last is not None:  # a replace outside Linux died between its two renames (see _publish)
            raise FileNotFoundError(
                f"{root} does not exist: replacing it was interrupted, and its previous version is at {last}; "
                f"move that back (mv {shlex.quote(str(last))} {shlex.quote(str(root))}) or re-run the command "
                "that writes it"
            )
        raise FileNotFoundError(f"{root} does not exist; check the path")
    if not root.is_dir():
        raise ArtifactError(f"{root} is a file, not an artifact directory; pass the directory that holds {MANIFEST}")
    mpath = root / MANIFEST
    if not mpath.exists():
        what = f"a {kind} artifact" if kind else "an artifact"
        if root.name.endswith(TMP_SUFFIX):
            hint = "a temporary directory left by an interrupted write; delete it and re-run the command"
        else:
            hint = f"not {what}, or its writing was cut short; re-run the command that writes it"
        raise IncompleteArtifactError(f"{root} has no {MANIFEST}: {hint}")
    m = Manifest.from_dict(read_json(mpath), mpath)
    if kind is not None and m.kind != kind:
        raise ForeignArtifactError(f"{mpath} describes a {m.kind!r} artifact, not {kind!r}; pass a {kind!r} directory")
    if format is not None and m.format != format:
        raise ForeignArtifactError(
            f"{mpath}: {m.kind} format {m.format} (written by reasonscope {m.version}); this version reads format "
            f"{format}; recreate it with this version or use the version that wrote it"
        )
    return m


def check_file(root: str | Path, name: str, record: FileRecord, check: Check = "size", fix: str | None = None) -> Path:
    """Path of data file ``name``, after checking it exists with the recorded size (and sha256 for ``"hash"``).

    ``fix`` is the remedy the error names (default: recreate the artifact).
    """
    p = Path(root) / name
    fix = fix or DAMAGED
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise CorruptFileError(f"{p} is missing (listed in {Path(root) / MANIFEST}); {fix}") from None
    if size != record.size:
        raise CorruptFileError(
            f"{p} has {size} bytes, its manifest records {record.size} (truncated or altered); {fix}"
        )
    if check == "hash":
        got = sha256_file(p)
        if got != record.sha256:
            raise CorruptFileError(
                f"{p} does not match its manifest's sha256 (altered: {got} != {record.sha256}); {fix}"
            )
    return p


# ---------------------------------------------------------------------------- whole artifacts


@dataclass(frozen=True)
class ArtifactDir:
    """An opened, checked artifact directory: its ``path`` and parsed ``manifest``."""

    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | Path, kind: str, format: int, check: Check = "size") -> ArtifactDir:
        """Open a complete artifact of ``kind`` and ``format``; every file's size (or hash) is checked."""
        path = Path(path)
        m = read_manifest(path, kind, format)
        if not m.complete:
            raise IncompleteArtifactError(
                f"{path / MANIFEST} is not marked complete: the writing was cut short; "
                "re-run the command that writes it"
            )
        for name, rec in m.files.items():
            check_file(path, name, rec, check)
        return cls(path, m)

    def file(self, name: str, check: Check = "size") -> Path:
        """Path of data file ``name``, checked against the manifest."""
        if name not in self.manifest.files:
            raise CorruptFileError(f"{self.path} has no data file {name!r}; it has {sorted(self.manifest.files)}")
        return check_file(self.path, name, self.manifest.files[name], check)

    def json(self, name: str, check: Check = "size") -> Any:
        """Data file ``name`` parsed as JSON (a garbled file raises naming it)."""
        return read_json(self.file(name, check))

    def tensors(self, name: str, check: Check = "size") -> dict[str, Any]:
        """The tensors of safetensors file ``name`` (a garbled file raises naming it)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        p = self.file(name, check)
        try:
            return load_file(str(p))
        except SafetensorError as e:
            raise CorruptFileError(f"{p} is not a readable safetensors file ({e}); {DAMAGED}") from None


DAMAGED = "the artifact is damaged; delete it and re-run the command that wrote it"


@contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Wrap a reader's use of its manifest and files: a key or value missing or of the wrong type (a damaged
    artifact, or one from another version) raises :class:`CorruptFileError` naming ``path``, not a bare error."""
    try:
        yield
    except ArtifactError:
        raise
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:
        raise CorruptFileError(f"{path} cannot be read ({type(e).__name__}: {e}); {DAMAGED}") from e


def write_artifact(
    out: str | Path,
    kind: str,
    format: int,
    config: Mapping[str, Any],
    inputs: Mapping[str, str],
    write_files: Callable[[Path], Mapping[str, int] | None],
    detail: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> ArtifactDir:
    """Write a whole artifact directory atomically.

    ``write_files(tmp_dir)`` writes the data files and may return their row counts (relative path ->
    rows). Every file it wrote is hashed into the manifest; the directory appears at ``out`` only
    when complete. An existing ``out`` is replaced only with ``replace=True``.
    """
    with atomic_dir(out, replace=replace) as tmp:
        rows = dict(write_files(tmp) or {})
        files = {}
        for p in sorted(q for q in tmp.rglob("*") if q.is_file()):
            rel = p.relative_to(tmp).as_posix()
            if rel != MANIFEST:
                files[rel] = file_record(p, rows.pop(rel, None))
        if rows:
            raise ValueError(f"write_files reported rows for files it did not write: {sorted(rows)}")
        manifest = Manifest(
            kind=kind, format=format, config=dict(config), inputs=dict(inputs), files=files, detail=dict(detail or {})
        )
        write_json(tmp / MANIFEST, manifest.to_dict())
    return ArtifactDir(Path(out), manifest)


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :func:`verify_artifact`: what was checked and every problem found."""

    path: Path
    kind: str | None
    format: int | None
    complete: bool
    files_checked: int
    bytes_checked: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = (
            f"{self.path}: {self.kind or 'unknown kind'} (format {self.format}), {self.files_checked} files, "
            f"{self.bytes_checked} bytes checked"
        )
        if self.ok:
            return head + ": OK"
        return head + f": {len(self.problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in self.problems)


def find_artifacts(root: str | Path) -> list[Path]:
    """``root`` if it is an artifact directory, else the artifact directories below it (a run directory's stages),
    not looking inside one; a directory below ``root`` holding none is listed too (it lost its manifest). Writers'
    temporaries (``.name.*.tmp``) and symlinked directories are skipped."""
    root = Path(root)
    if (root / MANIFEST).exists() or not root.is_dir():
        return [root]
    found: list[Path] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")):
        found += find_artifacts(sub) or [sub]
    return found


def verify_artifact(path: str | Path) -> VerifyReport:
    """Check every file of the artifact at ``path`` against its manifest's size and sha256.

    Never raises for a damaged artifact: problems are collected in the report (``report.ok``).
    """
    path = Path(path)
    try:
        m = read_manifest(path)
    except (ArtifactError, FileNotFoundError) as e:
        return VerifyReport(path, None, None, False, 0, 0, (str(e),))
    problems = []
    if m.kind not in ARTIFACT_FORMATS:
        problems.append(
            f"{path / MANIFEST}: unknown artifact kind {m.kind!r}; this reasonscope knows {sorted(ARTIFACT_FORMATS)}"
        )
    elif m.format != ARTIFACT_FORMATS[m.kind]:
        problems.append(
            f"{path / MANIFEST}: {m.kind} format {m.format}, this reasonscope reads format "
            f"{ARTIFACT_FORMATS[m.kind]}; recreate it with this version"
        )
    if not m.complete:
        problems.append(
            f"{path / MANIFEST} is not marked complete: the writing was cut short; re-run the command that writes it"
        )
    n = size = 0
    for name, rec in sorted(m.files.items()):
        try:
            check_file(path, name, rec, "hash")
            n, size = n + 1, size + rec.size
        except CorruptFileError as e:
            problems.append(str(e))
    return VerifyReport(path, m.kind, m.format, m.complete, n, size, tuple(problems))


@dataclass(frozen=True)
class JsonResult:
    """A result that is one JSON document (``result.json``) with the config it was computed under: kind
    ``json_result`` (its config's ``what`` names it, e.g. ``monitor``), or its own kind (``heads_eval``, ...)."""

    path: Path | None
    what: str
    result: Mapping[str, Any]
    config: Mapping[str, Any]

    def write(self, out: str | Path, inputs: Mapping[str, str], kind: str = "json_result") -> JsonResult:
        """Write the artifact atomically at ``out``; returns the result with its ``path``."""

        def files(tmp: Path) -> None:
            (tmp / "result.json").write_text(json.dumps(self.result, indent=1) + "\n", encoding="utf-8")

        write_artifact(out, kind, ARTIFACT_FORMATS[kind], {**dict(self.config), "what": self.what}, inputs, files)
        return JsonResult(Path(out), self.what, self.result, self.config)

    @classmethod
    def open(cls, path: str | Path, what: str | None = None, kind: str = "json_result") -> JsonResult:
        """Open a ``kind`` artifact holding ``result.json`` (``what``: refuse a ``json_result`` of another name)."""
        art = ArtifactDir.open(path, kind, ARTIFACT_FORMATS[kind], check="hash")  # one small file
        cfg = dict(art.manifest.config)
        found = str(cfg.get("what", kind))
        if what is not None and kind == "json_result" and found != what:
            raise ArtifactError(f"{path} holds a {found!r} result, not {what!r}; point at the {what} stage")
        return cls(Path(path), found, art.json("result.json"), cfg)
