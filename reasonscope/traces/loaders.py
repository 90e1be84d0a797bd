"""Reading and writing traces: JSONL, the Thought Anchors layout, HF datasets, the R1 tokenizer."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..artifacts import atomic_file
from .grading import canonical_number, get_grader
from .record import THINK_END, THINK_START, Trace

# ---------------------------------------------------------------------------- JSONL


def numbered_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` per non-blank line; errors name file and line."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist; pass an existing JSONL file") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory; pass a JSONL file") from None
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{lineno}: not UTF-8 text (a binary file?); pass a JSONL file") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield one dict per non-blank line; a bad line raises ``ValueError`` naming file and line."""
    for _, record in numbered_records(path):
        yield record


def write_traces_jsonl(path: str | Path, traces: Iterable[Trace]) -> None:
    """Write one trace per line; the file appears only once every trace is written."""
    with atomic_file(path, "w") as f:
        for t in traces:
            f.write(json.dumps(t.to_dict(), ensure_ascii=False) + "\n")


_REQUIRED = [
    f.name
    for f in dataclasses.fields(Trace)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
]


def read_traces_jsonl(path: str | Path) -> list[Trace]:
    """Read traces written by :func:`write_traces_jsonl`; errors name file, line and field."""
    traces = []
    for lineno, d in numbered_records(path):
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(f"{path}:{lineno}: trace record is missing required field(s) {missing}")
        try:
            traces.append(Trace.from_dict(d))
        except (TypeError, ValueError) as e:  # unknown field or a malformed segment
            raise ValueError(f"{path}:{lineno}: invalid trace record ({e})") from None
    return traces


# ---------------------------------------------------------------------------- Thought Anchors

_CHUNK_FIELDS = (
    "chunk",
    "chunk_idx",
    "function_tags",
    "depends_on",
    "accuracy",
    "resampling_importance_accuracy",
    "resampling_importance_kl",
    "counterfactual_importance_accuracy",
    "counterfactual_importance_kl",
    "forced_importance_accuracy",
    "forced_importance_kl",
    "different_trajectories_fraction",
    "overdeterminedness",
    "summary",
)


def _split_cot(full_cot: str) -> tuple[str, str, str, bool]:
    """``full_cot -> (prompt, thinking, answer, truncated)``; the prompt keeps ``<think>`` + newline."""
    i = full_cot.find(THINK_START)
    if i < 0:
        raise ValueError("no <think> marker in full_cot")
    cut = i + len(THINK_START)
    if full_cot.startswith("\n", cut):
        cut += 1
    prompt, rest = full_cot[:cut], full_cot[cut:]
    if THINK_END not in rest:
        return prompt, rest, "", True
    thinking, answer = rest.split(THINK_END, 1)
    return prompt, thinking, answer, False


