"""``steer`` commands (``asc``, ``apply``: ``reasonscope steer``) and ``export_cmd`` (``reasonscope export``).

Same rules as :mod:`reasonscope.cli`: arguments, input files and the output location are checked before a model
loads; a user error is one ``error:`` line and exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from reasonscope.cli_kit import (
    DTYPE_HELP,
    ErrorGroup,
    choice,
    configured,
    emit,
    fail,
    floats,
    fresh_out,
    model_geometry,
    organism_format,
    organism_only,
    out_file,
    say,
)

if TYPE_CHECKING:  # the commands import what they run: `reasonscope --help` does not load torch
    from .vector import SteeringVector

steer_app = typer.Typer(
    cls=ErrorGroup,
    no_args_is_help=True,
    help="Steer reasoning: ASC compression, hybrid base/thinking steering, apply a vector.",
)


def _vector(src: Path, option: str, layer: Optional[int] = None, key: Optional[str] = None) -> SteeringVector:
    if not src.exists():
        fail(f"{option} {src} does not exist; pass a steering_vector directory or a .gguf/.safetensors/.pt file")
    from .export import load_vector

    return load_vector(src, layer=layer, key=key)


def _layer_list(text: str) -> tuple[int, ...]:
    values = floats(text, "--layers", "0,1,2") if text.strip() else ()
    if any(v != int(v) or v < 0 for v in values):
        fail(f"--layers {text!r}: give comma-separated block numbers >= 0, e.g. 0,1,2")
    return tuple(int(v) for v in values)


@steer_app.command("asc")
def asc_cmd(
    model: str = typer.Option("organism:thinking", help="The thinking model (organism:thinking or a directory)."),
    out: Path = typer.Option(..., help="Write the steering_vector artifact (with report.json) here."),
    pairs_file: Optional[Path] = typer.Option(
        None, help="Your model's pairs: JSONL rows {question | prompt, concise, verbose} (thinking texts)."
    ),
    dataset: str = typer.Option(
        "organism", help="Questions: 'organism', 'gsm8k:<path>' or 'math:<path>' (selection rows, then test rows)."
    ),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    layer: int = typer.Option(2, min=0, help="Block whose output is read and steered."),
    layers: str = typer.Option("", help="Candidate blocks, comma-separated: chosen with γ on the selection split."),
    reduce: str = typer.Option("last", help="Extraction position: last (ASC) | mean (over the text)."),
    extract_at: str = typer.Option("end", help="Read at the end of question+CoT (paper) | start (its first token)."),
    vector: str = typer.Option("mean_diff", help="mean_diff (the paper) | learned (under a KL trust region)."),
    positions: str = typer.Option("last", help="last (every forward pass, ASC) | prompt (its last token only)."),
    learn_steps: int = typer.Option(150, min=1, help="learned: optimisation steps."),
    kl_weight: float = typer.Option(30.0, min=0.0, help="learned: weight of the KL trust region."),
    learn_micro_batch: Optional[int] = typer.Option(
        None, min=1, help="learned: pairs per forward pass (default: sized to 512 MiB of log-probs)."
    ),
    n_pairs: int = typer.Option(64, min=1, help="Questions for generated pairs (styles, efficiency)."),
    pairs: str = typer.Option(
        "styles", help="styles (the organism's concise vs verbose) | efficiency (shortest vs longest correct)."
    ),
    k_samples: int = typer.Option(4, min=2, help="efficiency pairs: samples per question."),
    epsilon: float = typer.Option(1e-3, help="KL budget of the strength rule."),
    sweep: str = typer.Option("0.5,1,2,4", help="Fixed strengths to evaluate, comma-separated."),
    gamma_rule: str = typer.Option("sweep", help="Strength the artifact carries: kl_bound | sweep (best within loss)."),
    n_eval: int = typer.Option(300, min=1, help="Held-out test problems (baseline, KL-bound and selected γ)."),
    n_select: int = typer.Option(200, min=1, help="Selection-split problems (the sweep chooses layer and γ here)."),
    temperature: float = typer.Option(1.0, min=0.0),
    seed: int = typer.Option(0),
    max_new_tokens: int = typer.Option(1024, min=1),
    batch_size: int = typer.Option(64, min=1),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Extract the concise − verbose vector, choose γ (KL bound, sweep) and report length and accuracy vs γ.

    On the organisms by default; on any model with --pairs-file (its concise and verbose thinking) or --pairs
    efficiency, and --dataset (the first --n-select rows choose γ, the next --n-eval test it).
    """
    from reasonscope.cli_kit import dataset_rows, dataset_source, dtype_option

    from .asc import EXTRACT_CHOICES, GAMMA_CHOICES, PAIR_CHOICES, VECTOR_CHOICES, ASCConfig, read_pairs, run_asc
    from .learned import LEARN_POSITIONS

    fresh_out(out)
    model_dtype = dtype_option(dtype, "--dtype")
    grader, dataset_at = dataset_source(dataset)
    cfg = configured(
        ASCConfig,
        layer=layer,
        layers=_layer_list(layers),
        reduce=choice(reduce, ("last", "mean"), "--reduce"),
        extract_at=choice(extract_at, EXTRACT_CHOICES, "--extract-at"),
        vector=choice(vector, VECTOR_CHOICES, "--vector"),
        positions=choice(positions, LEARN_POSITIONS, "--positions"),
        learn_steps=learn_steps,
        kl_weight=kl_weight,
        learn_micro_batch=learn_micro_batch,
        n_pairs=n_pairs,
        pairs=choice(pairs, PAIR_CHOICES, "--pairs"),
        k_samples=k_samples,
        epsilon=epsilon,
        sweep=floats(sweep, "--sweep"),
        gamma_rule=choice(gamma_rule, GAMMA_CHOICES, "--gamma-rule"),
        n_eval=n_eval,
        n_select=n_select,
        temperature=temperature,
        seed=seed,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        grader=grader,
    )
    if pairs_file is not None:
        if not pairs_file.is_file():
            fail(f"--pairs-file {pairs_file} is not a file; write JSONL rows {{question, concise, verbose}}")
        read_pairs(pairs_file, str)  # checks every row before the model loads
    g = model_geometry(model)
    for x in cfg.layers or (layer,):
        if x >= g.n_layers:
            where = f"--layers {layers}: layer {x}" if cfg.layers else f"--layer {x}"
            fail(f"{where} does not exist in {model} (layers 0..{g.n_layers - 1})")
    if (dataset_at is None or (pairs_file is None and cfg.pairs == "styles")) and not organism_format(model):
        if dataset_at is None:
            organism_only(model, "--model", "pass --dataset gsm8k:<path>")
        fail(
            f"--model {model}: styles pairs are the organism task's; pass --pairs-file with your model's "
            "concise and verbose thinking, or --pairs efficiency"
        )
    _, rows = dataset_rows(dataset, n_select + n_eval + (n_pairs if cfg.pairs == "efficiency" else 0))
    if rows is not None and len(rows) < n_select + n_eval:
        fail(f"--dataset {dataset!r} has {len(rows)} rows, fewer than --n-select {n_select} + --n-eval {n_eval}")
    from reasonscope.models import load_model

    from .questions import dataset_questions

    handle = load_model(model, dtype=model_dtype)
    pairs_given = None if pairs_file is None else read_pairs(pairs_file, lambda q: handle.chat_prompt(q, thinking=True))
    questions = None
    if rows is not None:
        questions = dataset_questions(handle, rows)
    emit(run_asc(handle, cfg, out, progress=True, pairs=pairs_given, questions=questions), as_json)


