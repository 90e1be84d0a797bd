"""The artifacts the demo adds (``trace_set``, ``vector_exports``; results as core ``JsonResult``) and the run layout.

A run directory holds one artifact directory per stage (see :data:`STAGE_DIRS`). :class:`RunDir` opens each
through its own ``open`` API and, for a stage that is not there, raises :class:`MissingStage` naming the command
that writes it, so the explorer and the notebooks show what to run instead of a traceback.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from reasonscope.artifacts import (
    ARTIFACT_FORMATS,
    MANIFEST,
    ArtifactDir,
    ArtifactError,
    IncompleteArtifactError,
    JsonResult,
    read_manifest,
    reading,
    write_artifact,
)
from reasonscope.traces.loaders import read_traces_jsonl, write_traces_jsonl
from reasonscope.traces.record import Trace

if TYPE_CHECKING:  # pragma: no cover
    from probes.labels import LabelTable
    from probes.probeset import ProbeSet
    from reasonscope.heads.headmap import HeadMap
    from reasonscope.store import ActivationStore
    from steering.vector import SteeringVector

__all__ = ["STAGE_COMMANDS", "STAGE_DIRS", "Exports", "Family", "JsonResult", "MissingStage", "RunDir", "TraceSet"]

TRACE_SET, VECTOR_EXPORTS = "trace_set", "vector_exports"
M = TypeVar("M")  # a family's member: HeadMap, ProbeSet
MODELS_ENV = "REASONSCOPE_MODELS"  # JSON {"thinking": source, "dtype": name} from `reasonscope app --model`
TRACES_JSONL = "traces.jsonl"  # a run on your own model: its traces, as `traces generate --out` writes them
SUFFIX = {"gguf": ".gguf", "easysteer": ".easysteer.gguf", "safetensors": ".safetensors"}

# stage -> artifact directory inside a run directory
STAGE_DIRS: dict[str, str] = {
    "traces": "traces",
    "capture": "capture",
    "heads": "heads",  # one head_map per scorer: heads/<method>
    "heads_eval": "heads_eval",
    "labels": "labels",
    "probes": "probes",  # one probe_set per target: probes/<target>
    "monitor": "monitor",
    "asc": "asc",
    "hybrid": "hybrid",
    "exports": "exports",
}


# stage -> the command that writes it into a run on your own model (M: the model, D: a graded dataset; {model}: M
# with its --dtype when `reasonscope app --model/--dtype` named them; {map} / {probes}: a member the run holds)
STAGE_COMMANDS: dict[str, str] = {
    "traces": "reasonscope traces generate {model} --dataset D --out {run}/traces.jsonl",
    "capture": "reasonscope capture {model} --traces {run}/traces.jsonl {capture} --out {run}/capture",
    "heads": "reasonscope heads score {model} --traces {run}/traces.jsonl --method {member} --out {run}/heads/{member}",
    "heads_eval": "reasonscope heads eval {model} --map {run}/heads/{map} --dataset D --out {run}/heads_eval",
    "labels": "reasonscope probe labels --traces {run}/traces.jsonl {model} --forced --out {run}/labels",
    "probes": "reasonscope probe fit --store {run}/capture --labels {run}/labels --target {member} "
    "--out {run}/probes/{member}",
    "monitor": "reasonscope probe monitor {model} --probes {run}/probes/{probes} --dataset D --out {run}/monitor",
    "asc": "reasonscope steer asc {model} --pairs-file PAIRS --dataset D --out {run}/asc",
    "hybrid": "reasonscope steer hybrid --base B {thinking} --dataset D --out {run}/hybrid",
    "exports": "reasonscope export --in {run}/asc --format gguf --out {run}/exports/asc.gguf",
}
CAPTURE_DEFAULT = "--positions segment_ends"  # what a new capture records (a resumed one: what its store recorded)


FAMILIES = {"heads": "duo", "probes": "correct"}  # stages of one artifact a method or target: the default member
MEMBER_OF = {"heads_eval": ("map", "heads"), "monitor": ("probes", "probes")}  # command field, family it reads
RESUMABLE = ("capture",)  # stages whose writer resumes or repairs what is there: never "delete it first"


class MissingStage(LookupError):
    """A stage's artifact is absent or unusable; ``str()`` says so and ``command`` is what writes it: the demo for a
    demo run, the stage's own command for a run on your own model."""

    def __init__(
        self,
        stage: str,
        run: Path,
        why: str = "",
        own_model: bool = False,
        damaged: Path | None = None,
        fill: Mapping[str, str] | None = None,
    ) -> None:
        """``fill``: the command's fields a :class:`RunDir` knows (its model, members, a store's settings)."""
        self.stage, self.run, self.damaged = stage, run, damaged
        member = damaged.name if damaged is not None and stage in FAMILIES else FAMILIES.get(stage, "")
        fields = {
            "model": "--model M",
            "thinking": "--thinking M",
            "capture": CAPTURE_DEFAULT,
            "map": FAMILIES["heads"],
            "probes": FAMILIES["probes"],
            **(fill or {}),
        }
        command = STAGE_COMMANDS[stage].format(run=shlex.quote(str(run)), member=member, **fields)
        self.command = command if own_model else f"reasonscope demo --out {shlex.quote(str(run))}"
        detail = f" ({why})" if why else ""
        reuse = "" if own_model else " (finished stages are reused)"
        if damaged is not None:  # its writer refuses to replace it: say to delete it first
            super().__init__(
                f"this run's '{stage}' stage cannot be read{detail}; delete {damaged}, then write it again with "
                f"`{self.command}`{reuse}"
            )
        else:
            super().__init__(f"this run has no usable '{stage}' stage{detail}; write it with `{self.command}`{reuse}")


