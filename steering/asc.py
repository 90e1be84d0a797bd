"""ASC: activation-steered chain-of-thought compression (Azizi et al., arXiv 2507.04742 v2).

Extraction (§1.1 of research/steering.md): v = mean_i( h_ℓ(q_i ⊕ concise_i)[-1] − h_ℓ(q_i ⊕ verbose_i)[-1] ), the
output of block ℓ at the last token, unnormalised. Injection (§1.2): +γ·v at the last position of every forward
pass (the last prompt token at prefill, then each generated token). Strength (§1.3, App. A.1): with unit v̂,
a = median ‖J v̂‖, L = 95th percentile of ‖d²/dt² F(h + t v̂)‖ over calibration points, β = 4εL²/a⁴, x the positive
root of x³ + x² − β = 0, γ_raw = (a/L)x, γ_max = max(0, (1 − Lγ_raw/(4a))·γ_raw), which keeps
¼a²γ² + ¼Laγ³ + (1/16)L²γ⁴ ≤ ε (eq. 10); the stored vector is unnormalised, so γ = γ_max/‖v‖.
Pairs: ``styles`` (the organism task's concise and verbose thinking for the same question), ``efficiency``
(Efficiency Steering, arXiv 2506.15647: the shortest vs the longest correct of ``k_samples`` sampled traces), or
any model's own pairs (:func:`read_pairs`); evaluation questions: the organism task's, or any graded set
(:class:`Question`, e.g. GSM8K or MATH-500 under their graders).
``vector="learned"`` replaces the mean difference by :func:`steering.learned.learn_vector` (the pair's first
differing token under a KL trust region, every candidate layer at once); ``positions="prompt"`` steers the last
prompt token only (the KL bound is then estimated at the prompts).
Evaluation generates through :func:`reasonscope.generation.generate` (the same seed at every γ).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from reasonscope.budget import passes, vocab_size
from reasonscope.organisms import task
from reasonscope.organisms.evaluate import EVAL_SEED, summarize, think_tokens
from reasonscope.organisms.tokenizer import speaks_organism
from reasonscope.traces import GRADERS, Trace
from reasonscope.traces.loaders import numbered_records

from .extract import extract_vector
from .learned import LEARN_POSITIONS, LearnConfig, LearnPositions, learn_vector
from .questions import Question, answer_questions, organism_questions
from .vector import SteeringVector

__all__ = [
    "EXTRACT_CHOICES",
    "SELECT_SEED",
    "VECTOR_CHOICES",
    "ASCConfig",
    "GammaRule",
    "Pair",
    "asc_gamma_max",
    "asc_pairs",
    "efficiency_pairs",
    "estimate_a_l",
    "evaluate_gammas",
    "kl_bound",
    "kl_gamma",
    "read_pairs",
    "run_asc",
    "selection_problems",
]

GammaRule = Literal["kl_bound", "sweep"]
GAMMA_CHOICES: tuple[GammaRule, ...] = get_args(GammaRule)
Pairs = Literal["styles", "efficiency"]
PAIR_CHOICES: tuple[Pairs, ...] = get_args(Pairs)
ExtractAt = Literal["end", "start"]
EXTRACT_CHOICES: tuple[ExtractAt, ...] = get_args(ExtractAt)
VectorKind = Literal["mean_diff", "learned"]
VECTOR_CHOICES: tuple[VectorKind, ...] = get_args(VectorKind)
SELECT_SEED = 3_000_017  # the selection split's problem stream: neither training (0..) nor test (EVAL_SEED)


@dataclass(frozen=True)
class ASCConfig:
    """One ASC run: extraction, the KL-bounded strength, a fixed-γ sweep and the held-out evaluation."""

    layer: int = 2
    layers: tuple[int, ...] = ()  # candidate layers, chosen with γ on the selection split (empty: ``layer`` only)
    reduce: Literal["last", "mean"] = "last"  # ASC reads the last token; "mean" averages over the text's tokens
    extract_at: ExtractAt = "end"  # read at the end of question ⊕ CoT (the paper), or after the CoT's first token
    vector: VectorKind = "mean_diff"  # the paper's difference of means, or learned (steering.learned, all
    # candidate layers together, under a KL trust region: ASC's ACL version in spirit)
    positions: LearnPositions = "last"  # ASC's injection (every forward pass's last position) or the prompt's last
    learn_steps: int = 150  # learned: Adam steps
    kl_weight: float = 30.0  # learned: weight of the trust region
    learn_micro_batch: int | None = None  # learned: pairs per forward pass (None: sized to LOGIT_BUDGET)
    n_pairs: int = 64
    pairs: Pairs = "styles"  # concise/verbose task styles, or shortest/longest correct samples (efficiency)
    k_samples: int = 4  # efficiency pairs: samples per question at temperature 1
    epsilon: float = 1e-3  # KL budget of the strength rule (the paper's)
    n_calibration: int = 50
    sweep: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # γ multiplying the stored (unnormalised) vector
    gamma_rule: GammaRule = "sweep"  # γ the artifact carries: the KL bound's, or the sweep's best (else the KL's)
    max_accuracy_drop: float = 0.02  # the sweep's best γ shortens most within this accuracy loss
    n_eval: int = 300  # held-out test problems (EVAL_SEED): baseline, KL-bound γ and the selected γ
    n_select: int | None = None  # selection split (SELECT_SEED, disjoint from the test): the sweep chooses here;
    # None: as many problems as n_eval
    temperature: float = 1.0
    seed: int = 0
    max_new_tokens: int = 1024
    batch_size: int = 64
    grader: str = "organism"  # grades the evaluation questions: organism | gsm8k | math

    def __post_init__(self) -> None:
        if self.grader not in GRADERS:
            raise ValueError(f"grader {self.grader!r} is not one of {', '.join(GRADERS)}")
        if self.layer < 0 or any(x < 0 for x in self.layers):
            raise ValueError(f"layers must be >= 0, got {[self.layer, *self.layers]}")
        if self.extract_at not in EXTRACT_CHOICES:
            raise ValueError(f"extract_at {self.extract_at!r} is not one of {', '.join(EXTRACT_CHOICES)}")
        if self.vector not in VECTOR_CHOICES:
            raise ValueError(f"vector {self.vector!r} is not one of {', '.join(VECTOR_CHOICES)}")
        if self.positions not in LEARN_POSITIONS:
            raise ValueError(f"positions {self.positions!r} is not one of {', '.join(LEARN_POSITIONS)}")
        if self.vector == "learned" and self.extract_at != "end":
            raise ValueError("extract_at applies to the mean difference; a learned vector reads the whole pair")
        self.learn_config()  # raises on a bad learning setting
        if self.n_pairs < 1 or self.n_calibration < 1 or self.n_eval < 1:
            raise ValueError("n_pairs, n_calibration and n_eval must be >= 1")
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if any(not math.isfinite(g) or g < 0 for g in self.sweep):
            raise ValueError(f"sweep strengths must be finite and >= 0, got {list(self.sweep)}")
        if self.reduce not in ("last", "mean"):
            raise ValueError(f"reduce {self.reduce!r} is not one of last, mean")
        if self.n_select is not None and self.n_select < 1:
            raise ValueError(f"n_select must be >= 1, got {self.n_select}")
        if self.pairs not in PAIR_CHOICES:
            raise ValueError(f"pairs {self.pairs!r} is not one of {', '.join(PAIR_CHOICES)}")
        if self.k_samples < 2:
            raise ValueError(f"k_samples must be >= 2 (a shortest and a longest sample), got {self.k_samples}")
        if self.gamma_rule not in GAMMA_CHOICES:
            raise ValueError(f"gamma_rule {self.gamma_rule!r} is not one of {', '.join(GAMMA_CHOICES)}")
        if self.gamma_rule == "sweep" and not self.sweep:
            raise ValueError("gamma_rule 'sweep' needs at least one sweep strength")
        if self.temperature < 0 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("temperature must be >= 0, max_new_tokens and batch_size >= 1")

    def learn_config(self) -> LearnConfig:
        """The learned vector's optimisation (``vector="learned"``)."""
        return LearnConfig(
            steps=self.learn_steps,
            kl_weight=self.kl_weight,
            positions=self.positions,
            seed=self.seed,
            micro_batch=self.learn_micro_batch,
        )


