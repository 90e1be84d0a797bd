"""The ``reasonscope`` command line.

Every command validates its arguments, input files and output location before it loads a model or
starts generating. A user error is one ``error: ...`` line naming the fix and exit status 2; an
unexpected failure is one line and exit status 1. ``reasonscope --debug ...`` shows the traceback.
"""

from __future__ import annotations

import json
import signal
import threading
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Optional

import typer

from .cli_kit import (
    DTYPE_HELP,
    ErrorGroup,
    choice,
    configured,
    dataset_rows,
    device_option,
    dtype_option,
    fail,
    model_geometry,
    organism_only,
    out_dir,
    out_file,
    read_traces,
    say,
)
from .heads.cli import heads_app

PLUGIN_GROUP = "reasonscope.commands"  # entry points: a typer.Typer (a command group) or a function (a command)

app = typer.Typer(
    cls=ErrorGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Interpretability for reasoning language models.",
)
organism_app = typer.Typer(no_args_is_help=True, help="Train and evaluate the model organisms.")
traces_app = typer.Typer(no_args_is_help=True, help="Generate and grade reasoning traces.")
app.add_typer(organism_app, name="organism")
app.add_typer(traces_app, name="traces")
app.add_typer(heads_app, name="heads")


def mount_plugins(root: typer.Typer, group: str = PLUGIN_GROUP) -> list[str]:
    """Mount every entry point of ``group`` on ``root``; one that fails to load is skipped with a warning.

    Returns the names mounted. Core never imports the plugin packages (``probes``, ``steering``, ``app``) itself.
    """
    mounted = []
    for ep in entry_points(group=group):
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not take the core CLI down
            say(f"warning: reasonscope plugin {ep.name!r} ({ep.value}) not loaded: {type(e).__name__}: {e}")
            continue
        if isinstance(obj, typer.Typer):
            root.add_typer(obj, name=ep.name)
        elif callable(obj):
            root.command(ep.name)(obj)
        else:
            say(f"warning: reasonscope plugin {ep.name!r} ({ep.value}) is neither a typer.Typer nor a function")
            continue
        mounted.append(ep.name)
    return mounted


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error.")) -> None:
    """Interpretability for reasoning language models."""
    if threading.current_thread() is threading.main_thread():  # (a CliRunner in a worker thread cannot)
        signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C (exit 143): atomic writes remove their temporaries, hooks come off."""
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------------------- organism


@organism_app.command("train")
def organism_train(
    out: Path = typer.Option(
        ...,
        help="Output directory, e.g. runs/organisms (the package's shipped weights only when named: "
        "reasonscope/organisms/weights).",
    ),
    seed: int = typer.Option(1, help="Training seed (the shipped organisms: 1)."),
    base_steps: Optional[int] = typer.Option(None, min=1),
    thinking_steps: Optional[int] = typer.Option(None, min=1),
    device: str = "auto",
    only: Optional[str] = typer.Option(None, help="Train just one organism: base | thinking."),
) -> None:
    """Train the base and thinking organisms (seeded per organism, reproducible); logs progress."""
    from .organisms.train import TrainConfig, train_organisms

    phases = (choice(only, ("base", "thinking"), "--only"),) if only else ("base", "thinking")
    target = out_dir(out)
    steps = {"base_steps": base_steps, "thinking_steps": thinking_steps}
    cfg = TrainConfig(seed=seed, device=device_option(device), **{k: v for k, v in steps.items() if v is not None})
    paths = train_organisms(cfg, target, log=say, phases=phases)
    say("saved: " + ", ".join(str(p) for p in paths.values()))


@organism_app.command("eval")
def organism_eval(
    n: int = typer.Option(500, min=1, help="Held-out problems."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    models_dir: Optional[Path] = typer.Option(None, help="Directory holding thinking/ and base/ (default: shipped)."),
) -> None:
    """Accuracy by difficulty, thinking length and style mix of both organisms (progress on stderr)."""
    from .models import load_model
    from .organisms.evaluate import EvalConfig, evaluate_organisms

    if models_dir is not None and not models_dir.is_dir():
        fail(f"--models-dir {models_dir} is not a directory; pass one holding thinking/ and base/")
    sources = {k: str(models_dir / k) if models_dir else f"organism:{k}" for k in ("thinking", "base")}
    for src in sources.values():
        model_geometry(src, "--models-dir" if models_dir else "--model")
    report = evaluate_organisms(
        load_model(sources["thinking"]), load_model(sources["base"]), EvalConfig(n_problems=n), progress=True
    )
    text = json.dumps(report, indent=1)
    typer.echo(text) if as_json else say(text)


# ---------------------------------------------------------------------------- traces


@traces_app.command("generate")
def traces_generate(
    model: str = typer.Option(..., help="Local directory, hub id, or organism:thinking|base."),
    dataset: str = typer.Option("organism", help="'organism', 'gsm8k:<path>' or 'math:<path>'."),
    out: Path = typer.Option(..., help="Output JSONL (written atomically)."),
    n: Optional[int] = typer.Option(
        None, min=1, help="Number of problems (default: 100 organism problems, or every dataset row)."
    ),
    max_new_tokens: int = typer.Option(1024, min=1),
    temperature: float = typer.Option(0.0, min=0.0),
    samples: int = typer.Option(
        1, min=1, help="Traces per problem (needs --temperature > 0); ids get '#s<k>', meta problem_id the problem's."
    ),
    batch_size: int = typer.Option(32, min=1),
    seed: int = 0,
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """Generate, segment and grade traces; write them as JSONL."""
    out_file(out, overwrite=overwrite)
    if samples > 1 and temperature <= 0:
        fail(f"--samples {samples} with greedy decoding gives {samples} identical traces; pass --temperature > 0")
    model_dtype = dtype_option(dtype, "--dtype")
    model_geometry(model)
    grader, rows = dataset_rows(dataset, n)
    if rows is None:
        organism_only(model, "--model", "pass --dataset gsm8k:<path> or math:<path>")

    from .models import load_model
    from .traces.generate import GenerationConfig, generate_traces
    from .traces.loaders import write_traces_jsonl

    handle = load_model(model, dtype=model_dtype)
    if rows is None:
        from .organisms import task

        problems = task.problems(n or 100, seed=7)
        prompts = [handle.chat_prompt(p.question) for p in problems]
        ids = [p.uid for p in problems]
        golds: list[str | None] = [str(p.answer) for p in problems]
        metas: list[dict[str, Any]] = [{"level": p.level} for p in problems]
    else:
        prompts = [handle.chat_prompt(t.prompt, thinking=True) for t in rows]
        ids, metas = [t.id for t in rows], [{} for _ in rows]
        golds = [t.gold for t in rows]
    if samples > 1:  # each request samples its own stream: (seed, request index)
        metas = [{**m, "problem_id": i, "sample": k} for i, m in zip(ids, metas) for k in range(samples)]
        ids = [f"{i}#s{k}" for i in ids for k in range(samples)]
        prompts = [p for p in prompts for _ in range(samples)]
        golds = [g for g in golds for _ in range(samples)]
    cfg = configured(
        GenerationConfig, max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed
    )
    traces = generate_traces(
        handle,
        prompts,
        cfg,
        ids=ids,
        golds=golds,
        grader=grader,
        source=model,
        progress=True,
        min_chars=0 if grader == "organism" else 10,
    )
    for t, m in zip(traces, metas):
        t.meta.update(m)
    write_traces_jsonl(out, traces)
    acc = sum(bool(t.grade) for t in traces) / max(1, len(traces))
    say(f"wrote {len(traces)} traces to {out}; accuracy {acc:.3f}; truncated {sum(t.truncated for t in traces)}")


# ---------------------------------------------------------------------------- capture


@app.command("capture")
def capture_cmd(
    model: str = typer.Option(..., help="Local directory, hub id, or organism:thinking|base."),
    traces: Path = typer.Option(..., help="Traces JSONL (from `reasonscope traces generate`)."),
    hooks: str = typer.Option(
        "blocks.*.hook_resid_post",
        help="Comma-separated hook names or patterns: "
        "'blocks.*.hook_resid_post', 'hook_resid_post' (every layer), 'blocks.2-5.attn.hook_z'.",
    ),
    positions: str = typer.Option("think", help="all | think | segment_ends | last | spans"),
    out: Path = typer.Option(..., help="Activation store directory (resumed if it exists for this job)."),
    dtype: str = typer.Option("float32", help="Storage dtype: float32 | bfloat16 | float16 (or fp32, bf16, fp16)."),
    model_dtype: str = typer.Option("float32", help="Compute dtype of the model (same names)."),
    backend: str = typer.Option("hf", help="hf | transformer_lens | nnsight"),
    device_map: Optional[str] = typer.Option(None, help="'auto' to spread a large model over GPUs."),
    token_budget: int = typer.Option(8192, min=1, help="Padded tokens per forward batch."),
    shard_size: int = typer.Option(64, min=1, help="Traces per store shard."),
    workers: int = typer.Option(0, min=0, help="Ray workers (0 = capture in this process); one GPU each on CUDA."),
    address: Optional[str] = typer.Option(
        None, help="With --workers: the Ray cluster to join ('auto', host:port; default $RAY_ADDRESS, else start one)."
    ),
) -> None:
    """Capture activations of traces into a sharded, resumable activation store."""
    from .capture import CaptureConfig
    from .hooks import needs_eager, select_hooks
    from .models import BACKENDS
    from .store import POSITION_RULES

    out_dir(out)
    backend_name = choice(backend, BACKENDS, "--backend")
    rule = choice(positions, POSITION_RULES, "--positions")
    store_dtype, compute_dtype = dtype_option(dtype, "--dtype"), dtype_option(model_dtype, "--model-dtype")
    geometry = model_geometry(model)
    try:
        names = select_hooks(hooks, geometry.n_layers)
    except ValueError as e:
        fail(f"--hooks: {e}")
    rows = read_traces(traces)
    if (out / "manifest.json").is_file():  # resuming: what the manifest says can be refused before a model loads
        from .store.reader import read_store_manifest

        try:
            old = read_store_manifest(out)
        except ValueError as e:
            fail(str(e))
        if set(old.hooks) != set(names) or old.positions != rule:
            fail(
                f"store at {out} has hooks {sorted(old.hooks)} and positions {old.positions!r}; this job asks for "
                f"{sorted(names)} and {rule!r}: write a new store elsewhere (--out) or delete {out}"
            )
        if old.dtype != store_dtype or old.shard_size != shard_size:
            fail(
                f"store at {out} has --dtype {old.dtype} and --shard-size {old.shard_size}; this job asks for "
                f"{store_dtype} and {shard_size}: resume with those, or write a new store elsewhere (--out) or "
                f"delete {out}"
            )
    attn = "eager" if needs_eager(names) else None
    cfg = configured(
        CaptureConfig,
        hooks=tuple(names),
        positions=rule,
        dtype=store_dtype,
        token_budget=token_budget,
        shard_size=shard_size,
    )
    load_kwargs: dict[str, Any] = {"backend": backend_name, "dtype": compute_dtype, "attn_implementation": attn}
    if workers > 0:
        import importlib.util

        from .distributed import INSTALL, capture_distributed

        if device_map is not None:
            fail("--device-map places one model over devices; with --workers each worker holds its own copy: drop one")
        if importlib.util.find_spec("ray") is None:
            fail(f"--workers needs Ray: {INSTALL} (or capture in one process without --workers)")
        store = capture_distributed(  # a GPU a worker where the Ray instance has GPUs (Ray sets each one's device)
            model, rows, cfg, str(out), workers, num_gpus_per_worker=None, load_kwargs=load_kwargs, address=address
        )
    else:
        from .capture import capture
        from .models import load_model

        store = capture(load_model(model, device_map=device_map, **load_kwargs), rows, cfg, str(out), progress=True)
    say(f"store {out}: {len(store)} rows x {len(names)} hooks, {store.n_shards} shards, dtype {store_dtype}")


# ---------------------------------------------------------------------------- verify


@app.command()
def verify(
    path: Path = typer.Argument(..., help="An artifact directory (activation store, organism, ...) or a run of them."),
) -> None:
    """Check every file of an artifact, or of every artifact in a run directory, against its manifest (sizes and
    sha256); exit 2 on any problem."""
    from .artifacts import find_artifacts, verify_artifact

    if not path.exists():
        fail(f"{path} does not exist; pass an artifact directory (one holding manifest.json) or a run directory")
    roots = find_artifacts(path) or [path]  # none found: the report says the directory has no manifest.json
    reports = [verify_artifact(r) for r in roots]
    text = "\n".join(map(str, reports))
    if not all(r.ok for r in reports):
        fail(text)
    say(text)


mount_plugins(app)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
