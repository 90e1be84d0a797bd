"""Online early exit during generation (:func:`reasonscope.generation.generate`): force ``</think>`` when a signal
crosses a threshold, and compare policies over a threshold sweep.

Policies, evaluated inside ``on_token`` on each row that is still thinking:

* ``probe``: at a segment boundary (the input token ends a sentence), a fitted :class:`~probes.probeset.ProbeSet`
  reads the residual of that token (a hook on its best layer); exit when ``p >= threshold``.
* ``deviation``: the reasoning path deviation index (:mod:`probes.entropy`) from the model's own next-token
  entropies since ``<think>``, checked at boundaries once ``window`` tokens were thought; exit when ``> threshold``.
* ``deer``: DEER-style (Yang et al. 2025, arXiv 2504.15895): when the model is about to write a "wait"-type cue,
  a trial answer is decoded greedily after ``</think>``; exit (instead of the cue) when the mean probability of the
  trial tokens is ``> threshold``.
* ``none``: vanilla generation (the reference for tokens saved).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from reasonscope.generation import Batch, DecodeConfig, generate
from reasonscope.traces import GRADERS

from .entropy import entropy

if TYPE_CHECKING:  # pragma: no cover
    from reasonscope.models import ModelHandle

    from .probeset import ProbeSet

Policy = Literal["none", "probe", "deviation", "deer"]
POLICIES: tuple[Policy, ...] = get_args(Policy)
BOUNDARY_CHARS = (".", "?", "!", "\n")
CUE_WORDS = ("wait", "hmm", "alternatively")


@dataclass(frozen=True)
class MonitorConfig:
    """One policy at one threshold; ``min_think`` thinking tokens come before any exit.

    ``consecutive``: the probe and deviation policies exit once this many boundaries in a row crossed the
    threshold (probes.md §2.5). ``boundaries``: a token whose text (trailing spaces removed) ends with one of
    these ends a segment.
    """

    policy: Policy = "none"
    threshold: float = 0.9
    window: int = 32
    min_think: int = 0
    consecutive: int = 1
    max_new_tokens: int = 640
    batch_size: int = 32
    temperature: float = 0.0  # > 0: sampled; each request's stream is fixed by (seed, request, step) across policies
    seed: int = 0
    trial_tokens: int = 4
    grader: str = "organism"
    boundaries: tuple[str, ...] = BOUNDARY_CHARS

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for name in ("window", "consecutive", "max_new_tokens", "batch_size", "trial_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.min_think < 0 or self.temperature < 0 or not math.isfinite(self.threshold):
            raise ValueError("min_think and temperature must be >= 0 and threshold a finite number")
        if not self.boundaries or not all(isinstance(b, str) and b for b in self.boundaries):
            raise ValueError(f"boundaries must be non-empty strings, got {self.boundaries!r}")
        if self.grader not in GRADERS:
            raise ValueError(f"grader must be one of {sorted(GRADERS)}, got {self.grader!r}")


@dataclass
class Outcome:
    """One generation under a policy: thinking tokens spent, whether it exited early, its answer and grade."""

    think_tokens: int
    exited: bool
    answer: str
    correct: bool


def token_sets(handle: ModelHandle, boundaries: tuple[str, ...] = BOUNDARY_CHARS) -> tuple[torch.Tensor, torch.Tensor]:
    """``[vocab]`` bool masks: tokens ending a segment, and tokens that are a cue word."""
    tok = handle.tokenizer
    texts = [tok.decode([i]) for i in range(len(tok))]
    boundary = torch.tensor([t.rstrip(" ").endswith(boundaries) for t in texts])
    cue = torch.tensor([t.strip().strip(",.").lower() in CUE_WORDS for t in texts])
    return boundary, cue


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
    resid: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.closed, self.exited, self.last = [False] * self.n, [False] * self.n, [-1] * self.n
        self.seq = [[] for _ in range(self.n)]
        self.ent_sum, self.ent_n = [0.0] * self.n, [0] * self.n
        self.recent = [deque(maxlen=self.window) for _ in range(self.n)]
        self.streak = [0] * self.n


class _Monitor:
    """The ``on_token`` callback (and residual hook) of one policy."""

    def __init__(self, handle: ModelHandle, prompts: list[list[int]], cfg: MonitorConfig, probes: ProbeSet | None):
        self.handle, self.prompts, self.cfg, self.probes = handle, prompts, cfg, probes
        end = handle.think_ids[1]
        if end is None:
            raise ValueError("the model's vocabulary has no </think> token; the monitor needs a thinking model")
        self.end_id: int = end
        self.boundary, self.cue = token_sets(handle, cfg.boundaries)
        self.state = _State(len(prompts), cfg.window)

    def hooks(self) -> dict[str, Any]:
        if self.cfg.policy != "probe":
            return {}
        assert self.probes is not None

        def keep(x: torch.Tensor) -> None:
            self.state.resid = x[:, -1].detach().float()

        return {self.probes.best_hook: keep}

    def __call__(self, batch: Batch, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        st, cfg = self.state, self.cfg
        rows = batch.rows.tolist()
        chosen = tokens.tolist()
        ent = entropy(logits).tolist() if cfg.policy == "deviation" else None
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
            at_boundary = not batch.prefill and bool(self.boundary[st.last[q]])
            if cfg.policy == "none" or thought < cfg.min_think:
                continue
            if cfg.policy == "probe" and at_boundary:
                assert self.probes is not None and st.resid is not None
                hit = float(self.probes.predict(st.resid[r])) >= cfg.threshold
                st.streak[q] = st.streak[q] + 1 if hit else 0
            elif cfg.policy == "deviation" and at_boundary and st.ent_n[q] >= cfg.window:
                rpdi = (sum(st.recent[q]) / cfg.window) / max(st.ent_sum[q] / st.ent_n[q], 1e-12)
                st.streak[q] = st.streak[q] + 1 if rpdi > cfg.threshold else 0
            elif cfg.policy == "deer" and bool(self.cue[chosen[r]]):
                deer_rows.append(r)
            if st.streak[q] >= cfg.consecutive:
                exit_rows.append(r)
        if deer_rows:
            conf = self._trial_confidence([rows[r] for r in deer_rows])
            exit_rows += [r for r, c in zip(deer_rows, conf) if c > cfg.threshold]
        for r in exit_rows:
            chosen[r] = self.end_id
            st.exited[rows[r]] = True
        for r, q in enumerate(rows):
            if q >= 0 and not st.closed[q]:
                st.seq[q].append(chosen[r])
                st.last[q] = chosen[r]
                st.closed[q] = chosen[r] == self.end_id
        return torch.tensor(chosen, device=tokens.device) if exit_rows else None

    def _trial_confidence(self, reqs: list[int]) -> list[float]:
        """Mean probability of the greedy trial answer's tokens after ``</think>`` (EOS excluded)."""
        probs: dict[int, list[float]] = {i: [] for i in range(len(reqs))}
        eos = self.handle.tokenizer.eos_token_id

        def record(batch: Batch, tokens: torch.Tensor, logits: torch.Tensor) -> None:
            p = torch.softmax(logits, -1).gather(1, tokens[:, None])[:, 0].tolist()
            for i, q in enumerate(batch.rows.tolist()):
                if q >= 0 and int(tokens[i]) != eos:
                    probs[q].append(p[i])

        trials = [self.prompts[q] + self.state.seq[q] + [self.end_id] for q in reqs]
        generate(
            self.handle,
            trials,
            DecodeConfig(max_new_tokens=self.cfg.trial_tokens, batch_size=len(trials)),
            on_token=record,
        )
        return [sum(v) / len(v) if v else 0.0 for v in (probs[i] for i in range(len(reqs)))]


