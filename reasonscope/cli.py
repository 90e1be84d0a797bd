"""The ``reasonscope`` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Interpretability for reasoning language models.")
organism_app = typer.Typer(no_args_is_help=True, help="Train and evaluate the model organisms.")
traces_app = typer.Typer(no_args_is_help=True, help="Generate and grade reasoning traces.")
app.add_typer(organism_app, name="organism")
app.add_typer(traces_app, name="traces")
console = Console(stderr=True)


def _fail(msg: str) -> None:
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(2)


@organism_app.command("train")
def organism_train(
    out: Path = typer.Option(None, help="Output directory (default: the package's shipped weights)."),
    seed: int = 0,
    base_steps: Optional[int] = None,
    thinking_steps: Optional[int] = None,
    device: str = "auto",
    only: Optional[str] = typer.Option(None, help="Train just one organism: base | thinking."),
) -> None:
    """Train the base and thinking organisms (seeded per organism, reproducible)."""
    from .organisms.train import WEIGHTS_DIR, TrainConfig, train_organisms

    cfg = TrainConfig(seed=seed, device=device)
    cfg.base_steps = base_steps if base_steps is not None else cfg.base_steps
    cfg.thinking_steps = thinking_steps if thinking_steps is not None else cfg.thinking_steps
    if only not in (None, "base", "thinking"):
        _fail(f"--only must be 'base' or 'thinking', not {only!r}")
    paths = train_organisms(cfg, out or WEIGHTS_DIR, log=console.print, phases=(only,) if only else ("base", "thinking"))
    console.print("saved: " + ", ".join(str(p) for p in paths.values()))


@organism_app.command("eval")
def organism_eval(
    n: int = typer.Option(500, help="Held-out problems."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    models_dir: Optional[Path] = typer.Option(None, help="Directory holding thinking/ and base/ (default: shipped)."),
) -> None:
    """Accuracy by difficulty, thinking length and style mix of both organisms."""
    from .models import load_model
    from .organisms.evaluate import EvalConfig, evaluate_organisms

    src = (lambda k: str(models_dir / k)) if models_dir else (lambda k: f"organism:{k}")
    report = evaluate_organisms(load_model(src("thinking")), load_model(src("base")), EvalConfig(n_problems=n),
                                progress=not as_json)
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        console.print_json(json.dumps(report))


def _load_prompts(handle, dataset: str, n: Optional[int]):
    """``organism`` or ``<gsm8k|math>:<jsonl path or hub id>`` -> (prompts, ids, golds, grader, meta)."""
    if dataset == "organism":
        from .organisms import task

        problems = task.problems(n or 100, seed=7)
        return ([handle.chat_prompt(p.question) for p in problems], [p.uid for p in problems],
                [str(p.answer) for p in problems], "organism", [{"level": p.level} for p in problems])
    kind, _, where = dataset.partition(":")
    if kind not in ("gsm8k", "math") or not where:
        _fail(f"unknown dataset {dataset!r}; use 'organism', 'gsm8k:<path|hub id>' or 'math:<path|hub id>'")
    from .traces.loaders import load_hf_dataset

    fields = {"gsm8k": ("question", "answer"), "math": ("problem", "answer")}[kind]
    rows = load_hf_dataset(where, question_field=fields[0], answer_field=fields[1], dataset_kind=kind)[:n]
    return ([handle.chat_prompt(t.prompt, thinking=True) for t in rows], [t.id for t in rows],
            [t.gold for t in rows], kind, [{} for _ in rows])


@traces_app.command("generate")
def traces_generate(
    model: str = typer.Option(..., help="Local directory, hub id, or organism:thinking|base."),
    dataset: str = typer.Option("organism", help="'organism', 'gsm8k:<path>' or 'math:<path>'."),
    out: Path = typer.Option(..., help="Output JSONL (written atomically)."),
    n: Optional[int] = typer.Option(None, help="Number of problems."),
    max_new_tokens: int = 640,
    temperature: float = 0.0,
    batch_size: int = 32,
    seed: int = 0,
    dtype: str = "float32",
) -> None:
    """Generate, segment and grade traces; write them as JSONL."""
    from .models import load_model
    from .traces.generate import GenerationConfig, generate_traces
    from .traces.loaders import write_traces_jsonl

    handle = load_model(model, dtype=dtype)
    prompts, ids, golds, grader, metas = _load_prompts(handle, dataset, n)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed)
    traces = generate_traces(handle, prompts, cfg, ids=ids, golds=golds, grader=grader, source=model, progress=True,
                             min_chars=0 if grader == "organism" else 10)
    for t, m in zip(traces, metas):
        t.meta.update(m)
    write_traces_jsonl(out, traces)
    acc = sum(bool(t.grade) for t in traces) / max(1, len(traces))
    console.print(f"wrote {len(traces)} traces to {out}; accuracy {acc:.3f}; "
                  f"truncated {sum(t.truncated for t in traces)}")


@app.command()
def demo(
    n: int = typer.Option(100, help="Organism problems per model."),
    out: Path = typer.Option(Path("runs/demo"), help="Where the demo writes its artifacts."),
) -> None:
    """Generate, grade and summarise reasoning traces of the thinking and base organisms."""
    from .models import load_model
    from .organisms import task
    from .organisms.evaluate import EvalConfig, organism_traces, style_of, summarize, think_tokens
    from .traces.loaders import write_traces_jsonl

    problems = task.problems(n, seed=2024)
    cfg = EvalConfig(n_problems=n)
    table = Table(title=f"Model organisms on {n} held-out problems (greedy)")
    for col in ("model", "accuracy", *[f"L{k}" for k in task.LEVELS], "think tokens", "truncated"):
        table.add_column(col, justify="right")
    example = None
    for kind in ("thinking", "base"):
        handle = load_model(f"organism:{kind}")
        traces = organism_traces(handle, problems, 0.0, cfg, progress=True)
        write_traces_jsonl(out / f"traces_{kind}.jsonl", traces)
        s = summarize(traces)
        table.add_row(kind, f"{s['accuracy']:.2f}", *[f"{v:.2f}" for v in s["accuracy_by_difficulty"].values()],
                      f"{s['mean_think_tokens']:.0f}", f"{s['truncated_fraction']:.2f}")
        if kind == "thinking":
            example = max(traces, key=lambda t: (t.meta["level"] == 3, len(t.segments)))
    Console().print(table)
    if example is not None:
        Console().print(f"[bold]example[/bold] {example.id} ({style_of(example.thinking)}, "
                        f"{think_tokens(example)} thinking tokens, grade={example.grade}):")
        Console().print(f"  prompt: {example.prompt}")
        for s in example.segments[:8]:
            Console().print(f"  [{s.start:>3},{s.end:>3}) {s.text}")
        Console().print(f"  answer: {example.answer}  (gold {example.gold})")
    Console().print(f"traces written to {out}/")


def expand_hooks(patterns: str, valid: list[str]) -> list[str]:
    """Comma-separated names or globs (``blocks.*.hook_resid_post``) -> hook names, in model order."""
    import fnmatch

    out: list[str] = []
    for pat in [p.strip() for p in patterns.split(",") if p.strip()]:
        hits = [n for n in valid if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            from .hooks import parse_hook

            parse_hook(pat, int(valid[-1].split(".")[1]) + 1)  # raises with the valid names / layer range
        out += [h for h in hits if h not in out]
    return out


@app.command("capture")
def capture_cmd(
    model: str = typer.Option(..., help="Local directory, hub id, or organism:thinking|base."),
    traces: Path = typer.Option(..., help="Traces JSONL (from `reasonscope traces generate`)."),
    hooks: str = typer.Option("blocks.*.hook_resid_post", help="Comma-separated hook names or globs."),
    positions: str = typer.Option("think", help="all | think | segment_ends | last | spans"),
    out: Path = typer.Option(..., help="Activation store directory (resumed if it exists for this job)."),
    dtype: str = typer.Option("float32", help="Storage dtype: float32 | bfloat16 | float16."),
    model_dtype: str = typer.Option("float32", help="Compute dtype of the model."),
    backend: str = typer.Option("hf", help="hf | transformer_lens | nnsight"),
    device_map: Optional[str] = typer.Option(None, help="'auto' to spread a large model over GPUs."),
    token_budget: int = 8192,
    shard_size: int = 64,
    workers: int = typer.Option(0, help="Ray workers (0 = capture in this process)."),
) -> None:
    """Capture activations of traces into a sharded, resumable activation store."""
    from .capture import CaptureConfig, capture
    from .models import load_model
    from .traces.loaders import read_traces_jsonl

    rows = read_traces_jsonl(traces)
    attn = "eager" if "hook_pattern" in hooks else None
    handle = load_model(model, backend=backend, dtype=model_dtype, device_map=device_map, attn_implementation=attn)
    try:
        names = expand_hooks(hooks, handle.hook_names)
    except ValueError as e:
        _fail(str(e))
    cfg = CaptureConfig(hooks=names, positions=positions, dtype=dtype, token_budget=token_budget,
                        shard_size=shard_size)
    try:
        if workers > 0:
            from .distributed import capture_distributed

            load_kwargs = dict(backend=backend, dtype=model_dtype, attn_implementation=attn)
            store = capture_distributed(model, rows, cfg, str(out), num_workers=workers, load_kwargs=load_kwargs)
        else:
            store = capture(handle, rows, cfg, str(out), progress=True)
    except ValueError as e:
        _fail(str(e))
    console.print(f"store {out}: {len(store)} rows x {len(names)} hooks, {store.n_shards} shards, dtype {dtype}")


def main() -> None:  # pragma: no cover - console entry
    app()
