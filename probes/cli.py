"""``probe`` commands: ``labels``, ``fit``, ``eval``, ``monitor`` (mounted under ``reasonscope probe``).

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
    device_option,
    dtype_option,
    emit,
    fail,
    floats,
    fresh_out,
    model_geometry,
    opened,
    read_traces,
    say,
)

from .answers import MATCHERS
from .chunks import CHUNKINGS

if TYPE_CHECKING:  # pragma: no cover
    from reasonscope.traces import Trace

    from .probeset import ProbeSet

probe_app = typer.Typer(cls=ErrorGroup, no_args_is_help=True, help="Probes for confidence, deviation and overthinking.")


def _emit(obj: Any, as_json: bool) -> None:
    from .probeset import json_safe

    emit(json_safe(obj), as_json)


def _read_traces(path: Path) -> list[Trace]:
    """A JSONL of trace records, or a directory in the thought-anchors layout."""
    if path.is_dir():
        from reasonscope.traces import load_thought_anchors

        try:
            return load_thought_anchors(path)
        except ValueError as e:
            fail(f"--traces {path}: {e}")
    return read_traces(path)


@probe_app.command("labels")
def labels_cmd(
    traces: Path = typer.Option(..., help="Trace JSONL (id, prompt, thinking, answer; gold) or thought-anchors dir."),
    out: Optional[Path] = typer.Option(None, help="Write the probe_labels artifact here."),
    model: Optional[str] = typer.Option(None, help="Model for token positions, forced answers and entropies."),
    matcher: str = typer.Option("auto", help="Intermediate-answer matcher: auto | organism | math."),
    chunking: str = typer.Option("auto", help="auto | paragraphs | sentences."),
    forced: bool = typer.Option(
        False, help="Add safe_exit, stable and no_loss_exit labels (forced answers; needs --model)."
    ),
    forced_suffix: Optional[str] = typer.Option(
        None, help="Text after the forced </think> (default: none for organisms, a 'Final Answer' box lead else)."
    ),
    forced_max_new_tokens: Optional[int] = typer.Option(
        None, min=1, help="Forced answer tokens (default: 8 for organisms, 32 else)."
    ),
    entropy: bool = typer.Option(False, help="Add the deviation-index signals (needs --model)."),
    window: int = typer.Option(32, min=1, help="Deviation index window W (tokens)."),
    lam: float = typer.Option(1.5, help="Deviation threshold lambda."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
) -> None:
    """Label every chunk of the traces (text-side recipes need no model) and summarise."""
    from .labels import LabelConfig, build_labels, label_traces

    model_dtype = dtype_option(dtype, "--dtype")
    cfg = configured(
        LabelConfig,
        matcher=choice(matcher, MATCHERS, "--matcher"),
        chunking=choice(chunking, CHUNKINGS, "--chunking"),
        forced=forced,
        forced_suffix=forced_suffix,
        forced_max_new_tokens=forced_max_new_tokens,
        entropy=entropy,
        window=window,
        lam=lam,
    )
    if cfg.needs_model and model is None:
        fail("--forced and --entropy need --model")
    if not traces.exists():
        fail(f"--traces {traces} does not exist; pass a trace JSONL file or a thought-anchors directory")
    if out is not None:
        fresh_out(out)
    if model is not None:
        model_geometry(model)
    rows = _read_traces(traces)
    handle = None
    if model is not None:
        from reasonscope.models import load_model

        handle = load_model(model, dtype=model_dtype)
    table = label_traces(rows, cfg, out, handle) if out is not None else build_labels(rows, cfg, handle)
    summary = table.summary()
    if summary.get("forced_unanswered_share", 0.0) > 0.5:
        say(
            f"note: {summary['forced_unanswered_share']:.0%} of forced exits gave no readable answer, so safe_exit "
            "is mostly 0; check --forced-suffix and --forced-max-new-tokens for this model"
        )
    _emit(summary, as_json)


@probe_app.command("fit")
def fit_cmd(
    store: Path = typer.Option(..., help="Activation store (reasonscope capture)."),
    labels: Path = typer.Option(..., help="probe_labels artifact (reasonscope probe labels --out)."),
    out: Path = typer.Option(..., help="Write the probe_set artifact here."),
    target: str = typer.Option("correct", help="Label to predict (correct, after_first_correct, safe_exit, ...)."),
    hooks: str = typer.Option("hook_resid_post", help="Hook patterns over the store's hooks."),
    kind: str = typer.Option("logistic", help="logistic | mlp."),
    hidden: int = typer.Option(32, min=1),
    epochs: int = typer.Option(50, min=1),
    lr: float = typer.Option(1e-3),
    select_on: str = typer.Option("auroc", help="Picks the best layer: auroc | auroc_within_problem (validation)."),
    seed: int = 0,
    device: str = "auto",
    as_json: bool = typer.Option(False, "--json", help="Print the evaluation as JSON on stdout."),
) -> None:
    """Fit probes on every selected layer at once and write them with their evaluation."""
    from reasonscope.store import ActivationStore

    from .batched import PROBE_KINDS
    from .fit import ProbeConfig, fit_probes
    from .labels import LabelTable
    from .train import SELECT_ON

    cfg = configured(
        ProbeConfig,
        target=target,
        hooks=hooks,
        kind=choice(kind, PROBE_KINDS, "--kind"),
        hidden=hidden,
        epochs=epochs,
        lr=lr,
        select_on=choice(select_on, SELECT_ON, "--select-on"),
        seed=seed,
        device=device_option(device),
    )
    table = opened(LabelTable.open, labels, "--labels")
    if target not in table.targets:
        fail(f"--target {target!r} is not among the labels' targets {sorted(table.targets)}; choose one of them")
    fresh_out(out)
    ps = fit_probes(opened(ActivationStore.open, store, "--store"), table, cfg, out)
    _emit(_summary([ps]), as_json)


def _summary(sets: list[ProbeSet]) -> dict[str, dict[str, Any]]:
    out = {}
    for ps in sets:
        best = ps.report["best"]
        keys = ("auroc", "auroc_within_problem", "ece", "brier", "accuracy", "selectivity", "auroc_ci")
        out[ps.target] = {
            "best_layer": int(ps.best_hook.split(".")[1]),
            "best_hook": ps.best_hook,
            **{k: best[k] for k in keys},
            "baselines": ps.report["baselines"],
        }
    return out


@probe_app.command("eval")
def eval_cmd(
    probes: list[Path] = typer.Option(..., "--probes", help="probe_set artifact(s); repeat for several targets."),
    store: Optional[Path] = typer.Option(
        None, help="Evaluate on this activation store (other traces of the same model) instead of the fit's test."
    ),
    labels: Optional[Path] = typer.Option(None, help="Chunk labels of --store's traces (`probe labels --out`)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Evaluation of fitted probes: best layer, AUROC (pooled, within-problem), ECE, Brier, selectivity on the fit's
    held-out test problems; with --store and --labels, the best layer's probe on every labelled chunk there."""
    from reasonscope.store import ActivationStore

    from .labels import LabelTable
    from .probeset import ProbeSet

    for p in probes:
        if not p.is_dir():
            fail(f"--probes {p} is not a directory; pass a probe_set written by `reasonscope probe fit`")
    if (store is None) != (labels is None):
        fail("--store and --labels go together: the activations and the chunk labels of the same traces")
    sets = [opened(ProbeSet.open, p, "--probes") for p in probes]
    if store is None or labels is None:
        _emit(_summary(sets), as_json)
        return
    for path, what in ((store, "--store"), (labels, "--labels")):
        if not path.is_dir():
            fail(f"{what} {path} is not a directory")
    st, table = opened(ActivationStore.open, store, "--store"), opened(LabelTable.open, labels, "--labels")
    out = {}
    for ps in sets:
        if ps.best_hook not in st.manifest.hooks:
            fail(f"--store {store} has no {ps.best_hook} (the best hook of {ps.path}); capture it with --hooks")
        if ps.target not in table.targets:
            fail(f"--labels {labels} has no target {ps.target!r}; label the traces with the recipe that makes it")
        try:
            out[ps.target] = {
                "best_layer": int(ps.best_hook.split(".")[1]),
                "best_hook": ps.best_hook,
                **ps.evaluate(st, table),
            }
        except ValueError as e:
            fail(f"--probes {ps.path}: {e}")
    _emit(out, as_json)