# ---------------------------------------------------------------------------- the KL-bounded strength


def kl_bound(a: float, lip: float, gamma: float) -> float:
    """Eq. 10: ¼a²γ² + ¼Laγ³ + (1/16)L²γ⁴, an upper bound on KL(p ‖ p̃) for a unit direction."""
    return 0.25 * a * a * gamma**2 + 0.25 * lip * a * gamma**3 + lip * lip * gamma**4 / 16


def _cubic_root(beta: float) -> float:
    """The positive root of x³ + x² − β = 0 (β > 0), by Newton from √β (right of the root; f is convex there).

    The paper's Cardano form takes √Δ of Δ = β²/4 − β/27 < 0 whenever β < 4/27; Newton needs no case split.
    """
    x = min(math.sqrt(beta), beta ** (1 / 3))
    for _ in range(200):
        step = (x**3 + x * x - beta) / (3 * x * x + 2 * x)
        x -= step
        if abs(step) <= 1e-15 * max(1.0, x):
            break
    return x


def asc_gamma_max(a: float, lip: float, epsilon: float = 1e-3) -> float:
    """γ_max for a unit direction (App. A.1, eqs. 11-13), with the edge cases a = 0 and L = 0."""
    if a < 0 or lip < 0 or not epsilon > 0:
        raise ValueError(f"need a >= 0, L >= 0 and epsilon > 0, got a={a}, L={lip}, epsilon={epsilon}")
    if a == 0 and lip == 0:
        raise ValueError("a = L = 0: the direction does not move the logits, so no KL budget bounds γ")
    ratio = lip / a / a if a > 0 else math.inf  # L/a², formed without a**4 (OverflowError at a = 1e200)
    beta = 4 * epsilon * ratio * ratio
    if not math.isfinite(beta):  # a = 0, or L dwarfs a: the L²γ⁴ term alone spends the budget
        return (16 * epsilon) ** 0.25 / math.sqrt(lip)
    if beta == 0:  # L = 0, or a dwarfs L: the a²γ² term alone
        return 2 * math.sqrt(epsilon) / a
    x = _cubic_root(beta)
    raw = a / lip * x
    return max(0.0, (1 - lip * raw / (4 * a)) * raw)