def load_thought_anchors(root: str | Path) -> list[Trace]:
    """One trace per ``<model>/<correct|incorrect>_base_solution/problem_<n>/base_solution.json``.

    Ids look like ``"deepseek-r1-distill-llama-8b/correct/problem_330"``; ``meta["chunks"]``
    holds the labelled chunks (text, tags, dependencies, importance scores) when present.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; pass the thought-anchors root (it holds <model>/...)")
    grader = get_grader("math")
    traces = []
    found = sorted(root.glob("*/*/problem_*/base_solution.json"))
    if not found:
        raise ValueError(
            f"{root} holds no <model>/<correct|incorrect>_base_solution/problem_<n>/base_solution.json; pass the "
            "thought-anchors root (one level above the model directories)"
        )

    def read(path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable JSON ({e}); restore it or remove its problem directory") from None

    for base in found:
        pdir = base.parent
        model, group = pdir.parent.parent.name, pdir.parent.name.removesuffix("_base_solution")
        sol, problem = read(base), read(pdir / "problem.json")
        try:
            prompt, thinking, answer, truncated = _split_cot(sol["full_cot"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{base}: cannot split full_cot ({e})") from None
        chunks_file = pdir / "chunks_labeled.json"
        chunks = read(chunks_file) if chunks_file.exists() else []
        if "gt_answer" not in problem:
            raise ValueError(f"{pdir / 'problem.json'} has no 'gt_answer'; every problem needs its gold answer")
        gold = str(problem["gt_answer"])
        traces.append(
            Trace(
                id=f"{model}/{group}/{pdir.name}",
                prompt=prompt,
                thinking=thinking,
                answer=answer,
                gold=gold,
                grade=grader.is_correct(grader.extract(answer), gold),
                truncated=truncated,
                source="thought_anchors",
                meta={
                    "model": model,
                    "problem": problem["problem"],
                    "level": problem.get("level"),
                    "type": problem.get("type"),
                    "reported_answer": sol.get("answer"),
                    "reported_is_correct": sol.get("is_correct"),
                    "chunks": [{k: c[k] for k in _CHUNK_FIELDS if k in c} for c in chunks],
                },
            )
        )
    return traces


# ---------------------------------------------------------------------------- HF datasets


def load_hf_dataset(
    name_or_path: str | Path,
    split: str = "test",
    question_field: str = "question",
    answer_field: str = "answer",
    dataset_kind: str = "gsm8k",
) -> list[Trace]:
    """Prompt-only traces (thinking and answer empty) from a hub dataset or a local JSON(L) file.

    ``gold`` is the grader's extraction of ``answer_field`` for ``gsm8k`` and the raw field
    otherwise (MATH answers are already extracted).
    """
    import datasets

    grader = get_grader(dataset_kind)
    path = Path(name_or_path)
    if path.suffix in (".json", ".jsonl") and path.exists():
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a local file: nothing to download, no bar
        try:
            ds = datasets.load_dataset("json", data_files={split: str(path)}, split=split)
        finally:
            if bars:
                datasets.enable_progress_bars()
        stem = path.parent.name or path.stem
        split = path.stem  # gsm8k/train.jsonl: ids gsm8k/train/<row>, never colliding with gsm8k/test.jsonl's
    else:
        try:
            ds = datasets.load_dataset(str(name_or_path), split=split)
        except (OSError, ValueError) as e:  # unreachable hub, unknown name or file, missing split
            local = "" if path.exists() else " (no such local file)"
            raise OSError(
                f"{name_or_path}{local} could not be loaded as a hub dataset ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); pass a local .json/.jsonl file (on the command line "
                "--dataset gsm8k:<path> or math:<path>)"
            ) from e
        stem = str(name_or_path).rstrip("/").split("/")[-1]
    for field in (question_field, answer_field):
        if field not in ds.column_names:
            raise ValueError(f"{name_or_path}: no field {field!r}; fields are {ds.column_names}")
    traces = []
    for i, row in enumerate(ds):
        raw = str(row[answer_field])
        gold = (grader.extract(raw) or canonical_number(raw)) if dataset_kind == "gsm8k" else raw  # "#### 18" or "18"
        if gold is None:
            raise ValueError(
                f"{name_or_path}: row {i} field {answer_field!r} holds no GSM8K answer ('#### <number>' or a number): "
                f"{raw[-80:]!r}; name the answer field (answer_field=...) or the dataset's kind"
            )
        meta = {k: v for k, v in row.items() if k not in (question_field, answer_field)}
        meta["raw_answer"] = raw
        traces.append(
            Trace(
                id=f"{stem}/{row.get('unique_id') or row.get('id')}"
                if row.get("unique_id") or row.get("id") is not None
                else f"{stem}/{split}/{i}",
                prompt=str(row[question_field]),
                thinking="",
                answer="",
                gold=gold,
                source=f"{dataset_kind}:{name_or_path}",
                meta=meta,
            )
        )
    return traces


# ---------------------------------------------------------------------------- tokenizer

# DeepSeek-R1-Distill-Qwen added tokens, ids 151643.. in order, with their ``special`` flag.
R1_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<｜end▁of▁sentence｜>", True),
    ("<｜User｜>", False),
    ("<｜Assistant｜>", False),
    ("<｜begin▁of▁sentence｜>", True),
    ("<|EOT|>", False),
    ("<think>", False),
    ("</think>", False),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
R1_FIRST_ADDED_ID = 151643


def qwen2_tokenizer(path: str | Path) -> Any:
    """The DeepSeek-R1-Distill-Qwen tokenizer from Qwen2 ``vocab.json`` + ``merges.txt``.

    Qwen's own added tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` at
    151643-151645) are not loaded; the R1 added tokens take ids 151643-151664 instead.
    No BOS is prepended (the real R1 tokenizer prepends ``<｜begin▁of▁sentence｜>``).
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    path = Path(path)
    missing = [name for name in ("vocab.json", "merges.txt") if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} has no {' or '.join(missing)}; pass a directory holding Qwen2's tokenizer files"
        )
    eos, bos = R1_ADDED_TOKENS[0][0], R1_ADDED_TOKENS[3][0]
    # BPE reads vocab and merges from their files; EOS (R1's first added token) is the one special token passed
    # at construction, so it takes id 151643
    tok = Qwen2Tokenizer(
        vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"), unk_token=eos, eos_token=eos, pad_token=eos
    )
    tok.unk_token = None  # R1 has no unknown token (BPE never emits one); an unknown name must not map to EOS
    n_vocab = tok.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    if n_vocab != R1_FIRST_ADDED_ID:
        raise ValueError(f"{path}/vocab.json has {n_vocab} tokens, expected {R1_FIRST_ADDED_ID}")
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in R1_ADDED_TOKENS])
    tok.add_special_tokens({"bos_token": bos, "eos_token": eos, "pad_token": eos})
    ids = tok.convert_tokens_to_ids([t for t, _ in R1_ADDED_TOKENS])
    expected = list(range(R1_FIRST_ADDED_ID, R1_FIRST_ADDED_ID + len(R1_ADDED_TOKENS)))
    if ids != expected:
        raise RuntimeError(f"added-token ids came out as {ids}, expected {expected}")
    return tok
