"""``reasonscope heads``: score KV heads, diff base vs thinking heads, evaluate compressed generation.

Arguments, input artifacts and output locations are checked before a model loads; user errors are
``ValueError``/``OSError`` with a message naming the fix, which the root CLI prints as one ``error:`` line
(exit status 2). Problems are organism-task problems (``--n``, ``--seed``, ``--levels``) unless
``--traces`` gives graded traces of the model (``score``) or ``--dataset`` a graded question set (``eval``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, cast

import typer

from ..artifacts import JsonResult
from ..cli_kit import (
    DTYPE_HELP,
    choice,
    dtype_option,
    emit,
    floats,
    fresh_out,
    model_geometry,
    opened,
    organism_only,
    read_traces,
    say,
)

if TYPE_CHECKING:  # pragma: no cover
    from .score import Method

heads_app = typer.Typer(no_args_is_help=True, help="Reasoning-critical KV heads: score, diff, evaluate.")
SCORE_METHODS = ("window", "gate-ig", "duo", "rlkv", "retrieval")


def _levels(value: str) -> tuple[int, ...]:
    from ..organisms.task import LEVELS

    try:
        levels = tuple(int(x) for x in value.split(","))
    except ValueError:
        raise ValueError(f"--levels {value!r}: give comma-separated levels from {sorted(LEVELS)}, e.g. 3,4") from None
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise ValueError(f"--levels {value!r}: unknown level(s) {bad}; choose from {sorted(LEVELS)}")
    return levels


def _sparsities(value: str) -> tuple[float, ...]:
    sps = floats(value, "--sparsities", "0,0.25,0.5,0.75")
    bad = [sp for sp in sps if not 0.0 <= sp <= 1.0]
    if bad:
        raise ValueError(f"--sparsities: {bad} outside [0, 1]; a sparsity is the fraction of KV heads compressed")
    return sps


def _window(sink: Optional[int], recent: Optional[int]) -> Any:
    from .policy import CompressionPolicy

    if (sink is None) != (recent is None):
        raise ValueError("give both --sink and --recent, or neither (the window is then scaled to the traces)")
    return None if sink is None or recent is None else CompressionPolicy(sink, recent)


def _own_traces(handle: Any, n: int, seed: int, levels: tuple[int, ...], max_new_tokens: int) -> list[Any]:
    """The model's graded greedy traces on organism problems."""
    from ..organisms import task
    from ..traces.generate import GenerationConfig, generate_traces

    probs = task.problems(n, seed=seed, levels=levels)
    return generate_traces(
        handle,
        [handle.chat_prompt(p.question) for p in probs],
        GenerationConfig(max_new_tokens=max_new_tokens),
        golds=[str(p.answer) for p in probs],
        grader="organism",
    )


def _questions(handle: Any, rows: list[Any] | None, n: int, seed: int, levels: tuple[int, ...]) -> tuple[list, list]:
    """(prompts, golds): ``n`` organism problems at ``levels`` (``rows`` None), else the dataset rows, opening the
    thinking in ``handle``'s chat format."""
    if rows is None:
        from ..organisms import task

        probs = task.problems(n, seed=seed, levels=levels)
        return [handle.chat_prompt(p.question) for p in probs], [str(p.answer) for p in probs]
    return [handle.chat_prompt(t.prompt, thinking=True) for t in rows], [str(t.gold) for t in rows]


def _policy_for(traces: list[Any], given: Any) -> Any:
    from .evaluate import check_window, window_for

    generated = [len(t.token_ids) - t.think_span[0] for t in traces if t.think_span is not None]
    if given is None:
        return window_for(generated)
    try:
        check_window(given, generated)
    except ValueError as e:  # an explicit window is the user's call; the context check still refuses a useless one
        say(f"warning: {e}")
    return given