def _layers(layer: int | Sequence[int]) -> tuple[int, ...]:
    return (layer,) if isinstance(layer, int) else tuple(layer)


def _passes(handle: Any, seqs: Sequence[Sequence[int]]) -> list[list[int]]:
    """Indices of ``seqs`` in length-sorted forward passes whose logits fit the logit budget."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    return [[order[k] for k in group] for group in passes([len(seqs[i]) for i in order], vocab_size(handle))]


def _last_logits(
    handle: Any, seqs: Sequence[Sequence[int]], layers: tuple[int, ...], delta: torch.Tensor
) -> torch.Tensor:
    """Last-position logits ``[n, vocab]`` (float32) with ``delta [len(layers), d]`` added to those blocks'
    outputs at the last position."""

    def hook(x: torch.Tensor, k: int) -> torch.Tensor:
        x = x.clone()
        x[:, -1] = x[:, -1] + delta[k].to(x)
        return x

    hooks = {f"blocks.{layer}.hook_resid_post": (lambda x, k=k: hook(x, k)) for k, layer in enumerate(layers)}
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    for rows in _passes(handle, seqs):
        ids, mask = handle.left_padded([seqs[i] for i in rows])
        with torch.no_grad():
            last = handle.unembed(handle.run_hidden(ids, mask, hooks=hooks)[:, -1]).float()  # the last position only
        for r, i in enumerate(rows):
            out[i] = last[r]
    return torch.stack(out)


def _encode(handle: Any, texts: Sequence[str]) -> list[list[int]]:
    seqs = [list(handle.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    if not seqs or not all(seqs):
        raise ValueError("the KL bound needs at least one text, and no empty text (it reads the last token)")
    return seqs


def estimate_a_l(
    handle: Any, texts: Sequence[str], layer: int | Sequence[int], direction: torch.Tensor, rel_step: float = 1e-2
) -> dict[str, float]:
    """a = median ‖J v̂‖ and L = p95 ‖∂²F/∂t²‖ at the last token of ``texts``, by central differences in fp32
    (a bfloat16/float16 model runs in float32 here, :meth:`ModelHandle.in_float32`: a second difference at a step of
    1% of the residual is far below their rounding).

    ``direction``: ``[d]`` for one layer, or ``[len(layer), d]`` for several, perturbed together (v̂ is the unit
    vector over all of them). The step is ``rel_step`` times the median residual norm at that point (over layers).
    """
    with handle.in_float32():
        return _estimate_a_l(handle, texts, layer, direction, rel_step)


def _estimate_a_l(
    handle: Any, texts: Sequence[str], layer: int | Sequence[int], direction: torch.Tensor, rel_step: float
) -> dict[str, float]:
    layers = _layers(layer)
    unit = direction.float().reshape(len(layers), -1)
    unit = unit / unit.norm()
    seqs = _encode(handle, texts)
    names = [f"blocks.{x}.hook_resid_post" for x in layers]
    norms = torch.zeros(len(seqs), len(layers))
    for rows in _passes(handle, seqs):
        with torch.no_grad():
            cache = handle.run_with_cache(*handle.left_padded([seqs[i] for i in rows]), names)
        norms[rows] = torch.stack([cache[n][:, -1].float().norm(dim=-1).cpu() for n in names], dim=1)
    dt = rel_step * float(norms.median(dim=0).values.median())
    f0 = _last_logits(handle, seqs, layers, torch.zeros_like(unit))
    fp = _last_logits(handle, seqs, layers, dt * unit)
    fm = _last_logits(handle, seqs, layers, -dt * unit)
    a_i = ((fp - fm) / (2 * dt)).norm(dim=-1)
    l_i = ((fp - 2 * f0 + fm) / dt**2).norm(dim=-1)
    return {"a": float(a_i.median()), "L": float(torch.quantile(l_i, 0.95)), "step": dt, "n_points": len(texts)}


def measured_kl(handle: Any, texts: Sequence[str], layer: int | Sequence[int], delta: torch.Tensor) -> dict[str, float]:
    """Median and 95th percentile of KL(p ‖ p̃) between unsteered and steered next-token distributions (in float32:
    a bfloat16 model's rounding alone reads as KL near the 1e-3 budget)."""
    layers = _layers(layer)
    delta = delta.float().reshape(len(layers), -1)
    seqs = _encode(handle, texts)
    with handle.in_float32():
        p = torch.log_softmax(_last_logits(handle, seqs, layers, torch.zeros_like(delta)), -1)
        q = torch.log_softmax(_last_logits(handle, seqs, layers, delta), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    return {"median": float(kl.median()), "p95": float(torch.quantile(kl, 0.95)), "max": float(kl.max())}


def kl_gamma(
    handle: Any, vec: SteeringVector, texts: Sequence[str], layer: int | Sequence[int], epsilon: float
) -> dict[str, Any]:
    """The KL-bounded γ for ``vec``'s (unnormalised) directions at ``layer`` (one or several, together), with a,
    L and the measured KL. A bfloat16/float16 model is run in float32 for these (:meth:`ModelHandle.in_float32`):
    a second difference at a step of 1% of the residual is far below their rounding."""
    layers = _layers(layer)
    v = torch.stack([vec.direction(x) for x in layers])
    with handle.in_float32():
        est = estimate_a_l(handle, texts, layers, v)
        unit_gamma = asc_gamma_max(est["a"], est["L"], epsilon)
        gamma = unit_gamma / float(v.norm())
        kl = measured_kl(handle, texts, layers, gamma * v)
    return {
        "gamma": gamma,
        "gamma_unit": unit_gamma,
        "vector_norm": float(v.norm()),
        "epsilon": epsilon,
        **est,
        "bound": kl_bound(est["a"], est["L"], unit_gamma),
        "measured_kl": kl,
    }


# ---------------------------------------------------------------------------- pairs, evaluation, the run


@dataclass(frozen=True)
class Pair:
    """One extraction pair: the prompt (chat-formatted, ending where the thinking begins) and two thinking texts for
    it, ``concise`` (the direction's target) and ``verbose``."""

    prompt: str
    concise: str
    verbose: str


def read_pairs(path: str | Path, chat_prompt: Callable[[str], str]) -> list[Pair]:
    """Pairs from a JSONL file: one object a line with ``concise`` and ``verbose`` thinking texts and either
    ``prompt`` (used as is) or ``question`` (formatted by ``chat_prompt``, e.g. ``handle.chat_prompt``)."""
    pairs = []
    for n, row in numbered_records(path):  # a bad line raises naming file and line
        keys = ("concise", "verbose", "prompt" if "prompt" in row else "question")
        if not all(isinstance(row.get(k), str) and row[k].strip() for k in keys):
            raise ValueError(
                f"{path}:{n}: a pair needs non-empty strings 'concise', 'verbose' and 'prompt' or 'question'"
            )
        if row["concise"] == row["verbose"]:
            raise ValueError(f"{path}:{n}: 'concise' equals 'verbose', so the pair holds no difference")
        prompt = row["prompt"] if "prompt" in row else chat_prompt(row["question"])
        pairs.append(Pair(prompt, row["concise"], row["verbose"]))
    if not pairs:
        raise ValueError(f"{path} holds no pairs; write JSONL rows {{'question', 'concise', 'verbose'}}")
    return pairs


def asc_pairs(handle: Any, problems: Sequence[task.Problem], seed: int = 0) -> list[Pair]:
    """The organism task's concise and verbose thinking for each problem, with the same slips in both."""
    out = []
    for i, p in enumerate(problems):
        concise = task.think(p, random.Random(seed * 1_000_003 + i), "concise").text
        verbose = task.think(p, random.Random(seed * 1_000_003 + i), "verbose").text
        out.append(Pair(handle.chat_prompt(p.question), concise, verbose))
    return out


def _traces(
    handle: Any, questions: Sequence[Question], temperature: float, cfg: ASCConfig, seed: int, progress: bool = False
) -> list[Trace]:
    return answer_questions(
        handle, questions, cfg.grader, temperature, seed, cfg.max_new_tokens, cfg.batch_size, progress
    )


def efficiency_pairs(handle: Any, questions: Sequence[Question], cfg: ASCConfig, progress: bool = False) -> list[Pair]:
    """The shortest and the longest correct of ``cfg.k_samples`` temperature-1 traces per question.

    Questions with fewer than two correct samples of different lengths are skipped.
    """
    k = cfg.k_samples
    traces = _traces(handle, [q for q in questions for _ in range(k)], 1.0, cfg, cfg.seed + 1, progress)
    out = []
    for i in range(len(questions)):
        ok = [t for t in traces[i * k : (i + 1) * k] if t.grade and t.think_span]
        if len(ok) < 2:
            continue
        a, b = min(ok, key=think_tokens), max(ok, key=think_tokens)
        if think_tokens(a) < think_tokens(b):
            out.append(Pair(a.prompt, a.thinking, b.thinking))
    if not out:
        raise ValueError(
            f"no question had two correct samples of different lengths among {k}; raise k_samples or n_pairs"
        )
    return out


def evaluate_gammas(
    handle: Any,
    vec: SteeringVector,
    gammas: Sequence[float],
    questions: Sequence[Question],
    cfg: ASCConfig,
    layer: int | Sequence[int] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Accuracy and thinking tokens of ``handle`` at each γ through the generation engine, steering at
    ``cfg.positions`` (``layer``: only that one, or those together; None: all of the vector's).

    Every γ samples with the same seed, so question i draws the same random stream at each γ (paired comparison).
    """
    layers = None if layer is None else _layers(layer)
    where: dict[str, Any] = {"layer": layer} if isinstance(layer, int) else {"layers": list(layers)} if layers else {}
    out = []
    for g in gammas:
        with vec.apply(handle, gamma=g, layers=layers, positions=cfg.positions):
            traces = _traces(handle, questions, cfg.temperature, cfg, cfg.seed, progress)
        out.append({"gamma": g, **where, **summarize(traces)})
    return out


def selection_problems(n: int, exclude: Sequence[task.Problem]) -> list[task.Problem]:
    """``n`` problems of the selection stream (SELECT_SEED), none equal to a problem of ``exclude`` (the test set)."""
    taken = {p.uid for p in exclude}
    out: list[task.Problem] = []
    k = n
    while len(out) < n:
        out = [p for p in task.problems(k, SELECT_SEED) if p.uid not in taken][:n]
        k += n
    return out


def _splits(
    handle: Any, cfg: ASCConfig, questions: Sequence[Question] | None
) -> tuple[list[Question], list[Question], list[Question], dict[str, Any]]:
    """(selection, test, efficiency-pair) questions and how they were split: the organism streams, or the rows of
    ``questions`` in order (selection first, then test, then the efficiency pairs' questions)."""
    n_select = cfg.n_eval if cfg.n_select is None else cfg.n_select
    if questions is None:
        test_p = task.problems(cfg.n_eval, EVAL_SEED)
        select = organism_questions(handle, selection_problems(n_select, test_p))
        pool = organism_questions(handle, task.problems(cfg.n_pairs, cfg.seed))
        split: dict[str, Any] = {
            "test": {"n": cfg.n_eval, "seed": EVAL_SEED},
            "select": {"n": n_select, "seed": SELECT_SEED},
        }
        return select, organism_questions(handle, test_p), pool, split
    need = n_select + cfg.n_eval
    if len(questions) < need:
        raise ValueError(
            f"{len(questions)} questions: the selection split takes the first {n_select} and the test the next "
            f"{cfg.n_eval}; pass at least {need} or lower n_select / n_eval"
        )
    pool = list(questions[need : need + cfg.n_pairs])
    if cfg.pairs == "efficiency" and not pool:
        raise ValueError(
            f"efficiency pairs sample questions after the first {need} (selection and test), and there are none; "
            "pass more questions or lower n_select / n_eval"
        )
    split = {"select": {"n": n_select, "rows": [0, n_select]}, "test": {"n": cfg.n_eval, "rows": [n_select, need]}}
    return list(questions[:n_select]), list(questions[n_select:need]), pool, split


def _best(rows: list[dict[str, Any]], baseline: dict[str, Any], max_drop: float) -> dict[str, Any] | None:
    """The sweep row with the fewest thinking tokens that is shorter than the baseline within the accuracy loss."""
    floor = baseline["accuracy"] - max_drop - 1e-12
    ok = [r for r in rows if r["accuracy"] >= floor and r["mean_think_tokens"] < baseline["mean_think_tokens"]]
    return min(ok, key=lambda r: r["mean_think_tokens"]) if ok else None


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("layer", "layers", "gamma", "accuracy", "mean_think_tokens", "truncated_fraction")
    return {k: r[k] for k in keys if k in r}


def _first_token(handle: Any, text: str) -> str:
    """The first token of ``text``, decoded."""
    ids = handle.tokenizer(text, add_special_tokens=False)["input_ids"]
    return handle.tokenizer.decode(ids[:1])


def _reduction(row: dict[str, Any], baseline: dict[str, Any]) -> float:
    base = baseline["mean_think_tokens"]
    return round(1 - row["mean_think_tokens"] / base, 4) if base else 0.0


def run_asc(
    handle: Any,
    cfg: ASCConfig,
    out: str | Path | None = None,
    progress: bool = False,
    *,
    pairs: Sequence[Pair] | None = None,
    questions: Sequence[Question] | None = None,
) -> dict[str, Any]:
    """Extract the concise − verbose vector, choose layer and γ on a selection split, evaluate on held-out questions.

    ``pairs``: the extraction pairs (e.g. :func:`read_pairs`; None: ``cfg.pairs`` of the organism task, or the
    efficiency pairs sampled on ``questions``). ``questions`` (graded by ``cfg.grader``): the first ``n_select``
    are the selection split, the next ``n_eval`` the test, the rest feed efficiency pairs; None: the organism task
    (selection stream SELECT_SEED, test EVAL_SEED, disjoint). The fixed-γ sweep (every candidate layer x
    ``cfg.sweep``) runs on the selection split; the test questions are generated only at γ = 0, the KL-bound γ
    and the selected γ. ``cfg.vector = "learned"`` learns one vector over all candidate layers together
    (:func:`steering.learned.learn_vector`), so the sweep chooses γ only. Writes the artifact at ``out``. Returns
    the report (``gamma``, ``gamma_rule``, ``baseline``, ``steered``, ``length_reduction``, ``sweep``,
    ``kl_bound``, ...).
    """
    g = handle.geometry
    candidates = tuple(dict.fromkeys(cfg.layers or (cfg.layer,)))
    for layer in candidates:
        if layer >= g.n_layers:
            raise ValueError(f"layer {layer} does not exist in {handle.source} (layers 0..{g.n_layers - 1})")
    if questions is None and cfg.grader != "organism":
        raise ValueError(f"grader {cfg.grader!r} grades given questions; the default ones are the organism task's")
    organism = speaks_organism(handle.tokenizer)
    if questions is None and not organism:
        raise ValueError(f"{handle.source} does not speak the organism task's format: pass questions= (and pairs=)")
    if questions is not None and cfg.grader == "organism" and not organism:
        raise ValueError(
            f"questions for {handle.source} would be graded as organism answers: pass ASCConfig(grader='gsm8k') "
            "or grader='math'"
        )
    select, test, pool, split = _splits(handle, cfg, questions)
    given = pairs is not None
    if pairs is None:
        if cfg.pairs == "styles":
            pairs = asc_pairs(handle, task.problems(cfg.n_pairs, cfg.seed), cfg.seed)
        else:
            pairs = efficiency_pairs(handle, pool, cfg, progress)
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no pairs given; pass concise/verbose pairs (read_pairs) or leave pairs=None")
    prompts = [p.prompt for p in pairs]
    if cfg.extract_at == "start":
        read_c = [p.prompt + _first_token(handle, p.concise) for p in pairs]
        read_v = [p.prompt + _first_token(handle, p.verbose) for p in pairs]
    else:
        read_c = [p.prompt + p.concise for p in pairs]
        read_v = [p.prompt + p.verbose for p in pairs]
    paper = "ASC arXiv 2507.04742 v2" if cfg.pairs == "styles" else "Efficiency Steering arXiv 2506.15647"
    if cfg.vector == "learned":
        paper += "; vector learned under a KL trust region (ASC, ACL 2026 Findings, in spirit)"
    recipe = {"paper": paper, "pairs_given": given, "n_pairs_used": len(pairs), **asdict(cfg)}
    choices: list[int | tuple[int, ...]]  # what the sweep chooses among: one block, or the learned blocks together
    if cfg.vector == "learned":
        learn = cfg.learn_config()
        targets = [p.concise + handle.think_end for p in pairs]
        sources = [p.verbose + handle.think_end for p in pairs]
        vec = learn_vector(handle, prompts, targets, sources, candidates, learn, recipe)
        choices = [candidates[0] if len(candidates) == 1 else candidates]
    else:
        vec = extract_vector(handle, read_c, read_v, list(candidates), cfg.reduce, "mean_diff", cfg.positions, recipe)
        choices = list(candidates)
    if cfg.positions == "prompt":  # the KL bound's points are where the vector acts
        calib = prompts[: cfg.n_calibration]
    else:
        calib = [t for pair in zip(read_c, read_v) for t in pair][: cfg.n_calibration]
    kls = {c: kl_gamma(handle, vec, calib, c, cfg.epsilon) for c in choices}

    select_base = evaluate_gammas(handle, vec, [0.0], select, cfg, choices[0], progress)[0]
    sweeps = {c: evaluate_gammas(handle, vec, list(cfg.sweep), select, cfg, c, progress) for c in choices}
    sweep = [row for rows in sweeps.values() for row in rows]
    best = _best(sweep, select_base, cfg.max_accuracy_drop)
    chosen_at = next((c for c, rows in sweeps.items() if any(r is best for r in rows)), choices[0])
    layers = _layers(chosen_at)
    kl = kls[chosen_at]
    gammas = [0.0, kl["gamma"]] + ([best["gamma"]] if best is not None else [])
    rows = evaluate_gammas(handle, vec, gammas, test, cfg, chosen_at, progress)
    baseline, at_kl = rows[0], rows[1]
    at_best = rows[2] if best is not None else None
    chosen = at_kl if cfg.gamma_rule == "kl_bound" or at_best is None else at_best
    rule = "kl_bound" if chosen is at_kl else "sweep"
    report = {
        "model": handle.source,
        "layer": chosen_at if isinstance(chosen_at, int) else None,
        "layers": list(layers),
        "vector": cfg.vector,
        "positions": cfg.positions,
        "gamma": chosen["gamma"],
        "gamma_rule": rule,
        "extract_at": cfg.extract_at,
        "kl_bound": {**kl, "layers": list(layers)},
        "kl_gamma_eval": {**_brief(at_kl), "length_reduction": _reduction(at_kl, baseline)},
        "best_sweep_gamma": None if best is None else best["gamma"],
        "best_sweep_eval": None
        if at_best is None
        else {**_brief(at_best), "length_reduction": _reduction(at_best, baseline)},
        "baseline": baseline,
        "steered": chosen,
        "length_reduction": _reduction(chosen, baseline),
        "accuracy_change": round(chosen["accuracy"] - baseline["accuracy"], 4),
        "split": split,
        "select_baseline": _brief(select_base),
        "sweep": [_brief(r) for r in sweep],
        "kl_gamma_by_layer": {",".join(map(str, _layers(c))): kls[c]["gamma"] for c in choices},
        "config": asdict(cfg),
    }
    if cfg.vector == "learned":
        report["learned"] = {k: vec.meta.recipe[k] for k in ("final_p_target", "final_mean_kl", "n_pairs")}
    detail = {
        "epsilon": cfg.epsilon,
        "a": kl["a"],
        "L": kl["L"],
        "kl_gamma": kl["gamma"],
        "sweep": list(cfg.sweep),
        "selected_on": f"{len(select)} questions, "
        + (f"seed {SELECT_SEED}" if questions is None else f"rows {split['select']['rows']} of the given questions"),
    }
    vec = SteeringVector(torch.stack([vec.direction(x) for x in layers]), replace(vec.meta, layers=layers))
    vec = vec.with_gamma(chosen["gamma"], rule, detail)
    if out is not None:
        vec.save(out, report=report)
    return report