def run_monitor(
    handle: ModelHandle,
    prompts: Sequence[str],
    golds: Sequence[str],
    cfg: MonitorConfig,
    probes: ProbeSet | None = None,
) -> list[Outcome]:
    """Generate an answer to each prompt under ``cfg``'s policy; grade it against ``golds``."""
    if cfg.policy == "probe":
        if probes is None:
            raise ValueError("the probe policy needs fitted probes (probes=ProbeSet.open(...); CLI: --probes)")
        probes.check_handle(handle)
    if len(prompts) != len(golds):
        raise ValueError(f"{len(prompts)} prompts but {len(golds)} gold answers")
    ids = [list(handle.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    mon = _Monitor(handle, ids, cfg, probes)
    done = generate(
        handle,
        ids,
        DecodeConfig(cfg.max_new_tokens, cfg.temperature, seed=cfg.seed, batch_size=cfg.batch_size),
        hooks=mon.hooks(),
        on_token=mon,
    )
    grader = GRADERS[cfg.grader]
    out = []
    for q, c in enumerate(done):
        gen = c.token_ids
        k = gen.index(mon.end_id) if mon.end_id in gen else len(gen)
        answer = handle.tokenizer.decode(gen[k + 1 :], skip_special_tokens=True) if k < len(gen) else ""
        ok = k < len(gen) and bool(grader.is_correct(grader.extract(answer), golds[q]))
        out.append(Outcome(think_tokens=k, exited=mon.state.exited[q], answer=answer.strip(), correct=ok))
    return out


def summarize(outcomes: Sequence[Outcome], reference: Sequence[Outcome]) -> dict[str, float]:
    """Accuracy, mean thinking tokens, share exited early and thinking tokens saved against ``reference``."""
    spent = sum(o.think_tokens for o in outcomes)
    base = sum(o.think_tokens for o in reference)
    n = max(1, len(outcomes))
    return {
        "accuracy": sum(o.correct for o in outcomes) / n,
        "think_tokens": spent / n,
        "exited": sum(o.exited for o in outcomes) / n,
        "saved_fraction": 1 - spent / base if base else 0.0,
    }


def sweep(
    handle: ModelHandle,
    prompts: Sequence[str],
    golds: Sequence[str],
    thresholds: Mapping[Policy, Sequence[float]],
    base: MonitorConfig = MonitorConfig(),
    probes: ProbeSet | None = None,
) -> dict[str, dict[str, float]]:
    """The trade-off curve: ``{"none": ..., "<policy>@<threshold>": {accuracy, think_tokens, saved_fraction}}``."""
    from dataclasses import replace

    ref = run_monitor(handle, prompts, golds, replace(base, policy="none"), probes)
    out = {"none": summarize(ref, ref)}
    for policy, values in thresholds.items():
        for v in values:
            cfg = replace(base, policy=policy, threshold=float(v))
            out[f"{policy}@{v:g}"] = summarize(run_monitor(handle, prompts, golds, cfg, probes), ref)
    return out