@heads_app.command("score")
def score(
    model: str = typer.Option(..., help="Model directory, hub id or organism:NAME."),
    method: str = typer.Option("window", help="window | gate-ig | duo | rlkv | retrieval."),
    out: Path = typer.Option(..., help="Output head-map artifact directory (must not exist)."),
    traces: Optional[Path] = typer.Option(None, help="Graded JSONL traces of this model (default: organism)."),
    n: int = typer.Option(48, min=1, help="Organism problems to trace when --traces is not given."),
    levels: str = typer.Option("3,4", help="Organism levels."),
    seed: int = 0,
    sink: Optional[int] = typer.Option(None, min=0, help="Sink tokens (default: scaled to the traces)."),
    recent: Optional[int] = typer.Option(None, min=0, help="Recent tokens (default: scaled to the traces)."),
    steps: Optional[int] = typer.Option(None, min=1, help="IG steps / Duo steps / RLKV steps."),
    duo_loss: str = typer.Option("kl", help="Duo: kl (next-token distributions) | mse (final hidden states)."),
    max_new_tokens: int = typer.Option(512, min=1),
    rlkv_lr: float = typer.Option(0.05, min=0.0, help="RLKV: AdamW learning rate of the gates."),
    rlkv_beta: float = typer.Option(0.05, min=0.0, help="RLKV: sparsity penalty scale β."),
    rlkv_tau: float = typer.Option(0.5, help="RLKV: the penalty is on only while the mean reward is above τ."),
    rlkv_temperature: float = typer.Option(
        0.0, min=0.0, help="RLKV rollouts: 0 = greedy (organisms loop when sampled)."
    ),
    rlkv_budget_s: Optional[float] = typer.Option(840.0, min=1.0, help="RLKV: stop after this many seconds."),
    rlkv_max_think: Optional[int] = typer.Option(None, min=1, help="RLKV: train on problems solved within this."),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON on stdout."),
) -> None:
    """Score every KV head (higher = keep a full cache) and write a head-map artifact."""
    from dataclasses import replace

    from .rlkv import RLKVConfig
    from .score import HeadConfig, score_heads

    choice(method, SCORE_METHODS, "--method")
    from .scorers import DUO_LOSSES

    loss = choice(duo_loss, DUO_LOSSES, "--duo-loss")
    model_dtype = dtype_option(dtype, "--dtype")
    given = _window(sink, recent)
    lv = _levels(levels)
    fresh_out(out)
    given_rows = read_traces(traces) if traces is not None else None  # checked before the model loads
    model_geometry(model)
    if traces is None:
        organism_only(model, "--model", "pass --traces (its graded traces: reasonscope traces generate --dataset ...)")
    from ..models import load_model

    h = load_model(model, dtype=model_dtype)
    rows = given_rows if given_rows is not None else _own_traces(h, n, seed, lv, max_new_tokens)
    policy = _policy_for(rows, given)
    cfg = HeadConfig(
        method=cast("Method", method),
        sink=policy.sink,
        recent=policy.recent,
        rlkv=RLKVConfig(
            steps=60,
            prompts_per_step=16,
            samples_per_prompt=1 if rlkv_temperature == 0 else 4,
            lr=rlkv_lr,
            beta=rlkv_beta,
            tau=rlkv_tau,
            temperature=rlkv_temperature,
            max_new_tokens=min(max_new_tokens, 384),  # an organism's level-3 verbose thinking: ~270
            seed=seed,
            time_budget_s=rlkv_budget_s,
            max_think_tokens=rlkv_max_think,
        ),
        duo_loss=loss,
        seed=seed,
    )
    if steps is not None:
        cfg = replace(cfg, ig_steps=steps, duo_steps=steps, rlkv=replace(cfg.rlkv, steps=steps))
    hm = score_heads(h, rows, cfg, out)
    say(f"saved {out} ({method}, window {policy.sink}+{policy.recent})")
    emit({"method": method, "scores": hm.scores.tolist()}, as_json)


