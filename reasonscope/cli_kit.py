"""Shared helpers of every ``reasonscope`` command (core and plugins): error handling, output and validation.

A user error is one ``error: ...`` line naming the fix and exit status 2 (:func:`fail`, or a ``ValueError``/
``OSError`` raised under an :class:`ErrorGroup`); an unexpected failure is one line and exit status 1.
``reasonscope --debug ...`` shows the traceback. The validators need no model, so commands call them first.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer
from typer.core import TyperGroup

if TYPE_CHECKING:  # pragma: no cover
    from typer._click.core import Context  # the click Context that typer vendors

    from .dtypes import DtypeName
    from .models import Geometry
    from .traces.record import Trace

C = TypeVar("C", bound=str)
T = TypeVar("T")
DTYPE_HELP = "Compute dtype of the model: float32 | bfloat16 | float16 (or alias)."
USER_ERRORS = (ValueError, OSError)  # bad input, missing or unwritable files, unloadable models


class ErrorGroup(TyperGroup):
    """Turns every exception under a command into one ``error:`` line, unless the root's ``--debug`` is set."""

    def invoke(self, ctx: Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except typer.TyperException as e:  # click's usage errors (typer vendors click)
            if ctx.find_root().params.get("debug"):
                raise
            sub = getattr(e, "ctx", None)
            where = sub.command_path if sub is not None else ctx.command_path
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            fail(f"{message} (see `{where} --help`)")
        except Exception as e:
            if ctx.find_root().params.get("debug"):
                raise
            if isinstance(e, USER_ERRORS):
                fail(str(e) or type(e).__name__)
            fail(f"internal error ({type(e).__name__}: {e}); rerun with --debug for the traceback and report it", 1)


def fail(msg: str, code: int = 2) -> NoReturn:
    """Print one ``error: msg`` line on stderr and exit with ``code`` (2: a user error)."""
    typer.secho("error:", fg="red", err=True, nl=False)
    typer.echo(f" {msg}", err=True)
    raise typer.Exit(code)


def say(msg: str) -> None:
    """A progress or report line on stderr (stdout is kept for ``--json`` output)."""
    typer.echo(msg, err=True)


def emit(obj: Any, as_json: bool) -> None:
    """``obj`` as strict JSON: on stdout with ``--json``, else indented on stderr."""
    text = json.dumps(obj, indent=1, allow_nan=False)
    typer.echo(text) if as_json else say(text)


# ---------------------------------------------------------------------------- validation (no model needed)


def choice(value: str, choices: Sequence[C], option: str) -> C:
    """The element of ``choices`` equal to ``value``, else a user error listing them."""
    for c in choices:
        if c == value:
            return c
    fail(f"{option} {value!r} is not one of {', '.join(choices)}")


def floats(text: str, option: str, example: str = "0.5,1,2") -> tuple[float, ...]:
    """Comma-separated numbers, else a user error (also when there are none)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        fail(f"{option} {text!r}: give comma-separated numbers, e.g. {example}")
    if not values:
        fail(f"{option} is empty; give comma-separated numbers, e.g. {example}")
    return values


def check_writable(target: Path, option: str) -> None:
    """Fail unless files can be created at ``target`` (a directory, or the nearest one that exists)."""
    anc = target
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        fail(f"{option} {target}: {anc} is a file, not a directory; choose another {option}")
    try:
        with tempfile.TemporaryFile(dir=anc):
            pass
    except OSError as e:
        fail(f"{option} {target} is not writable ({e.strerror or e}); choose a writable location for {option}")


def out_file(path: Path, option: str = "--out", example: str = "traces.jsonl", overwrite: bool = True) -> Path:
    """An output file path whose directory is writable (an existing file only with ``overwrite``)."""
    if path.is_dir():
        fail(f"{option} {path} is a directory; give a file path, e.g. {path / example}")
    if path.exists() and not overwrite:
        fail(f"{option} {path} already exists; choose another path, or pass --overwrite to replace it")
    check_writable(path.parent if str(path.parent) else Path("."), option)
    return path


def out_dir(path: Path, option: str = "--out") -> Path:
    """An output directory (new or existing) at a writable location."""
    if path.exists() and not path.is_dir():
        fail(f"{option} {path} is a file; give a directory path")
    check_writable(path, option)
    return path


def fresh_out(path: Path, option: str = "--out") -> Path:
    """An output directory that must not exist yet, at a writable location (nothing is written on bad input)."""
    if path.exists():
        fail(f"{option} {path} already exists; delete it or choose another path")
    return out_dir(path, option)


def model_geometry(model: str, option: str = "--model") -> Geometry:
    """Resolve a model option (``option`` names it in errors) and read its config (no weights): fails fast on a
    missing or broken model."""
    from .models import load_geometry

    try:
        return load_geometry(model)
    except OSError as e:
        raise type(e)(f"{option}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a broken config.json is a user error naming the model
        raise ValueError(
            f"{option} {model}: cannot read its config ({e}); pass a directory holding a valid Hugging Face config.json"
        ) from None


def organism_format(model: str) -> bool:
    """Whether ``model`` speaks the organism task's chat format (``organism:*``, or a directory whose tokenizer has
    the organisms' chat markers), so that organism problems are questions it can answer."""
    if model.startswith("organism:"):
        return True
    path = Path(model).expanduser()
    if not path.is_dir():
        return False  # a hub id: a real model
    from transformers import AutoTokenizer

    from .organisms.tokenizer import speaks_organism

    return speaks_organism(AutoTokenizer.from_pretrained(path))


def organism_only(model: str, option: str, fix: str) -> None:
    """Refuse organism problems for a model that does not speak their format, naming ``fix``."""
    if not organism_format(model):
        fail(f"{option} {model}: the default questions are the organism task's, which this model does not speak; {fix}")


def device_option(value: str, option: str = "--device") -> str:
    """``auto`` or a device torch knows (``cpu``, ``cuda``, ``cuda:1``, ``mps``), else a user error naming it."""
    if value != "auto":
        import torch

        try:
            torch.device(value)
        except RuntimeError:
            fail(f"{option} {value!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    return value


def dtype_option(value: str, option: str) -> DtypeName:
    """A dtype name or alias (``bf16``, ``float32``, ...), else a user error naming ``option``."""
    from .dtypes import dtype_name

    try:
        return dtype_name(value)
    except ValueError as e:
        fail(f"{option}: {e}")


def configured(cls: Callable[..., T], **fields: Any) -> T:
    """``cls(**fields)``: a stage's frozen config whose fields are the command's options of the same names. A value
    its ``__post_init__`` refuses is raised as a user error prefixed by the options its message names
    (``--epsilon: epsilon must be > 0, got -1.0``), so ``--debug`` still shows where it came from."""
    try:
        return cls(**fields)
    except ValueError as e:
        named = [f"--{k.replace('_', '-')}" for k in fields if re.search(rf"\b{k}\b", str(e))]
        if not named:
            raise
        raise ValueError(f"{', '.join(named)}: {e}") from e


def opened(opener: Callable[[Path], T], path: Path, option: str) -> T:
    """``opener(path)`` (an artifact's ``open``); its error, naming the file and the fix, prefixed by the option
    (raised as a user error, so ``--debug`` still shows where it came from)."""
    from .artifacts import ArtifactError

    try:
        return opener(path)
    except (ArtifactError, OSError, ValueError) as e:
        message = f"{option} {path}: {e}" if str(path) not in str(e) else f"{option}: {e}"
        raise (OSError if isinstance(e, OSError) else ValueError)(message) from e


def read_traces(path: Path, option: str = "--traces") -> list[Trace]:
    """The non-empty traces JSONL at ``path``, else a user error saying how to generate one."""
    from .traces.loaders import read_traces_jsonl

    if not path.exists():
        fail(f"{option} {path} does not exist; generate traces with `reasonscope traces generate --out {path}`")
    rows = read_traces_jsonl(path)
    if not rows:
        fail(f"{option} {path} holds no traces; generate some with `reasonscope traces generate --out {path}`")
    lines: dict[str, int] = {}
    for n, t in enumerate(rows, 1):  # every stage keys traces by id: two files concatenated repeat them
        if t.id in lines:
            fail(f"{option} {path}: trace id {t.id!r} on record {n} repeats record {lines[t.id]}; ids must be unique")
        lines[t.id] = n
    return rows


DATASETS = {"gsm8k": ("question", "answer"), "math": ("problem", "answer")}


def dataset_source(dataset: str) -> tuple[str, str | None]:
    """A checked ``--dataset`` (``organism`` or ``<gsm8k|math>:<JSON(L) path or hub id>``) -> (grader, where),
    ``where`` None for the organism task; nothing is loaded."""
    if dataset == "organism":
        return "organism", None
    kind, _, where = dataset.partition(":")
    if kind not in DATASETS or not where:
        fail(f"--dataset {dataset!r}: use 'organism', 'gsm8k:<path|hub id>' or 'math:<path|hub id>'")
    local = Path(where).expanduser()
    if (local.suffix in (".json", ".jsonl") or where.startswith((".", "/", "~"))) and not local.is_file():
        fail(f"--dataset {dataset!r}: {local} is not a file; pass an existing JSON(L) file or a hub id")
    return kind, str(local) if local.is_file() else where


def dataset_rows(dataset: str, n: int | None = None) -> tuple[str, list[Trace] | None]:
    """``--dataset`` -> (grader, its first ``n`` question rows, or None for the organism task)."""
    kind, where = dataset_source(dataset)
    if where is None:
        return kind, None
    from .traces.loaders import load_hf_dataset  # loads `datasets`: only when a dataset is named

    q, a = DATASETS[kind]
    rows = load_hf_dataset(where, question_field=q, answer_field=a, dataset_kind=kind)[:n]
    if not rows:
        fail(f"--dataset {dataset!r} holds no problems")
    return kind, rows