# ---------------------------------------------------------------------------- trace_set


@dataclass(frozen=True)
class TraceSet:
    """Graded traces of several models on the same problems (``traces[model]``) with their summaries."""

    path: Path | None
    traces: Mapping[str, list[Trace]]
    summary: Mapping[str, Any]

    def write(self, out: str | Path, config: Mapping[str, Any], inputs: Mapping[str, str]) -> TraceSet:
        """Write a ``trace_set`` artifact (``<model>.jsonl`` and ``summary.json``) atomically."""

        def files(tmp: Path) -> dict[str, int]:
            for name, rows in self.traces.items():
                write_traces_jsonl(tmp / f"{name}.jsonl", rows)
            (tmp / "summary.json").write_text(json.dumps(self.summary, indent=1) + "\n", encoding="utf-8")
            return {f"{name}.jsonl": len(rows) for name, rows in self.traces.items()}

        cfg = {**dict(config), "models": list(self.traces)}
        write_artifact(out, TRACE_SET, ARTIFACT_FORMATS[TRACE_SET], cfg, inputs, files)
        return TraceSet(Path(out), self.traces, self.summary)

    @classmethod
    def open(cls, path: str | Path) -> TraceSet:
        """A ``trace_set`` artifact, or a JSONL of one model's traces (``traces generate --out RUN/traces.jsonl``),
        which becomes the ``thinking`` traces."""
        if Path(path).is_file():
            from reasonscope.organisms.evaluate import summarize

            rows = read_traces_jsonl(path)
            if not rows:
                raise ValueError(f"{path} holds no trace")
            return cls(Path(path), {"thinking": rows}, {"thinking": summarize(rows)})
        art = ArtifactDir.open(path, TRACE_SET, ARTIFACT_FORMATS[TRACE_SET])
        with reading(path):
            traces = {m: read_traces_jsonl(art.file(f"{m}.jsonl")) for m in art.manifest.config["models"]}
            return cls(Path(path), traces, art.json("summary.json"))


# ---------------------------------------------------------------------------- vector_exports


