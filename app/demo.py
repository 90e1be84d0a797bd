"""``reasonscope demo``: the whole pipeline on the model organisms, one artifact directory per stage.

traces (both organisms) → capture (residual stream of the thinking organism) → head maps and compression curves →
labels, probes and the early-exit monitor → ASC steering (and hybrid steering where ``steering.hybrid`` exists) →
exports. A stage whose artifact opens is reused, so a second run is instant and an interrupted one resumes (the
capture resumes inside its store). ``run.json`` pins the weights and config a run directory was made with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from reasonscope.artifacts import TMP_SUFFIX, read_json, write_json

from .artifacts import Family, JsonResult, MissingStage, RunDir, TraceSet

__all__ = ["STAGES", "DemoConfig", "Stage", "run_demo", "summary_rows"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of every stage, chosen so the demo runs in a few minutes on 2 CPU cores."""

    n: int = 160  # organism problems traced per model
    temperature: float = 1.0  # sampled: the thinking organism's slips (the probes' wrong chunks); greedy: rare
    max_new_tokens: int = 1024  # a sampled level-5 verbose trace thinks ~940 tokens
    head_methods: tuple[str, ...] = ("window", "gate-ig", "retrieval")
    head_traces: int = 24  # thinking traces (levels 3-4) the heads are scored on
    ig_steps: int = 4
    heads_eval_n: int = 16
    sparsities: tuple[float, ...] = (0.0, 0.25, 0.5)  # of 8 KV heads: at 0.75 every map, even the best, fails
    random_draws: int = 1
    heads_exhaustive: bool = True  # the best subset of KV heads by exhaustive search (2^8 subsets on the organisms)
    probe_targets: tuple[str, ...] = ("correct", "after_first_correct")
    probe_epochs: int = 40
    monitor_n: int = 32
    monitor_thresholds: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {"probe": (0.7, 0.9), "deer": (0.9,), "deviation": (1.5,)}
    )
    asc_vector: str = "learned"  # learned at the prompt's last token (compresses the organisms), or mean_diff
    asc_learn_steps: int = 40
    asc_pairs: int = 256  # a learned vector's steps read 16 pairs each, so more pairs cost nothing
    asc_eval: int = 96
    asc_sweep: tuple[float, ...] = (1.0, 1.5)
    asc_max_drop: float = 0.05  # ~100 problems at T=1: accuracy's sampling error alone is ~5 points
    hybrid_n: int = 24  # held-out problems of the hybrid evaluation
    hybrid_train: int = 64  # thinking rollouts the behaviours, selector and vectors are learnt from
    hybrid_steps: int = 40
    hybrid_max_new_tokens: int = 512  # the thinking organism's levels 3-5 (token-by-token decoding of two models)
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoConfig:
        """A smoke-sized run (about a minute on 2 cores): every stage and page, small numbers."""
        return cls(
            n=128,
            max_new_tokens=384,
            head_methods=("window", "retrieval"),
            head_traces=8,
            ig_steps=2,
            heads_eval_n=8,
            sparsities=(0.0, 0.25),
            random_draws=1,
            heads_exhaustive=False,
            probe_epochs=5,
            monitor_n=8,
            monitor_thresholds={"probe": (0.9,), "deviation": (1.5,)},
            asc_learn_steps=10,
            asc_pairs=8,
            asc_eval=8,
            asc_sweep=(1.0,),
            hybrid_n=6,
            hybrid_train=16,
            hybrid_steps=5,
            hybrid_max_new_tokens=256,
        )

    def __post_init__(self) -> None:
        for name in ("n", "max_new_tokens", "head_traces", "heads_eval_n", "monitor_n", "asc_pairs", "asc_eval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.asc_vector not in ("learned", "mean_diff"):
            raise ValueError(f"asc_vector {self.asc_vector!r} is not one of learned, mean_diff")


@dataclass
class Context:
    """What the stages share: the run directory, config, lazily loaded organisms and the log."""

    run: RunDir
    cfg: DemoConfig
    log: Log
    _models: dict[str, Any] = field(default_factory=dict)

    def model(self, name: str, **kw: Any) -> Any:
        key = name + repr(sorted(kw.items()))
        if key not in self._models:
            from reasonscope.models import load_model

            self._models[key] = load_model(f"organism:{name}", **kw)
        return self._models[key]


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: ``run`` writes its artifact(s); ``ready`` opens them (raising when absent)."""

    name: str
    title: str
    run: Callable[[Context], None]
    ready: Callable[[RunDir, DemoConfig], Any]
    optional: bool = False  # skipped, not failed, when its module is not installed


# ---------------------------------------------------------------------------- stages


def _opens(open_fn: Callable[[Path], object], path: Path) -> bool:
    """Whether ``path`` already holds a finished artifact that ``open_fn`` reads (a sub-stage to skip)."""
    try:
        open_fn(path)
    except (OSError, ValueError):
        return False
    return True


def _traces(ctx: Context) -> None:
    from reasonscope.organisms import task
    from reasonscope.organisms.evaluate import EvalConfig, organism_traces, summarize

    cfg = ctx.cfg
    problems = task.problems(cfg.n, seed=2024 + cfg.seed)
    ecfg = EvalConfig(n_problems=cfg.n, max_new_tokens=cfg.max_new_tokens)
    traces, summary, inputs = {}, {}, {}
    for kind in ("thinking", "base"):
        ctx.log(f"  generating {cfg.n} traces of organism:{kind} at temperature {cfg.temperature:g}")
        h = ctx.model(kind)
        traces[kind] = organism_traces(h, problems, cfg.temperature, ecfg, seed=cfg.seed, progress=True)
        summary[kind] = summarize(traces[kind])
        inputs[kind] = h.weight_hash
    TraceSet(None, traces, summary).write(ctx.run.stage_path("traces"), {"n": cfg.n, "seed": cfg.seed}, inputs)


def _capture(ctx: Context) -> None:
    from reasonscope.capture import CaptureConfig, capture

    rows = ctx.run.traces().traces["thinking"]
    cfg = CaptureConfig(hooks=("hook_resid_post",), positions="think")
    capture(ctx.model("thinking"), rows, cfg, str(ctx.run.stage_path("capture")), progress=True)


def _head_traces(ctx: Context) -> list[Any]:
    rows = [t for t in ctx.run.traces().traces["thinking"] if t.meta.get("level") in (3, 4) and t.think_span]
    return rows[: ctx.cfg.head_traces]


def _heads(ctx: Context) -> None:
    from reasonscope.heads.evaluate import window_for
    from reasonscope.heads.headmap import HeadMap
    from reasonscope.heads.score import HeadConfig, score_heads

    rows = _head_traces(ctx)
    policy = window_for([len(t.token_ids) - t.think_span[0] for t in rows])
    h = ctx.model("thinking")
    for method in ctx.cfg.head_methods:
        out = ctx.run.stage_path("heads", method)
        if _opens(HeadMap.open, out):
            continue
        ctx.log(f"  scoring KV heads: {method} (window {policy.sink}+{policy.recent}, {len(rows)} traces)")
        cfg = HeadConfig(
            method=method,  # type: ignore[arg-type]
            sink=policy.sink,
            recent=policy.recent,
            ig_steps=ctx.cfg.ig_steps,
            seed=ctx.cfg.seed,
        )
        score_heads(h, rows, cfg, out)


def _heads_eval(ctx: Context) -> None:
    from reasonscope.heads.evaluate import KIND, EvalConfig, evaluate_heads
    from reasonscope.heads.retrieval import read_scores
    from reasonscope.organisms import task

    maps = ctx.run.head_maps()
    h = ctx.model("thinking")
    own = _head_traces(ctx)
    probs = task.problems(ctx.cfg.heads_eval_n, seed=ctx.cfg.seed + 1, levels=(3, 4))
    cfg = EvalConfig(
        sparsities=ctx.cfg.sparsities,
        random_draws=ctx.cfg.random_draws,
        exhaustive=ctx.cfg.heads_exhaustive,
        max_new_tokens=ctx.cfg.max_new_tokens,
    )
    policy = next(iter(maps.values())).policy
    ctx.log(f"  generating with compressed caches: {len(maps)} maps + baselines x {len(cfg.sparsities)} sparsities")
    reads = read_scores(h, own)
    result = evaluate_heads(
        h,
        [h.chat_prompt(p.question) for p in probs],
        [str(p.answer) for p in probs],
        {name: hm.scores for name, hm in maps.items()},
        policy,
        cfg,
        own_traces=own,
        retrieval=reads["value"][0],
        name_reads=reads["name"][0],
    )
    config = {"maps": sorted(maps), "n": len(probs), "sparsities": list(cfg.sparsities)}
    JsonResult(None, KIND, result, config).write(ctx.run.stage_path("heads_eval"), {"model": h.weight_hash}, KIND)


def _labels(ctx: Context) -> None:
    from probes.labels import LabelConfig, label_traces

    rows = [t for t in ctx.run.traces().traces["thinking"] if t.think_span and t.thinking.strip()]
    cfg = LabelConfig(matcher="organism", entropy=True, window=8)
    ctx.log(f"  labelling the chunks of {len(rows)} thinking traces (intermediate answers, entropies)")
    label_traces(rows, cfg, ctx.run.stage_path("labels"), ctx.model("thinking"))


def _probes(ctx: Context) -> None:
    from probes.fit import fit_probes
    from probes.probeset import ProbeSet
    from probes.train import ProbeConfig

    store, labels = ctx.run.store(), ctx.run.labels()
    for target in ctx.cfg.probe_targets:
        out = ctx.run.stage_path("probes", target)
        if _opens(ProbeSet.open, out):
            continue
        ctx.log(f"  fitting '{target}' probes on every layer")
        cfg = ProbeConfig(target=target, epochs=ctx.cfg.probe_epochs, bootstrap=100, seed=ctx.cfg.seed, device="cpu")
        fit_probes(store, labels, cfg, out)


def _monitor(ctx: Context) -> None:
    from probes.monitor import MonitorConfig, Policy, sweep
    from reasonscope.organisms import task
    from reasonscope.organisms.evaluate import EVAL_SEED

    sets = ctx.run.probe_sets()
    ps = sets.get("after_first_correct") or next(iter(sets.values()))
    h = ctx.model("thinking")
    problems = task.problems(ctx.cfg.monitor_n, EVAL_SEED)
    thresholds = cast("dict[Policy, tuple[float, ...]]", dict(ctx.cfg.monitor_thresholds))
    mcfg = MonitorConfig(window=8, max_new_tokens=ctx.cfg.max_new_tokens)
    ctx.log(f"  early-exit sweep on {len(problems)} problems: {', '.join(thresholds)} (probe: {ps.target})")
    result = sweep(
        h, [h.chat_prompt(p.question) for p in problems], [str(p.answer) for p in problems], thresholds, mcfg, ps
    )
    config = {"probe_target": ps.target, "n": len(problems), "thresholds": {k: list(v) for k, v in thresholds.items()}}
    JsonResult(None, "monitor", result, config).write(ctx.run.stage_path("monitor"), {"model": h.weight_hash})


def _asc(ctx: Context) -> None:
    from steering.asc import ASCConfig, run_asc

    h = ctx.model("thinking")
    learned = ctx.cfg.asc_vector == "learned"
    cfg = ASCConfig(
        vector="learned" if learned else "mean_diff",
        positions="prompt" if learned else "last",
        layers=tuple(range(1, h.geometry.n_layers)) if learned else (),  # llama.cpp cannot steer block 0
        learn_steps=ctx.cfg.asc_learn_steps,
        n_pairs=ctx.cfg.asc_pairs,
        n_eval=ctx.cfg.asc_eval,
        sweep=ctx.cfg.asc_sweep,
        max_accuracy_drop=ctx.cfg.asc_max_drop,
        max_new_tokens=ctx.cfg.max_new_tokens,
        seed=ctx.cfg.seed,
    )
    ctx.log(
        f"  ASC {cfg.vector} vector ({cfg.positions} positions) from {cfg.n_pairs} concise/verbose pairs; "
        f"γ sweep {list(cfg.sweep)} on {cfg.n_eval} problems"
    )
    run_asc(h, cfg, ctx.run.stage_path("asc"), progress=True)


def _hybrid(ctx: Context) -> None:
    from reasonscope.organisms import task
    from reasonscope.organisms.evaluate import EVAL_SEED
    from steering import hybrid  # type: ignore[attr-defined,unused-ignore]

    c = ctx.cfg
    problems = task.problems(c.hybrid_n, EVAL_SEED + 1)
    cfg = hybrid.HybridConfig(
        n_train=c.hybrid_train,
        train_steps=c.hybrid_steps,
        n_eval=len(problems),
        max_new_tokens=c.hybrid_max_new_tokens,
        seed=c.seed,
    )
    ctx.log(
        f"  hybrid steering: behaviours from {cfg.n_train} thinking rollouts; base steered on {len(problems)} problems"
    )
    hybrid.run_hybrid(ctx.model("base"), ctx.model("thinking"), problems, cfg, ctx.run.stage_path("hybrid"))


def _exports(ctx: Context) -> None:
    from .artifacts import Exports

    vec, _ = ctx.run.asc()
    Exports.write(vec, ctx.run.stage_path("exports"), "asc", ("gguf", "easysteer", "safetensors"))


def _hybrid_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("steering.hybrid") is not None


def _all_maps(run: RunDir, cfg: DemoConfig) -> Any:
    maps = run.head_maps()
    missing = [m for m in cfg.head_methods if m not in maps]
    for m in missing:
        if m in maps.damaged:
            raise maps.damaged[m]
    if missing:
        raise MissingStage("heads", run.path, f"no head map for {missing}")
    return maps


def _all_probes(run: RunDir, cfg: DemoConfig) -> Any:
    sets = run.probe_sets()
    missing = [t for t in cfg.probe_targets if t not in sets]
    for t in missing:
        if t in sets.damaged:
            raise sets.damaged[t]
    if missing:
        raise MissingStage("probes", run.path, f"no probes for {missing}")
    return sets


def _opener(fn: Callable[[RunDir], Any]) -> Callable[[RunDir, DemoConfig], Any]:
    return lambda run, _cfg: fn(run)


STAGES: tuple[Stage, ...] = (
    Stage("traces", "graded traces of both organisms", _traces, _opener(RunDir.traces)),
    Stage("capture", "residual stream of the thinking traces", _capture, _opener(RunDir.store)),
    Stage("heads", "KV head scores per scorer", _heads, _all_maps),
    Stage("heads_eval", "compression curves", _heads_eval, _opener(RunDir.heads_eval)),
    Stage("labels", "chunk labels", _labels, _opener(RunDir.labels)),
    Stage("probes", "probes on every layer", _probes, _all_probes),
    Stage("monitor", "early-exit monitor sweep", _monitor, _opener(RunDir.monitor)),
    Stage("asc", "ASC steering vector and γ sweep", _asc, _opener(RunDir.asc)),
    Stage("hybrid", "hybrid base/thinking steering", _hybrid, _opener(RunDir.hybrid), optional=True),
    Stage("exports", "GGUF / EasySteer / safetensors", _exports, _opener(RunDir.exports)),
)


# ---------------------------------------------------------------------------- driver


def _pin(run: RunDir, cfg: DemoConfig, weights: Callable[[], dict[str, str]]) -> None:
    """Write ``run.json`` on a new run; refuse a run directory made with other sizes (before ``weights()`` loads
    the models) or other weights."""
    config = json_ready(asdict(cfg))
    path = run.path / "run.json"
    if path.exists():
        old = read_json(path)
        other = "demo settings" if old.get("config") != config else None
        other = other or ("organism weights" if old.get("weights") != weights() else None)  # loads only now
        if other:
            raise ValueError(
                f"{run.path} was made with other {other}; choose another --out or delete {run.path} to start over"
            )
        return
    # never adopt (and then lock) another run's directory; a temporary a killed first run left is not a run
    if run.path.is_dir() and any(not p.name.endswith(TMP_SUFFIX) for p in run.path.iterdir()):
        raise ValueError(
            f"{run.path} is not empty and holds no run.json, so it is not a demo run; choose a new --out "
            "(a run on your own model opens with `reasonscope app DIR --model M`)"
        )
    pin = {"config": config, "weights": weights()}
    run.path.mkdir(parents=True, exist_ok=True)
    write_json(path, pin)


def json_ready(obj: Any) -> Any:
    """Tuples as lists, recursively (what JSON round-trips to)."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def run_demo(out: str | Path, cfg: DemoConfig = DemoConfig(), log: Log = print) -> dict[str, dict[str, Any]]:
    """Run every stage not yet done into ``out``; returns ``{stage: {"status", "seconds"}}``."""
    run = RunDir(out)
    ctx = Context(run, cfg, log)
    _pin(run, cfg, lambda: {kind: ctx.model(kind).weight_hash for kind in ("thinking", "base")})
    report: dict[str, dict[str, Any]] = {}
    for i, stage in enumerate(STAGES, 1):
        head = f"[{i}/{len(STAGES)}] {stage.name}: {stage.title}"
        if stage.optional and stage.name == "hybrid" and not _hybrid_available():
            log(f"{head} - skipped (steering.hybrid is not installed yet)")
            report[stage.name] = {"status": "skipped", "seconds": 0.0}
            continue
        try:
            stage.ready(run, cfg)
            log(f"{head} - reused")
            report[stage.name] = {"status": "reused", "seconds": 0.0}
            continue
        except MissingStage as e:
            if e.damaged is not None:  # the stage's writer would refuse the directory; nothing is deleted for you
                raise ValueError(str(e)) from e
        log(f"{head} ...")
        t0 = time.perf_counter()
        stage.run(ctx)
        stage.ready(run, cfg)  # what was written opens
        seconds = time.perf_counter() - t0
        log(f"{head} - done in {seconds:.0f}s")
        report[stage.name] = {"status": "ran", "seconds": round(seconds, 1)}
    return report


def summary_rows(run: RunDir) -> list[tuple[str, str]]:
    """(stage, headline) for every stage present: what the demo found, read back from the artifacts."""
    rows: list[tuple[str, str]] = []

    def add(stage: str, fn: Callable[[], str]) -> None:
        try:
            rows.append((stage, fn()))
        except MissingStage as e:
            rows.append((stage, f"missing ({e})"))

    def traces() -> str:
        s = run.traces().summary
        return "; ".join(
            f"{k}: accuracy {v['accuracy']:.2f}, {v['mean_think_tokens']:.0f} thinking tokens" for k, v in s.items()
        )

    def store() -> str:
        st = run.store()
        return f"{len(st)} rows x {len(st.manifest.hooks)} hooks"

    def unreadable(family: Family[Any]) -> list[str]:
        return [f"{name}: unreadable" for name in family.damaged]

    def heads() -> str:
        maps, parts = run.head_maps(), []
        for name, hm in maps.items():
            flat = int(hm.scores.flatten().argmax())
            n_kv = hm.scores.shape[1]
            parts.append(f"{name}: top L{flat // n_kv}H{flat % n_kv}")
        return ", ".join(parts + unreadable(maps))

    def heads_eval() -> str:
        curves = run.heads_eval().result["curves"]
        sps = sorted({s for per in curves.values() for s in per if float(s) > 0}, key=float) or ["0"]

        def lead(s: str) -> float:  # the best map's accuracy over the random one's: where the choice of heads shows
            accs = [per[s]["accuracy"] for m, per in curves.items() if s in per and m != "random"]
            return max(accs, default=0.0) - curves.get("random", {}).get(s, {}).get("accuracy", 0.0)

        sp = max(sps, key=lead)
        acc = ", ".join(f"{m} {per[sp]['accuracy']:.2f}" for m, per in curves.items() if sp in per)
        return f"accuracy at sparsity {sp}: {acc}"

    def labels() -> str:
        s = run.labels().summary()
        fcs = s["first_correct_share"]  # quartiles: concise and verbose traces make it bimodal
        q = [fcs.get(k) for k in ("p25", "median", "p75")]
        share = (
            "; first correct answer at {:.0%} / {:.0%} / {:.0%} of the thinking (quartiles)".format(*q)
            if None not in q
            else ""
        )
        return f"{s['n_chunks']} chunks of {s['n_traces']} traces{share}"

    def probes() -> str:
        sets = run.probe_sets()
        parts = [
            f"{t}: layer {ps.best_hook.split('.')[1]} AUROC {ps.report['best']['auroc']:.2f}" for t, ps in sets.items()
        ]
        return ", ".join(parts + unreadable(sets))

    def monitor() -> str:
        res = run.monitor().result
        best = max(
            (k for k in res if k != "none"),
            key=lambda k: res[k]["saved_fraction"] - 2 * max(0.0, res["none"]["accuracy"] - res[k]["accuracy"]),
        )
        r, acc = res[best], res["none"]["accuracy"]
        return f"{best}: {r['saved_fraction']:.0%} thinking saved, accuracy {acc:.2f} -> {r['accuracy']:.2f}"

    def asc() -> str:
        _, rep = run.asc()
        b, s = rep["baseline"], rep["steered"]
        return (
            f"γ={rep['gamma']:.3g} ({rep['gamma_rule']}): thinking tokens {b['mean_think_tokens']:.0f} -> "
            f"{s['mean_think_tokens']:.0f}, accuracy {b['accuracy']:.2f} -> {s['accuracy']:.2f}"
        )

    def hybrid() -> str:
        s = run.hybrid().summary
        keys = ("base_accuracy", "hybrid_accuracy", "thinking_accuracy", "gap_recovered", "steered_token_fraction")
        return ", ".join(f"{k.replace('_', ' ')} {s[k]:.2f}" for k in keys if isinstance(s.get(k), (int, float)))

    def exports() -> str:
        return ", ".join(f"{fmt}: {', '.join(p.name for p in paths)}" for fmt, paths in run.exports().files.items())

    for stage, fn in (
        ("traces", traces),
        ("capture", store),
        ("heads", heads),
        ("heads_eval", heads_eval),
        ("labels", labels),
        ("probes", probes),
        ("monitor", monitor),
        ("asc", asc),
        ("hybrid", hybrid),
        ("exports", exports),
    ):
        add(stage, fn)
    return rows