@heads_app.command("diff")
def diff(
    base: str = typer.Option(..., help="The base model the thinking model was tuned from."),
    model: str = typer.Option(..., help="The thinking (post-trained) model."),
    n: int = typer.Option(100, min=1, help="Questions for validation: organism problems, or --dataset's first rows."),
    dataset: str = typer.Option("organism", help="Questions: 'organism', 'gsm8k:<path>' or 'math:<path>'."),
    n_attribution: int = typer.Option(16, min=1, help="Problems whose texts are attributed."),
    k: int = typer.Option(2, min=1, help="Emergent heads to validate."),
    levels: str = typer.Option("3,4", help="Organism levels (where the model is good but not saturated)."),
    seed: int = 0,
    steps: int = typer.Option(8, min=1, help="Integrated-gradient steps."),
    draws: int = typer.Option(3, min=1, help="Random head sets to validate against."),
    max_new_tokens: int = typer.Option(512, min=1),
    batch_size: int = typer.Option(256, min=1, help="Rows decoded together in validation."),
    out: Optional[Path] = typer.Option(None, help="Write the result as an emergent_heads artifact here."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
) -> None:
    """Emergent heads (Thinking Sparks): score both models, rank the rise, validate by ablation and scaling."""
    from ..cli_kit import dataset_rows, dataset_source

    lv = _levels(levels)
    model_dtype = dtype_option(dtype, "--dtype")
    grader, _ = dataset_source(dataset)
    if out is not None:
        fresh_out(out)
    gb, gm = model_geometry(base, "--base"), model_geometry(model)
    if (gb.n_layers, gb.n_heads) != (gm.n_layers, gm.n_heads):
        raise ValueError(
            f"--base has {gb.n_layers}x{gb.n_heads} heads, --model {gm.n_layers}x{gm.n_heads}; "
            "give the base the model was tuned from"
        )
    if dataset == "organism":
        organism_only(model, "--model", "pass --dataset gsm8k:<path>")
    _, rows = dataset_rows(dataset, n)
    from ..models import load_model
    from .emergent import emergent_heads

    post, pre = load_model(model, dtype=model_dtype), load_model(base, dtype=model_dtype)
    prompts, golds = _questions(post, rows, n, seed, lv)
    res = emergent_heads(
        pre,
        post,
        prompts,
        golds,
        k=k,
        steps=steps,
        n_attribution=n_attribution,
        max_new_tokens=max_new_tokens,
        random_draws=draws,
        batch_size=batch_size,
        grader=grader,
        seed=seed,
    )
    if out is not None:
        config = {
            "base": base,
            "model": model,
            "dtype": model_dtype,
            "n": len(prompts),
            "dataset": dataset,
            "levels": list(lv),
            "n_attribution": n_attribution,
            "k": k,
            "steps": steps,
            "draws": draws,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
        }
        inputs = {"base": pre.weight_hash, "model": post.weight_hash}  # the hashes cover the dtype
        JsonResult(None, "emergent_heads", res, config).write(out, inputs, kind="emergent_heads")
    emit(res, as_json)


@heads_app.command("eval")
def evaluate(
    model: str = typer.Option(..., help="Model directory, hub id or organism:NAME."),
    maps: list[Path] = typer.Option(..., "--map", help="Head-map artifact (repeat for each method)."),
    n: int = typer.Option(300, min=1, help="Held-out questions: organism problems, or the first rows of --dataset."),
    dataset: str = typer.Option("organism", help="Questions: 'organism', 'gsm8k:<path>' or 'math:<path>'."),
    levels: str = typer.Option("3,4"),
    seed: int = typer.Option(1, help="Held-out problem seed (use another than the scoring traces')."),
    sparsities: str = typer.Option("0,0.25,0.5,0.75"),
    draws: int = typer.Option(5, min=0, help="Random-selection draws."),
    n_own: int = typer.Option(48, min=1, help="Own traces for the exhaustive best subset and retrieval."),
    exhaustive: Optional[bool] = typer.Option(
        None, "--exhaustive/--no-exhaustive", help="Try every subset (small models; default: on for organisms)."
    ),
    retrieval: Optional[bool] = typer.Option(
        None,
        "--retrieval/--no-retrieval",
        help="Compare with the value/name-read ground truths (organism traces; default: on for organisms).",
    ),
    max_new_tokens: int = typer.Option(512, min=1),
    batch_size: int = typer.Option(256, min=1, help="Rows decoded together (larger is faster on small models)."),
    out: Optional[Path] = typer.Option(None, help="Write a heads_eval artifact here."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
) -> None:
    """Generate with the compressed cache per head map and baseline; print curves and rank agreement."""
    from ..cli_kit import dataset_rows, dataset_source
    from .evaluate import EvalConfig, evaluate_heads
    from .headmap import HeadMap

    lv = _levels(levels)
    model_dtype = dtype_option(dtype, "--dtype")
    grader, dataset_at = dataset_source(dataset)
    organism = dataset_at is None
    if not organism and (exhaustive or retrieval):
        raise ValueError(
            "--exhaustive and --retrieval read the organism task's traces (ground truths); drop them with --dataset"
        )
    exhaustive = organism if exhaustive is None else exhaustive
    retrieval = organism if retrieval is None else retrieval
    cfg = EvalConfig(
        sparsities=_sparsities(sparsities),
        random_draws=draws,
        exhaustive=exhaustive,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        grader=grader,
    )
    if out is not None:
        fresh_out(out)
    heads = [opened(HeadMap.open, p, "--map") for p in maps]
    g = model_geometry(model)
    for hm in heads:
        if tuple(hm.scores.shape) != (g.n_layers, g.n_kv_heads):
            raise ValueError(
                f"--map {hm.path} is {list(hm.scores.shape)} but --model has [{g.n_layers}, "
                f"{g.n_kv_heads}] (layers x KV heads); score this model's heads"
            )
    if len({hm.policy for hm in heads}) > 1:
        raise ValueError("the --map artifacts were scored under different windows; score them with one sink/recent")
    if organism:
        organism_only(model, "--model", "pass --dataset gsm8k:<path>")
    _, rows = dataset_rows(dataset, n)
    from ..models import load_model
    from .retrieval import read_scores

    h = load_model(model, dtype=model_dtype)
    for hm in heads:
        hm.check_model(h)
    own = _own_traces(h, n_own, seed + 10_000, lv, max_new_tokens) if exhaustive or retrieval else None
    prompts, golds = _questions(h, rows, n, seed, lv)
    scores: dict[str, Any] = {}
    for hm in heads:  # one curve per map: a method given twice is numbered (rlkv, rlkv#2)
        name = (
            hm.method
            if hm.method not in scores
            else f"{hm.method}#{sum(k.split('#')[0] == hm.method for k in scores) + 1}"
        )
        scores[name] = hm.scores
    reads = read_scores(h, own) if retrieval and own is not None else {}
    res = evaluate_heads(
        h,
        prompts,
        golds,
        scores,
        heads[0].policy,
        cfg,
        own_traces=own,
        retrieval=reads["value"][0] if "value" in reads else None,
        name_reads=reads["name"][0] if "name" in reads else None,
    )
    if out is not None:
        config = {
            "model": model,
            "dtype": model_dtype,
            "maps": [str(p) for p in maps],
            "n": len(prompts),
            "seed": seed,
            "dataset": dataset,
            "levels": list(lv),
            "sparsities": list(cfg.sparsities),
            "draws": draws,
            "max_new_tokens": max_new_tokens,
        }
        JsonResult(None, "heads_eval", res, config).write(out, {"model": h.weight_hash}, kind="heads_eval")
    emit(res, as_json)