@dataclass(frozen=True)
class Exports:
    """Serving files of one steering vector: ``files[format]`` -> paths (``gguf``, ``easysteer``, ``safetensors``)."""

    path: Path
    files: Mapping[str, list[Path]]

    @classmethod
    def write(cls, vec: SteeringVector, out: str | Path, stem: str, formats: Sequence[str]) -> Exports:
        """Export ``vec`` in every format into a ``vector_exports`` artifact at ``out``."""
        from steering.export import export_vector

        written: dict[str, list[str]] = {}

        def files(tmp: Path) -> None:
            for fmt in formats:
                paths = export_vector(vec, tmp / f"{stem}{SUFFIX[fmt]}", fmt)  # type: ignore[arg-type]
                written[fmt] = [p.name for p in paths]

        cfg = {"stem": stem, "formats": list(formats), "vector": vec.meta.to_dict()}
        inputs = {"model": vec.meta.model_hash} if vec.meta.model_hash else {}
        write_artifact(out, VECTOR_EXPORTS, ARTIFACT_FORMATS[VECTOR_EXPORTS], cfg, inputs, files, detail=written)
        return cls.open(out)

    @classmethod
    def open(cls, path: str | Path) -> Exports:
        """A ``vector_exports`` artifact, or a directory of files ``reasonscope export --out DIR/NAME`` wrote (no
        manifest: each file is read back as a vector, so a damaged one raises naming it)."""
        if Path(path).is_dir() and not (Path(path) / MANIFEST).exists():
            return cls._exported(Path(path))
        art = ArtifactDir.open(path, VECTOR_EXPORTS, ARTIFACT_FORMATS[VECTOR_EXPORTS], check="hash")
        written = art.manifest.detail  # format -> file names, recorded when written
        with reading(path):
            return cls(Path(path), {fmt: [art.file(n) for n in names] for fmt, names in written.items()})

    @classmethod
    def _exported(cls, path: Path) -> Exports:
        from steering.export import load_vector, spec_path

        files: dict[str, list[Path]] = {}
        for p in sorted(path.iterdir()):
            if p.name.startswith(".") or not p.is_file() or p.name.endswith(".steering.json"):
                continue
            load_vector(p)  # a vector file, whole, whatever its name
            with open(p, "rb") as f:
                gguf = f.read(4) == b"GGUF"
            spec = spec_path(p)  # an EasySteer export's request beside its GGUF
            fmt = ("easysteer" if spec.is_file() else "gguf") if gguf else "safetensors"
            files.setdefault(fmt, []).extend([p, spec] if fmt == "easysteer" else [p])
        if not files:
            raise IncompleteArtifactError(
                f"{path} has no {MANIFEST} and no exported vector in it; write one with "
                f"`reasonscope export --in ... --out {path}/NAME.gguf`"
            )
        return cls(path, files)


# ---------------------------------------------------------------------------- the run directory


def _finished(p: Path) -> bool:
    """A member directory a writer finished (not its ``.name.*.tmp``), by its manifest's mark."""
    if not p.is_dir() or p.name.startswith("."):
        return False
    try:
        return read_manifest(p).complete
    except (ArtifactError, OSError, ValueError):
        return False


def _capture_settings(store: Path) -> str:
    """The options of the capture that wrote ``store`` (hooks, positions, storage dtype, shard size, backend), so
    the command shown resumes it instead of being refused as another job; the defaults when it cannot be read."""
    from reasonscope.store.reader import read_store_manifest

    try:
        m = read_store_manifest(store)
    except (ArtifactError, OSError, ValueError):
        return CAPTURE_DEFAULT
    opts = f"--hooks {','.join(m.hooks)} --positions {m.positions} --dtype {m.dtype} --shard-size {m.shard_size}"
    return opts + (f" --backend {m.backend}" if m.backend not in ("", "hf") else "")


class Family(dict[str, M]):
    """A stage's members that open (head maps by method, probe sets by target), by name; ``damaged``: each member
    that cannot be read, as the :class:`MissingStage` that says what to delete and rerun."""

    def __init__(self, members: Mapping[str, M], damaged: Mapping[str, MissingStage]) -> None:
        super().__init__(members)
        self.damaged = dict(damaged)