@steer_app.command("hybrid")
def hybrid_cmd(
    base: str = typer.Option("organism:base", help="The base model (steered; emits every token)."),
    thinking: str = typer.Option("organism:thinking", help="The thinking model (decides when and which)."),
    out: Path = typer.Option(..., help="Write the hybrid_run artifact here."),
    sae_layer: int = typer.Option(2, min=0, help="Thinking-model block read for behaviours."),
    steer_layer: int = typer.Option(0, min=0, help="Base-model block whose output is steered."),
    n_latents: int = typer.Option(8, min=2, help="SAE latents (behaviours)."),
    labels: str = typer.Option("sae", help="Behaviour labels: sae (unsupervised) | annotated (known types)."),
    vectors: str = typer.Option("optimised", help="optimised | mean_diff."),
    selector: str = typer.Option("probe", help="Which behaviour: probe (on the thinking model) | sae (argmax)."),
    coefficients: str = typer.Option("0.25,0.5", help="Guardrail strengths, comma-separated."),
    n_train: int = typer.Option(256, min=2, help="Training problems (thinking rollouts)."),
    train_steps: int = typer.Option(100, min=0),
    n_eval: int = typer.Option(300, min=1, help="Held-out organism problems."),
    temperature: float = typer.Option(1.0, min=0.0),
    seed: int = typer.Option(0),
    max_new_tokens: int = typer.Option(512, min=1),
    batch_size: int = typer.Option(64, min=1),
    controls: bool = typer.Option(True, help="Also run the random-behaviour and random-vector controls."),
    dataset: str = typer.Option(
        "organism", help="'organism', or 'gsm8k:<path>' / 'math:<path>': the first --n-eval rows, then --n-train."
    ),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Hybrid steering: the thinking model picks when and which behaviour, the base is steered; gap recovered."""
    from reasonscope.cli_kit import dataset_rows, dataset_source, dtype_option

    from .hybrid import LABELS, SELECTORS, VECTORS, HybridConfig

    fresh_out(out)
    model_dtype = dtype_option(dtype, "--dtype")
    grader, _ = dataset_source(dataset)
    cfg = configured(
        HybridConfig,
        sae_layer=sae_layer,
        steer_layer=steer_layer,
        n_latents=n_latents,
        labels=choice(labels, LABELS, "--labels"),
        vectors=choice(vectors, VECTORS, "--vectors"),
        selector=choice(selector, SELECTORS, "--selector"),
        coefficients=floats(coefficients, "--coefficients"),
        n_train=n_train,
        train_steps=train_steps,
        n_eval=n_eval,
        temperature=temperature,
        seed=seed,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        controls=controls,
        grader=grader,
    )
    gb, gt = model_geometry(base, "--base"), model_geometry(thinking, "--thinking")
    if steer_layer >= gb.n_layers:
        fail(f"--steer-layer {steer_layer} does not exist in {base} (layers 0..{gb.n_layers - 1})")
    if sae_layer >= gt.n_layers:
        fail(f"--sae-layer {sae_layer} does not exist in {thinking} (layers 0..{gt.n_layers - 1})")
    if dataset == "organism":
        organism_only(thinking, "--thinking", "pass --dataset gsm8k:<path>")
    _, rows = dataset_rows(dataset, n_eval + n_train)
    if rows is not None and len(rows) < n_eval + 2:
        fail(f"--dataset {dataset!r} has {len(rows)} rows; --n-eval {n_eval} of them leave fewer than 2 to train on")
    from reasonscope.models import load_model

    from .hybrid import run_hybrid
    from .questions import dataset_questions

    bh, th = load_model(base, dtype=model_dtype), load_model(thinking, dtype=model_dtype)
    if rows is None:
        run = run_hybrid(bh, th, None, cfg, out)
    else:
        qs = dataset_questions(th, rows)
        run = run_hybrid(bh, th, None, cfg, out, questions=qs[:n_eval], train_questions=qs[n_eval:])
    emit(run.summary, as_json)


@steer_app.command("apply")
def apply_cmd(
    vector: Path = typer.Option(..., "--vector", help="A steering_vector directory or an importable vector file."),
    model: str = typer.Option(..., help="Model to steer (local directory, hub id or organism:thinking|base)."),
    prompt: list[str] = typer.Option([], help="Question(s), formatted with the chat template (repeatable)."),
    n: int = typer.Option(0, min=0, help="Also steer this many graded questions (see --dataset)."),
    dataset: str = typer.Option(
        "organism", help="--n's questions: 'organism', or the first rows of 'gsm8k:<path>' or 'math:<path>'."
    ),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    gamma: Optional[float] = typer.Option(None, help="Strength (default: the vector's)."),
    positions: Optional[str] = typer.Option(None, help="last | all | generated | prompt (default: the vector's)."),
    layer: Optional[int] = typer.Option(None, help="Steer only this layer of the vector."),
    key: Optional[str] = typer.Option(None, help="Behaviour of a .pt dict of vectors."),
    max_new_tokens: int = typer.Option(1024, min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="Sampling temperature (0: greedy)."),
    seed: int = typer.Option(0, help="Sampling seed: plain and steered draw the same stream."),
    as_json: bool = typer.Option(False, "--json", help="Print the completions as JSON on stdout."),
) -> None:
    """Generate with and without the vector; print the texts (and, with --n, accuracy and thinking tokens)."""
    if not prompt and n == 0:
        fail("nothing to generate: give --prompt TEXT (repeatable) or --n N graded questions")
    from reasonscope.cli_kit import dataset_rows, dataset_source, dtype_option

    from .vector import POSITIONS

    model_dtype = dtype_option(dtype, "--dtype")
    grader, dataset_at = dataset_source(dataset)
    rule = None if positions is None else choice(positions, POSITIONS, "--positions")
    vec = _vector(vector, "--vector", layer, key)
    if gamma is None and vec.meta.gamma_rule == "imported":
        note = vec.meta.recipe.get("note")
        fail(f"--vector {vector} records no strength (an imported file); give --gamma" + (f" ({note})" if note else ""))
    g = model_geometry(model)
    if g.d_model != vec.meta.d_model or max(vec.layers) >= g.n_layers:
        fail(
            f"--vector {vector} (width {vec.meta.d_model}, layers {list(vec.layers)}) does not fit {model} "
            f"(d_model {g.d_model}, layers 0..{g.n_layers - 1}); use a vector extracted from this model"
        )
    if n and dataset_at is None:
        organism_only(model, "--model", "pass --dataset gsm8k:<path> for --n")
    rows = dataset_rows(dataset, n)[1] if n else None
    from reasonscope.generation import DecodeConfig, generate
    from reasonscope.models import load_model

    h = load_model(model, dtype=model_dtype)
    vec.check_model(h)
    report: dict[str, Any] = {
        "gamma": vec.meta.gamma if gamma is None else gamma,
        "positions": rule or vec.meta.positions,
    }
    if prompt:
        prompts = [h.chat_prompt(p, thinking=True) for p in prompt]
        cfg = DecodeConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        plain = generate(h, prompts, cfg)
        with vec.apply(h, gamma=gamma, positions=rule):
            steered = generate(h, prompts, cfg)
        tok = h.tokenizer
        report["completions"] = [
            {"prompt": p, "plain": tok.decode(a.token_ids), "steered": tok.decode(b.token_ids)}
            for p, a, b in zip(prompt, plain, steered)
        ]
    if n:
        from reasonscope.organisms import task
        from reasonscope.organisms.evaluate import EVAL_SEED, summarize

        from .questions import answer_questions, dataset_questions, organism_questions

        if rows is None:
            questions = organism_questions(h, task.problems(n, EVAL_SEED))
        else:
            questions = dataset_questions(h, rows)
        report["plain"] = summarize(answer_questions(h, questions, grader, temperature, seed, max_new_tokens))
        with vec.apply(h, gamma=gamma, positions=rule):
            report["steered"] = summarize(answer_questions(h, questions, grader, temperature, seed, max_new_tokens))
    emit(report, as_json)


def export_cmd(
    src: Path = typer.Option(..., "--in", help="A steering_vector directory, or a .gguf/.safetensors/.pt vector."),
    format: str = typer.Option(..., "--format", help="gguf (llama.cpp) | easysteer | safetensors."),
    out: Path = typer.Option(..., help="Output file."),
    layer: Optional[int] = typer.Option(None, help="Export only this layer (required for an ASC .pt of rows)."),
    key: Optional[str] = typer.Option(None, help="Behaviour of a .pt dict of vectors."),
    model_hint: Optional[str] = typer.Option(None, help="controlvector.model_hint (default: the model's type)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out file (never the --in file)."),
) -> None:
    """Export a steering vector for serving (llama.cpp, EasySteer/vLLM) or as safetensors."""
    from .export import FORMATS, export_vector, spec_path

    fmt = choice(format, FORMATS, "--format")
    if out.resolve() == src.resolve():
        fail(f"--out {out} is the --in file; write the export to another path")
    example = f"vector.{'safetensors' if fmt == 'safetensors' else 'gguf'}"
    out_file(out, example=example, overwrite=overwrite)
    if fmt == "easysteer":  # its request is written beside the GGUF
        out_file(spec_path(out), example=example, overwrite=overwrite)
    vec = _vector(src, "--in", layer, key)
    for path in export_vector(vec, out, fmt, model_hint):
        say(f"wrote {path}")
    if fmt == "gguf" and vec.meta.positions != "all":
        say(
            f"note: llama.cpp adds a control vector at every token; this vector's γ was set for "
            f"positions={vec.meta.positions!r}, so serve it with a strength checked for that"
        )
