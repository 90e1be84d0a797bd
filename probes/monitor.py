"""Online early exit during generation (:func:`reasonscope.generation.generate`): force ``</think>`` when a signal
crosses a threshold, and compare policies over a threshold sweep.

Policies, evaluated inside ``on_token`` on each row that is still thinking:

* ``probe``: at a segment boundary (the input token ends a sentence: ``.`` then whitespace, see :func:`token_sets`),
  a fitted :class:`~probes.probeset.ProbeSet` reads the residual of that token (a hook on its best layer); exit
  when ``p >= threshold``.
* ``deviation``: the reasoning path deviation index (:mod:`probes.entropy`) from the model's own next-token
  entropies since ``<think>``, checked at boundaries once ``window`` tokens were thought; exit when ``> threshold``.
* ``deer``: DEER-style (Yang et al. 2025, arXiv 2504.15895): when the model is about to write a "wait"-type cue,
  a trial answer is decoded greedily (the grader's :func:`probes.forced.answer_prompt`: after ``</think>`` for the
  organisms, after ``**Final Answer** \\boxed`` inside the thinking up to the closing brace for math models); exit
  (instead of the cue) when the mean probability of the trial tokens is ``> threshold``.
* ``none``: vanilla generation (the reference for tokens saved).

A forced exit writes ``</think>`` and the grader's answer lead (``\\boxed{`` for math models), then leaves the
answer ``answer_tokens``.

The trade-off curve (:func:`sweep`) does not regenerate per threshold: one *recorded* reference run keeps every
signal each policy reads (probe score and deviation index at each boundary, the trial confidence at each cue) with
the step it was read at. Up to its exit a policy's generation *is* the reference (the sampled stream of request
``i``'s token ``t`` is fixed by ``(seed, i, t)``), so :func:`replay` finds each policy's exit step from the record
and decodes only what follows the forced ``</think>``, drawing from the same stream: the outcome equals
:func:`run_monitor`'s (tested). :func:`choose` picks each policy's threshold on a validation split (the largest
saving whose accuracy loss against the reference stays within ``max_loss``, with a one-sided 95% margin), to
be reported on a disjoint test split.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from reasonscope.generation import Batch, DecodeConfig, generate
from reasonscope.traces import GRADERS

from .entropy import entropy
from .forced import AnswerPrompt, answer_prompt, exit_ids

if TYPE_CHECKING:  # pragma: no cover
    from reasonscope.models import ModelHandle

    from .probeset import ProbeSet

Policy = Literal["none", "probe", "deviation", "deer"]
POLICIES: tuple[Policy, ...] = get_args(Policy)
SIGNALS: tuple[Policy, ...] = ("probe", "deviation", "deer")
BOUNDARY_CHARS = (".", "?", "!", "\n")
CUE_WORDS = ("wait", "hmm", "alternatively")
LOSS_Z = 1.645  # choose(): a threshold's accuracy loss is bounded one-sided at 95%, paired by problem


@dataclass(frozen=True)
class MonitorConfig:
    """One policy at one threshold; ``min_think`` thinking tokens come before any exit.

    ``consecutive``: the probe and deviation policies exit once this many boundaries in a row crossed the
    threshold (probes.md §2.5). ``answer_tokens``: after a *forced* ``</think>`` and the grader's answer lead the
    answer gets at most this many tokens, then EOS (as forced answers in :mod:`probes.forced`): a model that keeps
    reasoning after an early exit has not answered, and those tokens would otherwise be thinking the saving does not
    count. ``trial_tokens``: the DEER trial's budget. Both default to the grader's
    :func:`~probes.forced.answer_prompt`. ``boundaries``: a
    token whose text (trailing spaces removed) ends with one of these ends a segment when whitespace follows it, in
    the token itself or at the start of the next one (``1.5`` has no segment end; see :func:`token_sets`).
    """

    policy: Policy = "none"
    threshold: float = 0.9
    window: int = 32
    min_think: int = 0
    consecutive: int = 1
    max_new_tokens: int = 1024
    batch_size: int = 32
    temperature: float = 0.0  # > 0: sampled; each request's stream is fixed by (seed, request, step) across policies
    seed: int = 0
    trial_tokens: int | None = None  # None: the grader's answer_prompt (4 organism, 20 math)
    answer_tokens: int | None = None  # None: the grader's answer_prompt (8 organism, 32 math)
    grader: str = "organism"
    boundaries: tuple[str, ...] = BOUNDARY_CHARS

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for name in ("window", "consecutive", "max_new_tokens", "batch_size", "trial_tokens", "answer_tokens"):
            v = getattr(self, name)
            if v is None and name in ("trial_tokens", "answer_tokens"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.min_think < 0 or self.temperature < 0 or not math.isfinite(self.threshold):
            raise ValueError("min_think and temperature must be >= 0 and threshold a finite number")
        if not self.boundaries or not all(isinstance(b, str) and b for b in self.boundaries):
            raise ValueError(f"boundaries must be non-empty strings, got {self.boundaries!r}")
        if self.grader not in GRADERS:
            raise ValueError(f"grader must be one of {sorted(GRADERS)}, got {self.grader!r}")

    @property
    def answering(self) -> AnswerPrompt:
        """The grader's :func:`~probes.forced.answer_prompt` with this config's token budgets."""
        base = answer_prompt(self.grader)
        return replace(
            base,
            answer_tokens=base.answer_tokens if self.answer_tokens is None else self.answer_tokens,
            trial_tokens=base.trial_tokens if self.trial_tokens is None else self.trial_tokens,
        )


@dataclass
class Outcome:
    """One generation under a policy: thinking tokens spent, whether it exited early, its answer and grade."""

    think_tokens: int
    exited: bool
    answer: str
    correct: bool
    trial_tokens: int = 0  # DEER: tokens its trial answers decoded (a cost beside the thinking)


def token_sets(
    handle: ModelHandle, boundaries: tuple[str, ...] = BOUNDARY_CHARS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[vocab]`` masks. ``boundary`` (int8): 0 for a token that ends no segment; 2 for one whose text ends with a
    boundary and then whitespace (``".\n"``, ``". "``, ``"\n"``), which ends a segment by itself; 1 for one that ends
    with a boundary and nothing after it (``"."``, ``"5."``), which ends a segment only when the next token opens with
    whitespace (``opens``), as :func:`reasonscope.traces.split_sentences` reads ``.`` (a decimal point is no end).
    ``cue``: tokens that are a cue word."""
    tok = handle.tokenizer
    texts = [tok.decode([i]) for i in range(len(tok))]
    ends = [t.rstrip(" ").endswith(boundaries) for t in texts]
    boundary = torch.tensor([(1 + t[-1].isspace()) if e else 0 for t, e in zip(texts, ends)], dtype=torch.int8)
    opens = torch.tensor([t[:1].isspace() for t in texts])
    cue = torch.tensor([t.strip().strip(",.").lower() in CUE_WORDS for t in texts])
    return boundary, opens, cue