class RunDir:
    """A run directory; every stage method returns the stage's opened artifact or raises :class:`MissingStage`.

    A demo run (``reasonscope demo``) holds every stage; a run on your own model (``own_model``) holds what its
    stage commands wrote there (:data:`STAGE_COMMANDS`), its traces as ``traces.jsonl``."""

    def __init__(self, path: str | Path, own_model: bool = False, sources: Mapping[str, str] | None = None) -> None:
        """``sources``: the model a run on your own model was made with (``{"thinking": source, "dtype": name}``,
        as ``reasonscope app --model/--dtype`` gave it), which the commands it shows then name."""
        self.path = Path(path)
        self.own_model = own_model
        self.sources = dict(sources or {})

    def stage_path(self, stage: str, *sub: str) -> Path:
        path = self.path.joinpath(STAGE_DIRS[stage], *sub)
        jsonl = self.path / TRACES_JSONL
        return jsonl if stage == "traces" and not sub and not path.exists() and jsonl.is_file() else path

    def command(self, stage: str) -> str:
        """The command that writes ``stage`` into this run."""
        return self._missing(stage).command

    def _missing(self, stage: str, why: str = "", damaged: Path | None = None) -> MissingStage:
        return MissingStage(stage, self.path, why, self.own_model, damaged, self._fill(stage))

    def _fill(self, stage: str) -> dict[str, str]:
        """The command fields this run knows: its model and dtype, the members it holds, a store's own settings."""
        out: dict[str, str] = {}
        if "thinking" in self.sources:
            dtype = self.sources.get("dtype", "float32")
            flag = "--model-dtype" if stage == "capture" else "--dtype"  # capture's --dtype is the storage dtype
            given = "" if dtype == "float32" else f" {flag} {dtype}"
            out["model"] = f"--model {shlex.quote(self.sources['thinking'])}{given}"
            out["thinking"] = f"--thinking {shlex.quote(self.sources['thinking'])}{given}"
        if stage in MEMBER_OF:  # a command that reads one member of a family: one the run holds
            field, family = MEMBER_OF[stage]
            root = self.stage_path(family)
            held = sorted(p.name for p in root.iterdir() if _finished(p)) if root.is_dir() else []
            if held and FAMILIES[family] not in held:
                out[field] = held[0]
        if stage == "capture" and (self.stage_path("capture") / MANIFEST).is_file():
            out["capture"] = _capture_settings(self.stage_path("capture"))
        return out

    def _open(self, stage: str, fn: Any, path: Path) -> Any:
        if not path.exists():
            raise self._missing(stage)
        try:
            return fn(path)
        except (ArtifactError, OSError, KeyError, ValueError) as e:
            # the other writers refuse a directory that is there; `reasonscope export` writes single files into it
            rewrites = stage in RESUMABLE or (stage == "exports" and self.own_model)
            damaged = None if rewrites else path
            raise self._missing(stage, f"{type(e).__name__}: {e}", damaged) from e

    def has(self, stage: str) -> bool:
        return self.stage_path(stage).exists()

    def traces(self) -> TraceSet:
        return self._open("traces", TraceSet.open, self.stage_path("traces"))

    def store(self) -> ActivationStore:
        from reasonscope.store import ActivationStore

        return self._open("capture", ActivationStore.open, self.stage_path("capture"))

    def _family(self, stage: str, fn: Callable[[Path], M]) -> Family[M]:
        """The artifacts of a stage with one subdirectory per method or target, by name; a member that cannot be
        read is set aside in ``damaged`` and the others are still shown. A writer's temporary (``.name.*.tmp``: a
        job still running, or killed) is not a member; no member that opens raises (the first damaged one's)."""
        root = self.stage_path(stage)
        if not root.is_dir():
            raise self._missing(stage)
        subs = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        if not subs:
            raise self._missing(stage, f"{root} holds no finished artifact")
        members: dict[str, M] = {}
        damaged: dict[str, MissingStage] = {}
        for p in subs:
            try:
                members[p.name] = self._open(stage, fn, p)
            except MissingStage as e:
                damaged[p.name] = e
        if not members:
            raise next(iter(damaged.values()))
        return Family(members, damaged)

    def head_maps(self) -> Family[HeadMap]:
        from reasonscope.heads.headmap import HeadMap

        return self._family("heads", HeadMap.open)

    def heads_eval(self) -> JsonResult:
        return self._open("heads_eval", lambda p: JsonResult.open(p, kind="heads_eval"), self.stage_path("heads_eval"))

    def labels(self) -> LabelTable:
        from probes.labels import LabelTable

        return self._open("labels", LabelTable.open, self.stage_path("labels"))

    def probe_sets(self) -> Family[ProbeSet]:
        from probes.probeset import ProbeSet

        return self._family("probes", ProbeSet.open)

    def monitor(self) -> JsonResult:
        return self._open("monitor", lambda p: JsonResult.open(p, "monitor"), self.stage_path("monitor"))

    def asc(self) -> tuple[SteeringVector, dict[str, Any]]:
        """The ASC vector and its report (γ sweep, baseline, chosen γ)."""
        from steering.vector import KIND, REPORT_FILE, SteeringVector

        def both(p: Path) -> tuple[SteeringVector, dict[str, Any]]:
            art = ArtifactDir.open(p, KIND, ARTIFACT_FORMATS[KIND], check="hash")
            return SteeringVector.open(p), art.json(REPORT_FILE)

        return self._open("asc", both, self.stage_path("asc"))

    def exports(self) -> Exports:
        return self._open("exports", Exports.open, self.stage_path("exports"))

    def hybrid(self) -> Any:
        """The hybrid steering run (``steering.hybrid.HybridRun``), when that module is installed."""
        try:
            from steering.hybrid import HybridRun  # type: ignore[import-not-found,unused-ignore]
        except ImportError as e:
            raise self._missing("hybrid", "steering.hybrid is not available in this install") from e
        return self._open("hybrid", HybridRun.open, self.stage_path("hybrid"))