VAL_SEED_OFFSET = 1  # validation problems: task.problems(n, EVAL_SEED + 1), minus any test problem


@probe_app.command("monitor")
def monitor_cmd(
    model: str = typer.Option(..., help="Thinking model (path, hub id or organism:thinking)."),
    probes: Optional[Path] = typer.Option(None, help="probe_set for the probe policy."),
    traces: Optional[Path] = typer.Option(None, help="Trace JSONL whose prompts and gold answers to use."),
    dataset: str = typer.Option(
        "organism", help="Questions when no --traces: 'organism', 'gsm8k:<path>' or 'math:<path>' (its grader)."
    ),
    n: int = typer.Option(100, min=1, help="Test questions when no --traces (organism: a held-out seed)."),
    val_n: int = typer.Option(
        0,
        min=0,
        help="Validation problems to choose each policy's threshold on (organism: another held-out seed; "
        "--traces or --dataset: the first VAL_N rows); the chosen thresholds are then reported on the test problems.",
    ),
    max_loss: float = typer.Option(0.01, min=0.0, help="Accuracy loss allowed when choosing a threshold."),
    loss_z: float = typer.Option(
        1.645,  # probes.monitor.LOSS_Z (not imported here: the CLI loads torch only when a command runs)
        min=0.0,
        help="Margin on the loss, in standard errors paired by problem (1.645: one-sided 95%; 0: the point estimate).",
    ),
    probe_thresholds: str = typer.Option(
        "0.3,0.5,0.7,0.75,0.8,0.82,0.84,0.86,0.88,0.9,0.92,0.95,0.98,0.99",
        help="Probe policy thresholds (p >= t exits).",
    ),
    deer_thresholds: str = typer.Option(
        "0.5,0.7,0.8,0.9,0.95,0.98,0.99", help="DEER-style thresholds (trial confidence > t exits)."
    ),
    deviation_thresholds: str = typer.Option(
        "1.1,1.25,1.5,2,2.5,3", help="Deviation-index thresholds (index > t exits)."
    ),
    window: int = typer.Option(32, min=1, help="Deviation index window W."),
    consecutive: int = typer.Option(1, min=1, help="Boundaries in a row above the threshold before an exit."),
    min_think: int = typer.Option(0, min=0, help="Thinking tokens before any exit."),
    temperature: float = typer.Option(0.0, min=0.0),
    seed: int = typer.Option(0, help="Sampling seed (request i's token t draws from a stream fixed by it)."),
    batch_size: int = typer.Option(64, min=1),
    max_new_tokens: int = typer.Option(1024, min=1),
    answer_tokens: Optional[int] = typer.Option(
        None, min=1, help="Answer tokens after a forced exit (default: 8 for organisms, 32 after a \\boxed{ lead)."
    ),
    trial_tokens: Optional[int] = typer.Option(None, min=1, help="DEER trial tokens (default: 4 organisms, 20 else)."),
    grader: Optional[str] = typer.Option(
        None, help="--traces' grader: organism | gsm8k | math (default: the one the traces record, else organism)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print {policy: {accuracy, think_tokens, saved_fraction}}."),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    out: Optional[Path] = typer.Option(
        None, help="Also write the test trade-off curve as a monitor result (a run's monitor/ stage)."
    ),
) -> None:
    """Early exit during generation: tokens saved vs accuracy for probe, DEER-style and deviation policies.

    Without --val-n: the trade-off curve {"none", "<policy>@<threshold>"} on the test problems. With it: each
    policy at the threshold chosen on the validation problems ({policy: {..., threshold}}), the test curve
    ("curve") and the validation curve ("validation").
    """
    from reasonscope.cli_kit import dataset_rows, dataset_source, organism_only
    from reasonscope.traces import GRADERS

    from .monitor import MonitorConfig, Policy, choose, curve, point_key, record

    if grader is not None:
        grader = choice(grader, tuple(GRADERS), "--grader")
    model_dtype = dtype_option(dtype, "--dtype")
    if out is not None:
        fresh_out(out)
    if dataset != "organism":
        if traces is not None:
            fail("give --traces or --dataset, not both")
        grader = dataset_source(dataset)[0]
    rows = read_traces(traces) if traces is not None else dataset_rows(dataset, val_n + n)[1]
    if traces is not None and rows is not None:
        recorded = {str(t.meta["grader"]) for t in rows if t.meta.get("grader")}
        if len(recorded) > 1:
            fail(f"--traces {traces} mixes graders {sorted(recorded)}; monitor one dataset's traces at a time")
        if grader is not None and recorded and grader not in recorded:
            fail(f"--grader {grader}: --traces {traces} were graded with {recorded.pop()}; drop --grader or match it")
        grader = grader or (recorded.pop() if recorded else "organism")
    elif rows is not None and len(rows) < val_n + n:
        fail(f"--dataset {dataset!r} has {len(rows)} rows, fewer than --val-n {val_n} + --n {n}; lower them")
    thresholds: dict[Policy, tuple[float, ...]] = {
        "deer": floats(deer_thresholds, "--deer-thresholds", "0.8,0.9,0.95"),
        "deviation": floats(deviation_thresholds, "--deviation-thresholds", "1.5,2"),
    }
    if probes is not None:
        if not probes.is_dir():
            fail(f"--probes {probes} is not a directory; pass a probe_set written by `reasonscope probe fit`")
        thresholds["probe"] = floats(probe_thresholds, "--probe-thresholds", "0.8,0.9,0.95")
    cfg = configured(
        MonitorConfig,
        window=window,
        consecutive=consecutive,
        min_think=min_think,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        answer_tokens=answer_tokens,
        trial_tokens=trial_tokens,
        grader=grader or "organism",
    )
    source = f"--traces {traces}" if traces is not None else f"--dataset {dataset}"
    if rows is not None and any(t.gold is None for t in rows):
        fail(f"{source}: every record needs a 'gold' answer to grade the monitored answers")
    if rows is not None and val_n >= len(rows):
        fail(f"--val-n {val_n} leaves no test records of the {len(rows)} in {source}; lower it")
    if rows is not None:
        from .labels import problem_of

        val_problems = {problem_of(t) for t in rows[:val_n]}  # whole problems: none on both sides
        val_rows = [t for t in rows if problem_of(t) in val_problems]
        test_rows = [t for t in rows if problem_of(t) not in val_problems]
        if not test_rows:
            fail(f"--val-n {val_n} takes every problem of {source} (samples of one problem stay together); lower it")
    model_geometry(model)
    if rows is None:
        organism_only(model, "--model", "pass --dataset gsm8k:<path> or --traces")
    from reasonscope.models import load_model

    from .probeset import ProbeSet

    ps = ProbeSet.open(probes) if probes is not None else None
    handle = load_model(model, dtype=model_dtype)
    if rows is not None:
        chat = (lambda q: q) if traces is not None else (lambda q: handle.chat_prompt(q, thinking=True))
        val = [(chat(t.prompt), str(t.gold)) for t in val_rows]
        test = [(chat(t.prompt), str(t.gold)) for t in test_rows]
        keys = {problem_of(t) for t in rows} | {t.id for t in rows} | {p for p, _ in val + test}
    else:
        from reasonscope.organisms import task
        from reasonscope.organisms.evaluate import EVAL_SEED

        problems = task.problems(n, EVAL_SEED)
        seen = {p.uid for p in problems}
        held = [p for p in task.problems(2 * val_n, EVAL_SEED + VAL_SEED_OFFSET) if p.uid not in seen][:val_n]
        test = [(handle.chat_prompt(p.question), str(p.answer)) for p in problems]
        val = [(handle.chat_prompt(p.question), str(p.answer)) for p in held]
        keys = {p.uid for p in problems + held} | {p for p, _ in val + test}
    if ps is not None and (seen_by_fit := keys & ps.fit_problems):
        fail(
            f"{len(seen_by_fit)} of the monitored problems trained or validated the probes {probes}; monitor other "
            "problems (other --traces, rows past the fit's in --dataset, or probes fitted on traces of another seed)"
        )

    def points(pairs: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
        rec = record(handle, [p for p, _ in pairs], [g for _, g in pairs], cfg, ps)
        return curve(handle, rec, thresholds)

    test_curve = points(test)

    def save(extra: dict[str, Any]) -> None:  # the test curve, the layout a run's monitor/ stage holds
        if out is not None:
            from reasonscope.artifacts import JsonResult

            config = {"model": model, "n": len(test), "thresholds": {k: list(v) for k, v in thresholds.items()}}
            config["probe_target"] = ps.target if ps is not None else None
            JsonResult(None, "monitor", test_curve, {**config, **extra}).write(out, {"model": handle.weight_hash})

    if not val:
        save({})
        _emit(test_curve, as_json)
        return
    val_curve = points(val)
    chosen = choose(val_curve, max_loss, loss_z)
    save({"val_n": len(val), "max_loss": max_loss, "loss_z": loss_z, "chosen": chosen})
    report: dict[str, Any] = {"none": {**test_curve["none"], "n": len(test)}}
    for policy in thresholds:
        if policy in chosen:
            t = chosen[policy]["threshold"]
            report[policy] = {**test_curve[point_key(policy, t)], "threshold": t}
        else:  # no threshold kept the accuracy on validation: the policy never exits
            report[policy] = {**test_curve["none"], "threshold": None}
    report["curve"] = test_curve
    report["validation"] = {"n": len(val), "max_loss": max_loss, "loss_z": loss_z, "chosen": chosen, "curve": val_curve}
    _emit(report, as_json)