@dataclass
class _State:
    """Per-request bookkeeping of one monitored generation."""

    n: int
    window: int
    closed: list[bool] = field(default_factory=list)
    exited: list[bool] = field(default_factory=list)
    last: list[int] = field(default_factory=list)
    seq: list[list[int]] = field(default_factory=list)
    ent_sum: list[float] = field(default_factory=list)
    ent_n: list[int] = field(default_factory=list)
    recent: list[deque[float]] = field(default_factory=list)
    streak: list[int] = field(default_factory=list)
    after: list[int] = field(default_factory=list)
    lead: list[list[int]] = field(default_factory=list)  # answer-lead tokens still to force after an exit
    trials: list[list[int]] = field(default_factory=list)  # the tokens each DEER trial decoded
    resid: torch.Tensor | None = None
    events: dict[str, list[list[tuple[int, float]]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.closed, self.exited, self.last = [False] * self.n, [False] * self.n, [-1] * self.n
        self.seq = [[] for _ in range(self.n)]
        self.ent_sum, self.ent_n = [0.0] * self.n, [0] * self.n
        self.recent = [deque(maxlen=self.window) for _ in range(self.n)]
        self.streak = [0] * self.n
        self.after = [0] * self.n
        self.lead = [[] for _ in range(self.n)]
        self.trials = [[] for _ in range(self.n)]
        self.events = {k: [[] for _ in range(self.n)] for k in SIGNALS}


class _Monitor:
    """The ``on_token`` callback (and residual hook) of one policy."""

    def __init__(
        self,
        handle: ModelHandle,
        prompts: list[list[int]],
        cfg: MonitorConfig,
        probes: ProbeSet | None,
        record: bool = False,
    ):
        """``record``: never exit, keep every policy's signal with its step (``state.events``) instead."""
        self.handle, self.prompts, self.cfg, self.probes, self.record = handle, prompts, cfg, probes, record
        end = handle.think_ids[1]
        if end is None:
            raise ValueError("the model's vocabulary has no </think> token; the monitor needs a thinking model")
        self.end_id: int = end
        self.eos_id: int = int(handle.tokenizer.eos_token_id)
        self.answering = cfg.answering
        self.lead_ids = answer_lead(handle, self.answering)
        self.boundary, self.opens, self.cue = token_sets(handle, cfg.boundaries)
        self.state = _State(len(prompts), cfg.window)

    def hooks(self) -> dict[str, Any]:
        if self.probes is None or not (self.record or self.cfg.policy == "probe"):
            return {}

        def keep(x: torch.Tensor) -> None:
            self.state.resid = x[:, -1].detach().float()

        return {self.probes.best_hook: keep}

    def __call__(self, batch: Batch, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        st, cfg = self.state, self.cfg
        rows = batch.rows.tolist()
        chosen = tokens.tolist()
        # entropies from the first thinking token's own prediction on, as the offline index (entropy.chunk_signals)
        ent = entropy(logits).tolist() if (cfg.policy == "deviation" or self.record) and not batch.prefill else None
        exit_rows: list[int] = []
        deer_rows: list[int] = []
        for r, q in enumerate(rows):
            if q < 0 or st.closed[q]:
                continue
            if ent is not None:
                st.ent_sum[q] += ent[r]
                st.ent_n[q] += 1
                st.recent[q].append(ent[r])
            thought = len(st.seq[q])
            at_boundary = not batch.prefill and self._ends_segment(st.last[q], chosen[r])
            if self.record:
                if at_boundary and self.probes is not None:
                    assert st.resid is not None
                    st.events["probe"][q].append((thought, float(self.probes.predict(st.resid[r]))))
                if at_boundary and st.ent_n[q] >= cfg.window:
                    st.events["deviation"][q].append((thought, self._rpdi(q)))
                if bool(self.cue[chosen[r]]):
                    deer_rows.append(r)
                continue
            if cfg.policy == "none" or thought < cfg.min_think:
                continue
            if cfg.policy == "probe" and at_boundary:
                assert self.probes is not None and st.resid is not None
                hit = float(self.probes.predict(st.resid[r])) >= cfg.threshold
                st.streak[q] = st.streak[q] + 1 if hit else 0
            elif cfg.policy == "deviation" and at_boundary and st.ent_n[q] >= cfg.window:
                st.streak[q] = st.streak[q] + 1 if self._rpdi(q) > cfg.threshold else 0
            elif cfg.policy == "deer" and bool(self.cue[chosen[r]]):
                deer_rows.append(r)
            if st.streak[q] >= cfg.consecutive:
                exit_rows.append(r)
        if deer_rows:
            conf, spent = self._trial_confidence([rows[r] for r in deer_rows])
            for r, n in zip(deer_rows, spent):
                st.trials[rows[r]].append(n)
            if self.record:
                for r, c in zip(deer_rows, conf):
                    st.events["deer"][rows[r]].append((len(st.seq[rows[r]]), c))
            else:
                exit_rows += [r for r, c in zip(deer_rows, conf) if c > cfg.threshold]
        for r in exit_rows:
            chosen[r] = self.end_id
            st.exited[rows[r]] = True
            st.lead[rows[r]] = list(self.lead_ids)
        capped = False
        for r, q in enumerate(rows):
            if q >= 0 and st.closed[q] and st.exited[q]:  # after a forced exit: the lead, answer_tokens, then EOS
                st.after[q] += 1
                if st.lead[q]:
                    chosen[r], capped = st.lead[q].pop(0), True
                elif st.after[q] > len(self.lead_ids) + self.answering.answer_tokens:
                    chosen[r], capped = self.eos_id, True
            elif q >= 0 and not st.closed[q]:
                st.seq[q].append(chosen[r])
                st.last[q] = chosen[r]
                st.closed[q] = chosen[r] == self.end_id
        return torch.tensor(chosen, device=tokens.device) if exit_rows or capped else None

    def _ends_segment(self, token: int, following: int) -> bool:
        """Whether the input ``token`` ends a segment, given the token sampled after it (see :func:`token_sets`)."""
        b = int(self.boundary[token])
        return b == 2 or (b == 1 and bool(self.opens[following]))

    def _rpdi(self, q: int) -> float:
        st = self.state
        return (sum(st.recent[q]) / self.cfg.window) / max(st.ent_sum[q] / st.ent_n[q], 1e-12)

    def _trial_confidence(self, reqs: list[int]) -> tuple[list[float], list[int]]:
        """Mean probability of the greedy trial answer's tokens (EOS excluded, the first ``trial_skip`` skipped), and
        the tokens each trial decoded."""
        a = self.answering
        probs: dict[int, list[float]] = {i: [] for i in range(len(reqs))}
        eos = self.handle.tokenizer.eos_token_id

        def record(batch: Batch, tokens: torch.Tensor, logits: torch.Tensor) -> None:
            p = torch.softmax(logits, -1).gather(1, tokens[:, None])[:, 0].tolist()
            for i, q in enumerate(batch.rows.tolist()):
                if q >= 0 and int(tokens[i]) != eos:
                    probs[q].append(p[i])

        if a.trial is None:
            opener = [self.end_id, *self.lead_ids]
        else:
            opener = list(self.handle.tokenizer(a.trial, add_special_tokens=False)["input_ids"])
        trials = [self.prompts[q] + self.state.seq[q] + opener for q in reqs]
        cfg = DecodeConfig(max_new_tokens=a.trial_tokens, batch_size=len(trials), stop=a.trial_stop)
        done = generate(self.handle, trials, cfg, on_token=record)
        read = [probs[i][a.trial_skip :] for i in range(len(reqs))]
        return [sum(v) / len(v) if v else 0.0 for v in read], [len(c.token_ids) for c in done]


def answer_lead(handle: ModelHandle, answering: AnswerPrompt) -> list[int]:
    """Token ids a forced exit writes after ``</think>`` (its answer lead: none for the organisms)."""
    close = exit_ids(handle, answering.suffix)
    return close[1:] if close and close[0] == handle.think_ids[1] else close


def _prompt_ids(handle: ModelHandle, prompts: Sequence[str], golds: Sequence[str]) -> list[list[int]]:
    if len(prompts) != len(golds):
        raise ValueError(f"{len(prompts)} prompts but {len(golds)} gold answers")
    return [list(handle.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]


def _outcome(handle: ModelHandle, gen: Sequence[int], gold: str, end_id: int, exited: bool, grader: str) -> Outcome:
    """Grade one generation (thinking, ``</think>``, answer): no ``</think>`` means no answer."""
    k = list(gen).index(end_id) if end_id in gen else len(gen)
    answer = handle.tokenizer.decode(list(gen[k + 1 :]), skip_special_tokens=True) if k < len(gen) else ""
    g = GRADERS[grader]
    ok = k < len(gen) and bool(g.is_correct(g.extract(answer), gold))
    return Outcome(think_tokens=k, exited=exited, answer=answer.strip(), correct=ok)


def _decode_config(cfg: MonitorConfig) -> DecodeConfig:
    return DecodeConfig(cfg.max_new_tokens, cfg.temperature, seed=cfg.seed, batch_size=cfg.batch_size)


def run_monitor(
    handle: ModelHandle,
    prompts: Sequence[str],
    golds: Sequence[str],
    cfg: MonitorConfig,
    probes: ProbeSet | None = None,
) -> list[Outcome]:
    """Generate an answer to each prompt under ``cfg``'s policy, live; grade it against ``golds``."""
    if cfg.policy == "probe":
        if probes is None:
            raise ValueError("the probe policy needs fitted probes (probes=ProbeSet.open(...); CLI: --probes)")
        probes.check_handle(handle)
    ids = _prompt_ids(handle, prompts, golds)
    mon = _Monitor(handle, ids, cfg, probes)
    done = generate(handle, ids, _decode_config(cfg), hooks=mon.hooks(), on_token=mon)
    return [
        replace(
            _outcome(handle, c.token_ids, golds[q], mon.end_id, mon.state.exited[q], cfg.grader),
            trial_tokens=sum(mon.state.trials[q]),
        )
        for q, c in enumerate(done)
    ]


@dataclass
class Recording:
    """A reference (``none``) run with every policy's signals: ``events[policy][i]`` = ``[(step, value)]``.

    ``step`` = thinking tokens already written when the signal was read, i.e. where a policy exiting on it puts
    ``</think>``; ``probe`` events exist only when probes were given. ``trials[i]``: the tokens each ``deer`` event's
    trial answer decoded.
    """

    prompts: list[list[int]]
    golds: list[str]
    cfg: MonitorConfig
    tokens: list[list[int]]
    events: dict[str, list[list[tuple[int, float]]]]
    end_id: int
    reference: list[Outcome]
    trials: list[list[int]]


def record(
    handle: ModelHandle,
    prompts: Sequence[str],
    golds: Sequence[str],
    cfg: MonitorConfig,
    probes: ProbeSet | None = None,
) -> Recording:
    """One reference generation that keeps every policy's signal (probe, deviation index, DEER trial confidence)."""
    if probes is not None:
        probes.check_handle(handle)
    ids = _prompt_ids(handle, prompts, golds)
    mon = _Monitor(handle, ids, cfg, probes, record=True)
    done = generate(handle, ids, _decode_config(cfg), hooks=mon.hooks(), on_token=mon)
    tokens = [list(c.token_ids) for c in done]
    ref = [_outcome(handle, t, golds[q], mon.end_id, False, cfg.grader) for q, t in enumerate(tokens)]
    return Recording(ids, list(golds), cfg, tokens, mon.state.events, mon.end_id, ref, mon.state.trials)


def exit_step(events: Sequence[tuple[int, float]], policy: Policy, threshold: float, cfg: MonitorConfig) -> int | None:
    """Where ``policy`` at ``threshold`` puts ``</think>`` given one request's recorded signals (None: never)."""
    streak = 0
    for step, v in events:
        if step < cfg.min_think:
            continue
        if policy == "deer":
            if v > threshold:
                return step
            continue
        hit = v >= threshold if policy == "probe" else v > threshold
        streak = streak + 1 if hit else 0
        if streak >= cfg.consecutive:
            return step
    return None


def _finish(handle: ModelHandle, rec: Recording, cuts: set[tuple[int, int]]) -> dict[tuple[int, int], Outcome]:
    """Outcome of request ``q`` forced to close its thinking at step ``s``, for every ``(q, s)`` in ``cuts``.

    The answer (at most ``answer_tokens``) is decoded after ``prefix + </think>`` and the answer lead with the
    reference's sampling stream (token ``t`` of request ``q`` draws ``uniform(seed, q, t)``) and its length budget,
    exactly as the live policy would continue.
    """
    cfg, out = rec.cfg, {}
    closing = [rec.end_id, *answer_lead(handle, cfg.answering)]
    todo = []
    for q, s in sorted(cuts):
        forced = [*rec.tokens[q][:s], *closing]
        if len(forced) >= cfg.max_new_tokens:  # the budget ends inside the forced tokens
            out[q, s] = _outcome(handle, forced[: cfg.max_new_tokens], rec.golds[q], rec.end_id, True, cfg.grader)
        else:
            todo.append((q, s))
    if not todo:
        return out
    offsets = [s + len(closing) for _, s in todo]
    prompts = [rec.prompts[q] + rec.tokens[q][:s] + closing for q, s in todo]
    budget = min(cfg.answering.answer_tokens, max(cfg.max_new_tokens - o for o in offsets))
    dec = DecodeConfig(budget, cfg.temperature, seed=cfg.seed, batch_size=cfg.batch_size)
    streams = [(q, o) for (q, _), o in zip(todo, offsets)]
    for (q, s), o, c in zip(todo, offsets, generate(handle, prompts, dec, streams=streams)):
        gen = [*rec.tokens[q][:s], *closing, *c.token_ids[: cfg.max_new_tokens - o]]
        out[q, s] = _outcome(handle, gen, rec.golds[q], rec.end_id, True, cfg.grader)
    return out


def point_key(policy: str, threshold: float) -> str:
    """A curve's key for ``policy`` at ``threshold``: ``probe@0.9``, exact (``:g`` where it reads back as the same
    float, ``repr`` otherwise, so thresholds equal to six digits keep their own points)."""
    short = f"{float(threshold):g}"
    return f"{policy}@{short if float(short) == float(threshold) else repr(float(threshold))}"


def replay(
    handle: ModelHandle, rec: Recording, thresholds: Mapping[Policy, Sequence[float]]
) -> dict[str, list[Outcome]]:
    """Outcomes of each ``policy@threshold`` from ``rec`` (same as :func:`run_monitor` with that policy)."""
    for policy in thresholds:
        if policy not in SIGNALS:
            raise ValueError(f"policy must be one of {', '.join(SIGNALS)}, got {policy!r}")
        if policy == "probe" and not any(rec.events["probe"]) and rec.tokens:
            raise ValueError("the probe policy needs fitted probes: record the reference with probes=")
    plans = {
        point_key(policy, v): [exit_step(ev, policy, float(v), rec.cfg) for ev in rec.events[policy]]
        for policy, values in thresholds.items()
        for v in values
    }
    cuts = {(q, s) for plan in plans.values() for q, s in enumerate(plan) if s is not None}
    done = _finish(handle, rec, cuts)
    out = {k: [rec.reference[q] if s is None else done[q, s] for q, s in enumerate(plan)] for k, plan in plans.items()}
    for k, outcomes in out.items():
        if k.startswith("deer@"):  # the trials a live run decodes: every cue from min_think on, up to its exit
            spent = [_trials_until(rec, q, s) for q, s in enumerate(plans[k])]
            out[k] = [replace(o, trial_tokens=n) for o, n in zip(outcomes, spent)]
    return out


def _trials_until(rec: Recording, q: int, exit_at: int | None) -> int:
    """Trial tokens request ``q`` decodes under a DEER policy exiting at step ``exit_at`` (None: never)."""
    return sum(
        n
        for (step, _), n in zip(rec.events["deer"][q], rec.trials[q])
        if step >= rec.cfg.min_think and (exit_at is None or step <= exit_at)
    )


def summarize(outcomes: Sequence[Outcome], reference: Sequence[Outcome]) -> dict[str, float]:
    """Accuracy, mean thinking tokens, share exited early, thinking tokens saved against ``reference``, mean DEER
    trial tokens (decoded beside the thinking) and ``loss_se``, the standard error of the accuracy lost against
    ``reference``, paired by problem."""
    spent = sum(o.think_tokens for o in outcomes)
    base = sum(o.think_tokens for o in reference)
    n = max(1, len(outcomes))
    drops = [float(r.correct) - float(o.correct) for o, r in zip(outcomes, reference)]  # paired: same problems
    mean_drop = sum(drops) / n
    var = sum((d - mean_drop) ** 2 for d in drops) / max(1, len(drops) - 1)
    return {
        "accuracy": sum(o.correct for o in outcomes) / n,
        "loss_se": math.sqrt(var / n),
        "think_tokens": spent / n,
        "exited": sum(o.exited for o in outcomes) / n,
        "saved_fraction": 1 - spent / base if base else 0.0,
        "trial_tokens": sum(o.trial_tokens for o in outcomes) / n,
    }


def curve(handle: ModelHandle, rec: Recording, thresholds: Mapping[Policy, Sequence[float]]) -> dict[str, dict]:
    """The trade-off curve of a recording: ``{"none": ..., "<policy>@<threshold>": {accuracy, ...}}``."""
    out = {"none": summarize(rec.reference, rec.reference)}
    for k, outcomes in replay(handle, rec, thresholds).items():
        out[k] = summarize(outcomes, rec.reference)
    return out


def choose(
    points: Mapping[str, Mapping[str, float]], max_loss: float = 0.01, z: float = LOSS_Z
) -> dict[str, dict[str, float]]:
    """Per policy, the threshold of ``points`` (a :func:`curve`) saving most thinking tokens while the accuracy it
    loses against ``none`` stays within ``max_loss`` with ``z`` standard errors to spare (``loss + z·loss_se``; the
    default is a one-sided 95% bound; ``z=0``: the point estimate). Ties: the higher accuracy. Policies with no such
    point are left out. Without the margin the rule lands where accuracy starts to fall, and the test split falls."""
    if z < 0:
        raise ValueError(f"z must be >= 0 (standard errors of margin), got {z}")
    floor = points["none"]["accuracy"] - max_loss - 1e-9
    best: dict[str, dict[str, float]] = {}
    for key, r in points.items():
        if "@" not in key or r["accuracy"] - z * r.get("loss_se", 0.0) < floor:
            continue
        policy, t = key.split("@")
        cur = best.get(policy)
        if cur is None or (r["saved_fraction"], r["accuracy"]) > (cur["saved_fraction"], cur["accuracy"]):
            best[policy] = {**r, "threshold": float(t)}
    return best


def sweep(
    handle: ModelHandle,
    prompts: Sequence[str],
    golds: Sequence[str],
    thresholds: Mapping[Policy, Sequence[float]],
    base: MonitorConfig = MonitorConfig(),
    probes: ProbeSet | None = None,
) -> dict[str, dict[str, float]]:
    """The trade-off curve: ``{"none": ..., "<policy>@<threshold>": {accuracy, think_tokens, saved_fraction}}``."""
    if "probe" in thresholds and probes is None:
        raise ValueError("the probe policy needs fitted probes (probes=ProbeSet.open(...); CLI: --probes)")
    return curve(handle, record(handle, prompts, golds, base, probes), thresholds)
