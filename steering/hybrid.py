"""Hybrid base/thinking steering ("Base Models Know How to Reason, Thinking Models Learn When"; steering.md §3).

Pipeline (:func:`run_hybrid`):

1. **Rollouts.** The thinking model samples traces (temperature 1) on training problems (a seed stream disjoint from
   the held-out evaluation problems). Sentences are token spans (:func:`steering.behaviours.sentence_spans`).
2. **Taxonomy** (§3.1). Sentence-mean activations of the thinking model at ``sae_layer``, centred and normalised,
   train a top-k TinySAE; a sentence's behaviour is its argmax latent (``labels="sae"``), or the annotated type
   (``labels="annotated"``: the organisms' known sentence types). Agreement of the SAE latents with the known
   types (purity, ARI, NMI) is reported either way.
3. **"Which"**: a behaviour selector reads the thinking model at the token that ends a sentence and picks the
   behaviour of the next one: a softmax probe trained on the rollouts (``selector="probe"``), or the SAE argmax of
   that token's activation as the paper's ``hybrid_token.py`` does (``selector="sae"``).
4. **Vectors** (§3.2), one per behaviour, for the base model at ``steer_layer`` (output of that block):
   ``optimised`` (v4 recipe: the rollouts teacher-forced through the base; at positions where the base's greedy
   token differs from the thinking model's, ``bias + V[behaviour of the sentence being written]`` is added and
   ``V``, ``bias`` minimise the cross-entropy of the thinking model's token) or ``mean_diff`` (mean base residual
   over the behaviour's sentences of the rollouts minus the mean over the base's own unsteered outputs).
5. **Hybrid inference** (§3.3): :func:`reasonscope.generation.generate` on the base with the thinking model as
   its companion, so both read one shared token sequence; every emitted token is the base's. At each step the
   greedy next tokens of both models are compared; where they agree the token is drawn from the base's unsteered
   distribution at ``temperature`` (the engine's per-(seed, request, step) uniforms); where they differ the base
   re-runs that position with ``c·(bias + V[b])`` added at ``steer_layer`` for each ``c`` in ``coefficients``,
   and the greedy token of the candidate the thinking model finds most likely is emitted (the perplexity
   guardrail). The steered position's keys and values stay in the base's cache (as in the training pass).

Format: the thinking model's chat prompt ``<|user|>q<|assistant|><think>`` is the shared prefix (the organisms'
base continues it, mostly by closing ``</think>`` at once, and thinks there when started); any base/thinking pair
that shares one tokenizer runs on a dataset's questions the same way (``questions``, ``train_questions``).
Base, thinking and hybrid are generated from that same prompt and graded by one grader (the organisms':
format-neutral :func:`final_answer`; a dataset's: its own), so the gap is measured on the format the hybrid uses.
Controls: behaviours chosen at random at each sentence start, and vectors replaced by random directions of the
same norms, both with the same "when" rule and guardrail.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from reasonscope.artifacts import ARTIFACT_FORMATS, DAMAGED, ArtifactDir, CorruptFileError, reading, write_artifact
from reasonscope.budget import passes, sum_by_runs, vocab_size
from reasonscope.generation import Batch, DecodeConfig, current_batch, generate, uniform
from reasonscope.organisms import task
from reasonscope.organisms.evaluate import EVAL_SEED
from reasonscope.traces import GRADERS

from .behaviours import Taxonomy, agreement, ends_sentence, fit_sae, normalise_rows, organism_labels, sentence_spans
from .questions import Question, grade_completion, organism_questions
from .vector import SteeringVector, VectorMeta

__all__ = [
    "KIND",
    "HybridConfig",
    "HybridRun",
    "Rollout",
    "Steerer",
    "discover_behaviours",
    "final_answer",
    "hybrid_generate",
    "mean_diff_vectors",
    "optimise_vectors",
    "rollouts",
    "run_hybrid",
    "sentence_table",
    "train_selector",
]

KIND = "hybrid_run"
TRAIN_SEED = 2_000_003  # training problems for taxonomy/vectors: disjoint from the organisms' and EVAL_SEED streams
Labels = Literal["sae", "annotated"]
Vectors = Literal["optimised", "mean_diff"]
Selector = Literal["probe", "sae"]
Mode = Literal["hybrid", "random_behaviour", "random_vectors"]
LABELS: tuple[Labels, ...] = get_args(Labels)
VECTORS: tuple[Vectors, ...] = get_args(Vectors)
SELECTORS: tuple[Selector, ...] = get_args(Selector)
MODES: tuple[Mode, ...] = get_args(Mode)
RECORDS_FILE, SUMMARY_FILE, TAXONOMY_FILE, TENSORS_FILE = (
    "records.jsonl",
    "summary.json",
    "taxonomy.json",
    "tensors.safetensors",
)


@dataclass(frozen=True)
class HybridConfig:
    """One hybrid run: taxonomy, vectors, selector, inference and the held-out evaluation."""

    sae_layer: int = 2  # thinking-model block whose output the taxonomy and the selector read
    steer_layer: int = 0  # base-model block whose output is steered (0 beat 1 on the 4-layer organisms)
    n_latents: int = 8  # SAE latents (behaviours) K
    topk: int = 3
    labels: Labels = "sae"
    vectors: Vectors = "optimised"
    selector: Selector = "probe"
    # guardrail candidates c·(bias + V[b]). On the organisms ‖bias + V[b]‖ is about the residual's norm at block 0:
    # pushes of c >= 0.75 open the thinking in any direction (random vectors then recover 87% of the gap)
    coefficients: tuple[float, ...] = (0.25, 0.5)
    n_train: int = 256  # training problems (thinking rollouts)
    train_steps: int = 100
    lr: float = 0.05
    n_eval: int = 300
    temperature: float = 1.0
    seed: int = 0
    max_new_tokens: int = 512  # the organisms' thinking: levels 3-5 run 240-400 tokens greedy
    batch_size: int = 64
    controls: bool = True
    grader: str = "organism"  # grades the evaluation questions: organism (format-neutral) | gsm8k | math

    def __post_init__(self) -> None:
        object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))
        if self.grader not in GRADERS:
            raise ValueError(f"grader {self.grader!r} is not one of {', '.join(GRADERS)}")
        if self.labels == "annotated" and self.grader != "organism":
            raise ValueError("labels 'annotated' are the organisms' sentence types; with a dataset use labels 'sae'")
        if self.sae_layer < 0 or self.steer_layer < 0:
            raise ValueError(f"layers must be >= 0, got sae_layer={self.sae_layer}, steer_layer={self.steer_layer}")
        if self.n_latents < 2 or not 1 <= self.topk <= self.n_latents:
            raise ValueError(f"need n_latents >= 2 and 1 <= topk <= n_latents, got {self.n_latents}, {self.topk}")
        for name, value, allowed in (
            ("labels", self.labels, LABELS),
            ("vectors", self.vectors, VECTORS),
            ("selector", self.selector, SELECTORS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if self.labels == "annotated" and self.selector == "sae":
            raise ValueError("selector 'sae' picks SAE latents; with labels 'annotated' use selector 'probe'")
        if not self.coefficients or any(not math.isfinite(c) or c <= 0 for c in self.coefficients):
            raise ValueError(f"coefficients must be finite and > 0, got {list(self.coefficients)}")
        if self.n_train < 2 or self.n_eval < 1 or self.train_steps < 0:
            raise ValueError("n_train must be >= 2, n_eval >= 1 and train_steps >= 0")
        if not self.lr > 0 or self.temperature < 0 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("lr must be > 0, temperature >= 0, max_new_tokens and batch_size >= 1")

    def check_models(self, base: Any, thinking: Any) -> None:
        """Refuse a pair that cannot share one token sequence, or layers they do not have."""
        gb, gt = base.geometry, thinking.geometry
        if self.steer_layer >= gb.n_layers:
            raise ValueError(f"steer_layer {self.steer_layer} does not exist in {base.source} (0..{gb.n_layers - 1})")
        if self.sae_layer >= gt.n_layers:
            raise ValueError(f"sae_layer {self.sae_layer} does not exist in {thinking.source} (0..{gt.n_layers - 1})")
        if base.tokenizer.get_vocab() != thinking.tokenizer.get_vocab():
            raise ValueError(
                f"{base.source} and {thinking.source} have different vocabularies; hybrid steering needs one shared "
                "token sequence (a shared tokenizer)"
            )


# ---------------------------------------------------------------------------- grading

_ANSWER = re.compile(r"(?:answer is|answer)\s*:\s*(-?\d+)")
_INT = re.compile(r"(?<![A-Za-z\d])-?\d+")  # a number, not the digit of a name such as g9


def final_answer(text: str, think_end: str = "</think>") -> int | None:
    """The answer a completion gives, in any of the formats the organisms write.

    After ``</think>`` if present (thinking format), else the last ``answer:N`` / ``answer is:N`` (notes format),
    else the first integer (a direct answer). End-of-text markers are ignored.
    """
    text = re.sub(r"<\|[a-z]+\|>", " ", text)
    if think_end in text:
        m = _INT.search(text.rsplit(think_end, 1)[1])
        return int(m.group()) if m else None
    found = _ANSWER.findall(text)
    if found:
        return int(found[-1])
    m = _INT.search(text)
    return int(m.group()) if m else None


def _grade(text: str, finished: bool, gold: str, grader: str) -> bool:
    """A finished completion's answer against ``gold``: :func:`final_answer` for the organisms, else the grader's."""
    if not finished:
        return False
    return final_answer(text) == int(gold) if grader == "organism" else grade_completion(text, gold, grader)


# ---------------------------------------------------------------------------- rollouts and sentences


@dataclass
class Rollout:
    """A thinking-model trace as token ids: the shared prompt and the generated tokens, with its sentences."""

    prompt_ids: list[int]
    gen_ids: list[int]
    spans: list[tuple[int, int]] = field(default_factory=list)  # sentence token spans in gen_ids
    truth: list[str] = field(default_factory=list)  # known sentence types (organisms)


def _texts(tok: Any, ids: Sequence[int]) -> list[str]:
    return [tok.decode([i]) for i in ids]


def rollouts(thinking: Any, prompts: Sequence[str], temperature: float, seed: int, cfg: HybridConfig) -> list[Rollout]:
    """Sample the thinking model on ``prompts`` and split each trace into sentences (with known types)."""
    tok = thinking.tokenizer
    dcfg = DecodeConfig(
        max_new_tokens=cfg.max_new_tokens, temperature=temperature, seed=seed, batch_size=cfg.batch_size
    )
    out = []
    for c in generate(thinking, list(prompts), dcfg):
        texts = _texts(tok, c.token_ids)
        spans = sentence_spans(texts, thinking.think_end)
        out.append(Rollout(c.prompt_ids, c.token_ids, spans, organism_labels(["".join(texts[a:b]) for a, b in spans])))
    return out


def _forward_all(
    handle: Any, seqs: Sequence[list[int]], layer: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(greedy next token ``[T]``, block ``layer`` output ``[T, d]``) of each full sequence: left-padded passes of
    at most ``batch_size`` sequences whose logits fit the logit budget."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for group in passes([len(x) for x in seqs], vocab_size(handle), batch_size):
        chunk = [seqs[i] for i in group]
        ids, mask = handle.left_padded(chunk)
        width = ids.shape[1]
        seen: dict[str, torch.Tensor] = {}

        def read(x: torch.Tensor, seen: dict[str, torch.Tensor] = seen) -> None:
            seen["x"] = x.detach().float().cpu()

        with torch.no_grad():
            hooks = {f"blocks.{layer}.hook_resid_post": read}
            greedy = torch.cat([lg.argmax(-1).cpu() for _, lg in handle.run_chunks(ids, mask, hooks)], 1)
        for b, x in enumerate(chunk):
            out.append((greedy[b, width - len(x) :], seen["x"][b, width - len(x) :]))
    return out


@dataclass
class SentenceTable:
    """Per sentence of the rollouts: activations, the token before it, its rollout, span and known type."""

    acts: torch.Tensor  # [n, d] mean over [start − 1, end) of the thinking model's layer output
    pre: torch.Tensor  # [n, d] the layer output at the token before the sentence (what the selector reads)
    owner: list[tuple[int, int]]  # (rollout, sentence index)
    truth: list[str]
    centre: torch.Tensor  # [d] mean over rollouts of each rollout's mean activation over its generated span
    think_argmax: list[torch.Tensor]  # per rollout: the thinking model's greedy token at each generated position


def sentence_table(thinking: Any, rolls: Sequence[Rollout], layer: int, batch_size: int = 32) -> SentenceTable:
    """Read the thinking model over its rollouts (teacher-forced) at block ``layer``."""
    if not rolls:
        raise ValueError("no rollouts to read sentences from")
    fw = _forward_all(thinking, [r.prompt_ids + r.gen_ids for r in rolls], layer, batch_size)
    acts, pre, owner, truth, means, argmax = [], [], [], [], [], []
    for i, (r, (greedy, x)) in enumerate(zip(rolls, fw)):
        p = len(r.prompt_ids)
        means.append(x[p - 1 :].mean(0))
        argmax.append(greedy[p - 1 : -1])
        for k, (a, b) in enumerate(r.spans):
            acts.append(x[p + a - 1 : p + b].mean(0))
            pre.append(x[p + a - 1])
            owner.append((i, k))
            truth.append(r.truth[k] if k < len(r.truth) else "other")
    if not acts:
        raise ValueError("the rollouts have no sentences")
    return SentenceTable(torch.stack(acts), torch.stack(pre), owner, truth, torch.stack(means).mean(0), argmax)


def discover_behaviours(table: SentenceTable, cfg: HybridConfig) -> Taxonomy:
    """Train the top-k SAE on the sentences; name each latent by its index and the known type it mostly holds."""
    x = normalise_rows(table.acts, table.centre)
    sae, report = fit_sae(x, cfg.n_latents, cfg.topk, seed=cfg.seed)
    if cfg.grader != "organism":  # no known sentence types to name the latents by
        return Taxonomy(sae, table.centre.clone(), tuple(map(str, range(cfg.n_latents))), {"sae": report})
    agree = agreement(sae.labels(x).tolist(), table.truth)
    names = tuple(f"{i}:{agree['majority'].get(str(i), 'unused')}" for i in range(cfg.n_latents))
    return Taxonomy(sae, table.centre.clone(), names, {"sae": report, "agreement": agree})


# ---------------------------------------------------------------------------- "which": the selector


@dataclass
class Steerer:
    """Everything hybrid inference needs: per-behaviour vectors, a bias, the names and the selector."""

    vectors: torch.Tensor  # [K, d] base-model directions, one per behaviour
    bias: torch.Tensor  # [d] added with every behaviour vector
    names: tuple[str, ...]
    layer: int  # base block whose output is steered
    read_layer: int  # thinking block the selector reads
    centre: torch.Tensor  # [d] the selector's input centre
    probe: torch.Tensor | None = None  # [d + 1, K] softmax probe (selector "probe"); None: SAE argmax
    sae: Any = None  # the taxonomy's SAE (selector "sae")
    allowed: tuple[int, ...] = ()  # behaviours the random control draws from (those seen in training)

    def __post_init__(self) -> None:
        k, d = self.vectors.shape
        if len(self.names) != k or self.bias.shape != (d,):
            raise ValueError(f"{k} vectors need {k} names and a [{d}] bias")
        if not bool(torch.isfinite(self.vectors).all() & torch.isfinite(self.bias).all()):
            raise ValueError("steering vectors hold NaN or inf")
        if self.probe is None and self.sae is None:
            raise ValueError("a Steerer needs a probe or an SAE to pick behaviours")
        if not self.allowed:
            self.allowed = tuple(range(k))

    def pick(self, acts: torch.Tensor) -> torch.Tensor:
        """Behaviour index for each row of thinking-model activations ``[rows, d]``."""
        x = normalise_rows(acts.float().cpu(), self.centre)
        if self.probe is not None:
            return (x @ self.probe[:-1] + self.probe[-1]).argmax(-1)
        return self.sae.labels(x)

    def randomised(self, seed: int) -> Steerer:
        """The control: what each behaviour adds, ``bias + V[b]``, replaced by a random direction of the same norm
        (and no bias), so every push has the norm of the real one."""
        g = torch.Generator().manual_seed(seed)
        added = self.vectors + self.bias
        r = torch.randn(added.shape, generator=g)
        vecs = r / r.norm(dim=-1, keepdim=True) * added.norm(dim=-1, keepdim=True)
        bias = torch.zeros_like(self.bias)
        return Steerer(
            vecs, bias, self.names, self.layer, self.read_layer, self.centre, self.probe, self.sae, self.allowed
        )


def train_selector(
    pre: torch.Tensor, labels: torch.Tensor, centre: torch.Tensor, k: int, seed: int = 0, steps: int = 300
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Softmax probe from the token before a sentence to the sentence's behaviour; returns ``[d + 1, k]`` and a
    report with held-out accuracy (20% of rows; the probe returned is refit on all rows)."""
    if len(pre) != len(labels) or len(pre) < 2:
        raise ValueError(f"train_selector needs >= 2 rows and one label per row, got {len(pre)} and {len(labels)}")
    x = normalise_rows(pre, centre)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_val = max(1, len(x) // 5)

    def fit(rows: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(seed)
        w = torch.zeros(x.shape[1] + 1, k, requires_grad=True)
        opt = torch.optim.Adam([w], lr=0.05)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(x[rows] @ w[:-1] + w[-1], labels[rows]) + 1e-4 * w.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return w.detach()

    held = fit(perm[n_val:])
    val = perm[:n_val]
    acc = float(((x[val] @ held[:-1] + held[-1]).argmax(-1) == labels[val]).float().mean())
    return fit(perm), {"held_out_accuracy": round(acc, 4), "n_rows": len(x), "n_val": n_val}


# ---------------------------------------------------------------------------- "how": the vectors


def _token_labels(rolls: Sequence[Rollout], owner: list[tuple[int, int]], labels: Sequence[int]) -> list[list[int]]:
    """Behaviour of the sentence containing each generated token (−1: in no sentence)."""
    out = [[-1] * len(r.gen_ids) for r in rolls]
    for (i, k), lab in zip(owner, labels):
        a, b = rolls[i].spans[k]
        out[i][a:b] = [int(lab)] * (b - a)
    return out


def optimise_vectors(
    base: Any,
    rolls: Sequence[Rollout],
    token_labels: Sequence[Sequence[int]],
    think_argmax: Sequence[torch.Tensor],
    k: int,
    cfg: HybridConfig,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """§3.2 v4: learn ``V [k, d]`` and ``bias [d]`` on the base at ``cfg.steer_layer``.

    The rollouts are teacher-forced through the base. At each generated position whose base greedy token differs
    from the thinking model's (and whose sentence has a behaviour), ``bias + V[behaviour]`` is added to the block's
    output; the loss is the cross-entropy of the thinking model's greedy token there. Returns V, bias, a report.
    """
    if len(rolls) != len(token_labels) or len(rolls) != len(think_argmax):
        raise ValueError("optimise_vectors needs one label list and one thinking-token list per rollout")
    d = base.geometry.d_model
    seqs = [r.prompt_ids + r.gen_ids for r in rolls]
    fw = _forward_all(base, seqs, cfg.steer_layer, cfg.batch_size)
    examples = []  # per rollout: (positions in the full sequence, labels, targets)
    n_pos = n_gen = 0
    for r, (greedy, _), labs, tgt in zip(rolls, fw, token_labels, think_argmax):
        p = len(r.prompt_ids)
        base_greedy = greedy[p - 1 : -1]
        lab = torch.tensor(list(labs), dtype=torch.long)
        keep = (base_greedy != tgt) & (lab >= 0)
        idx = keep.nonzero()[:, 0]
        examples.append((idx + p - 1, lab[idx], tgt[idx]))
        n_pos += len(idx)
        n_gen += len(r.gen_ids)
    if n_pos == 0:
        raise ValueError("the base agrees with the thinking model everywhere on these rollouts: nothing to steer")
    g = torch.Generator().manual_seed(cfg.seed)
    v0 = torch.randn(k, d, generator=g)
    vecs = (v0 / v0.norm(dim=-1, keepdim=True)).requires_grad_(True)
    bias = torch.zeros(d, requires_grad=True)
    opt = torch.optim.Adam([vecs, bias], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.train_steps))
    params = list(base.model.parameters())
    was = [q.requires_grad for q in params]
    mb = min(len(rolls), 16)
    vocab = vocab_size(base)
    losses: list[float] = []
    best = (math.inf, vecs.detach().clone(), bias.detach().clone())
    try:
        for q in params:
            q.requires_grad_(False)
        for _ in range(cfg.train_steps):
            pick = torch.randperm(len(rolls), generator=g)[:mb].tolist()
            n_step = sum(len(examples[i][0]) for i in pick)
            if n_step == 0:
                continue
            opt.zero_grad()
            loss = 0.0
            for part in passes([len(seqs[i]) for i in pick], vocab, mb):  # gradients accumulate pass by pass
                rows = [pick[j] for j in part]
                ce = _steered_ce(
                    base, [seqs[i] for i in rows], [examples[i] for i in rows], vecs, bias, cfg.steer_layer
                )
                if ce is not None:
                    (ce / n_step).backward()
                    loss += float(ce.detach()) / n_step
            losses.append(loss)
            if loss < best[0]:  # the parameters this loss was measured at, before the step moves them
                best = (loss, vecs.detach().clone(), bias.detach().clone())
            opt.step()
            sched.step()
    finally:
        for q, w in zip(params, was):
            q.requires_grad_(w)
    _, v_best, b_best = best
    report = {
        "method": "optimised",
        "disagreement_positions": n_pos,
        "teacher_forced_disagreement": round(n_pos / max(1, n_gen), 4),
        "loss_first": round(losses[0], 4) if losses else None,
        "loss_best": round(best[0], 4) if losses else None,
        "norms": [round(float(n), 3) for n in v_best.norm(dim=-1)],
        "bias_norm": round(float(b_best.norm()), 3),
    }
    return v_best, b_best, report


def _steered_ce(
    base: Any,
    seqs: Sequence[list[int]],
    examples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    vecs: torch.Tensor,
    bias: torch.Tensor,
    layer: int,
) -> torch.Tensor | None:
    """Summed cross-entropy of the thinking model's tokens at the examples' positions, with ``bias + V[behaviour]``
    added there to block ``layer``'s output (one left-padded pass to the final norm; those positions unembedded a
    run at a time, :func:`reasonscope.budget.sum_by_runs`); None when no position is in these rows."""
    ids, mask = base.left_padded(seqs)
    pads = (mask == 0).sum(1).tolist()
    rows = torch.tensor([b for b, (pos, _, _) in enumerate(examples) for _ in range(len(pos))], dtype=torch.long)
    if not len(rows):
        return None
    cols = torch.cat([pos + pads[b] for b, (pos, _, _) in enumerate(examples)])
    labs, tgts = torch.cat([lab for _, lab, _ in examples]), torch.cat([tgt for _, _, tgt in examples])
    delta = bias[None] + vecs[labs]

    def add(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[rows.to(x.device), cols.to(x.device)] += delta.to(x)
        return y

    hidden = base.run_hidden(ids, mask, hooks={f"blocks.{layer}.hook_resid_post": add})
    dev = hidden.device
    picked, tgts = hidden[rows.to(dev), cols.to(dev)], tgts.to(dev)  # [n, d]: those positions only

    def part(x: torch.Tensor, at: tuple) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(base.unembed(x).float(), tgts[at], reduction="sum")

    return sum_by_runs(picked, torch.ones(len(picked), dtype=torch.bool, device=dev), vocab_size(base), part)


def mean_diff_vectors(
    base: Any,
    rolls: Sequence[Rollout],
    token_labels: Sequence[Sequence[int]],
    own: Sequence[list[int]],
    own_prompt_lens: Sequence[int],
    k: int,
    cfg: HybridConfig,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Mean base residual at the positions that predict each behaviour's tokens of the rollouts, minus the mean over
    ``own`` (the base's own unsteered completions from the last prompt token on: what it does instead). Bias 0."""
    if len(own) != len(own_prompt_lens) or not own:
        raise ValueError("mean_diff_vectors needs the base's own sequences and one prompt length per sequence")
    fw = _forward_all(base, [r.prompt_ids + r.gen_ids for r in rolls], cfg.steer_layer, cfg.batch_size)
    d = base.geometry.d_model
    sums, counts = torch.zeros(k, d), torch.zeros(k)
    for r, (_, x), labs in zip(rolls, fw, token_labels):
        p = len(r.prompt_ids)
        lab = torch.tensor(list(labs), dtype=torch.long)
        for c in lab[lab >= 0].unique().tolist():
            rows = x[p - 1 : -1][lab == c]
            sums[c] += rows.sum(0)
            counts[c] += len(rows)
    own_fw = _forward_all(base, list(own), cfg.steer_layer, cfg.batch_size)
    src = torch.cat([x[p - 1 :] for (_, x), p in zip(own_fw, own_prompt_lens)])
    vecs = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None] - src.mean(0), torch.zeros(k, d))
    report = {
        "method": "mean_diff",
        "tokens_per_behaviour": counts.long().tolist(),
        "n_source_tokens": len(src),
        "norms": [round(float(n), 3) for n in vecs.norm(dim=-1)],
    }
    return vecs, torch.zeros(d), report


# ---------------------------------------------------------------------------- hybrid inference


@dataclass
class HybridOutput:
    """One request of :func:`hybrid_generate`: generated ids, the behaviour steered at each token (None: not
    steered), whether it ended with EOS, and at each steered token the push's norm over the residual's."""

    token_ids: list[int]
    behaviours: list[str | None]
    finished: bool
    pushes: list[float] = field(default_factory=list)


def hybrid_generate(
    base: Any,
    thinking: Any,
    prompts: Sequence[list[int]],
    steerer: Steerer,
    cfg: HybridConfig,
    mode: Mode = "hybrid",
    request_offset: int = 0,
) -> list[HybridOutput]:
    """Hybrid decoding of ``prompts`` (token ids, one shared sequence per request): :func:`generate` on the base
    with the thinking model as its companion, ``cfg.batch_size`` slots.

    ``mode``: ``hybrid``; ``random_behaviour`` (behaviour drawn uniformly among ``steerer.allowed`` at each
    sentence start); ``random_vectors`` (give a :meth:`Steerer.randomised` steerer; selection as ``hybrid``).
    Request ``i`` samples with the uniforms of ``(cfg.seed, request_offset + i, step)``, as :func:`generate`.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if any(not p for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    if not prompts:
        return []
    run = _Hybrid(base, thinking, len(prompts), steerer, cfg, mode, request_offset)
    dcfg = DecodeConfig(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=1.0,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
    )  # EOS: the tokenizer's and the base's generation_config's, as the base baseline stops
    comps = generate(
        base,
        [list(p) for p in prompts],
        dcfg,
        hooks={f"blocks.{steerer.layer}.hook_resid_post": run.steer},
        on_token=run.on_token,
        companion=thinking,
        companion_hooks={f"blocks.{steerer.read_layer}.hook_resid_post": run.read},
        streams=[(request_offset + i, 0) for i in range(len(prompts))],
    )
    return [
        HybridOutput(c.token_ids, run.behaviours[i], c.finish_reason == "eos", run.pushes[i])
        for i, c in enumerate(comps)
    ]


class _Hybrid:
    """One :func:`hybrid_generate` call: per-request behaviours, the two hooks and the ``on_token`` step.

    The thinking model (companion) hook reads ``read_layer`` at the last position; at each sentence start (the
    prompt, and after a token that ends a sentence or is ``</think>``) it picks the request's behaviour. Rows whose
    greedy tokens differ are re-run on the base with ``c·(bias + V[b])`` added at ``layer`` (the base hook), one
    re-run per coefficient; per row the candidate whose greedy token the thinking model finds most likely (first
    best on ties) is emitted and its keys and values stay in the cache.
    """

    def __init__(
        self, base: Any, thinking: Any, n: int, st: Steerer, cfg: HybridConfig, mode: Mode, offset: int
    ) -> None:
        dev = base.device
        self.st, self.cfg, self.mode, self.offset = st, cfg, mode, offset
        self.tok = base.tokenizer
        self.vecs, self.bias = st.vectors.to(dev), st.bias.to(dev)
        self.coefs = torch.tensor(cfg.coefficients, device=dev)
        self.behaviour = torch.zeros(n, dtype=torch.long)  # behaviour of the sentence each request is writing
        self.behaviours: list[list[str | None]] = [[] for _ in range(n)]
        self.pushes: list[list[float]] = [[] for _ in range(n)]  # ‖c·(bias + V[b])‖ / ‖h‖ of each emitted push
        self.resid = torch.ones(n + 1, device=dev)  # ‖h‖ at the steered layer and position, per request
        self.last = [-1] * n  # each request's last emitted token: its next input
        self.delta = torch.zeros(n + 1, st.vectors.shape[1], device=dev)  # row n (idle rows' -1) stays 0
        self.steering = False  # the base hook adds delta only while steered rows are re-run
        self.acts: torch.Tensor | None = None  # the thinking model's read_layer output at the last position
        self.starts: dict[int, bool] = {}

    def read(self, x: torch.Tensor) -> None:
        self.acts = x[:, -1]

    def steer(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.steering:
            return None
        rows = current_batch().rows  # type: ignore[union-attr]
        self.resid[rows] = x[:, -1].norm(dim=-1).to(self.resid)
        y = x.clone()
        y[:, -1] += self.delta[rows].to(x)
        return y

    def _starts(self, token: int) -> bool:
        """Whether the sentence after ``token`` is a new one."""
        if token not in self.starts:
            # as in training (behaviours.sentence_spans), the answer after </think> keeps the pick made where the
            # thinking's last sentence ended: no selector row was ever read at </think>
            self.starts[token] = ends_sentence(self.tok.decode([token]))
        return self.starts[token]

    def _choose(self, rows: list[int], requests: list[int], steps: list[int]) -> torch.Tensor:
        """Behaviour of the sentence starting at batch ``rows``: the thinking model's pick, or a seeded random one."""
        if self.mode == "random_behaviour":
            allowed, seed = self.st.allowed, self.cfg.seed ^ 0x5EED
            picks = [allowed[int(uniform(seed, self.offset + r, s) * len(allowed))] for r, s in zip(requests, steps)]
            return torch.tensor(picks, dtype=torch.long)
        return self.st.pick(self.acts[rows]).cpu()  # type: ignore[index]

    def on_token(self, batch: Batch, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        reqs, steps = batch.rows.tolist(), batch.n_generated.tolist()
        live = [i for i, r in enumerate(reqs) if r >= 0]
        starts = live if batch.prefill else [i for i in live if self._starts(self.last[reqs[i]])]
        if starts:
            who = [reqs[i] for i in starts]
            self.behaviour[who] = self._choose(starts, who, [steps[i] for i in starts])
        think = batch.companion_logits
        assert think is not None
        dis = ((think.argmax(-1) != logits.argmax(-1)) & (batch.rows >= 0)).nonzero()[:, 0]
        if len(dis):  # a steered position emits the token the guardrail chose, also when sampling
            tokens = tokens.clone()
            tokens[dis] = self._steered(batch, dis, think)
        steered = set(dis.tolist())
        out = tokens.tolist()
        for i in live:
            r = reqs[i]
            self.behaviours[r].append(self.st.names[int(self.behaviour[r])] if i in steered else None)
            self.last[r] = out[i]
        return tokens

    def _steered(self, batch: Batch, rows: torch.Tensor, think: torch.Tensor) -> torch.Tensor:
        """Greedy token of the winning candidate of each of ``rows``; leaves its keys and values in the cache."""
        req = batch.rows[rows]
        base_delta = self.bias[None] + self.vecs[self.behaviour[req.cpu()].to(self.vecs.device)]  # [r, d]
        cands = []
        self.steering = True
        try:
            for c in self.coefs:
                self.delta[req] = c * base_delta
                cands.append(batch.rerun(rows))
            cand = torch.stack(cands)  # [g, r, vocab]
            score = torch.log_softmax(think[rows], -1).gather(-1, cand.argmax(-1).T).T  # [g, r]
            best = score.argmax(0)  # first best: the smallest coefficient wins ties
            redo = (best != len(self.coefs) - 1).nonzero()[:, 0]  # the last re-run left the last candidate's KV
            if len(redo):
                self.delta[req[redo]] = self.coefs[best[redo], None] * base_delta[redo]
                batch.rerun(rows[redo])
            push = self.coefs[best] * base_delta.norm(dim=-1) / self.resid[req]
            for r, v in zip(req.tolist(), push.tolist()):
                self.pushes[r].append(v)
        finally:
            self.steering = False
            self.delta[req] = 0
        return cand[best, torch.arange(len(rows), device=best.device)].argmax(-1)


# ---------------------------------------------------------------------------- the run and its artifact


def build_steerer(base: Any, thinking: Any, rolls: Sequence[Rollout], cfg: HybridConfig) -> tuple[Steerer, dict]:
    """Taxonomy, behaviour labels, selector and vectors from thinking-model rollouts; returns the steerer and a
    report (agreement of the SAE with the known sentence types, selector accuracy, vector training)."""
    table = sentence_table(thinking, rolls, cfg.sae_layer, cfg.batch_size)
    tax = discover_behaviours(table, cfg)
    if cfg.labels == "sae":
        names, lab = tax.names, tax.labels(table.acts)
    else:
        names = tuple(sorted(set(table.truth)))
        lab = torch.tensor([names.index(t) for t in table.truth])
    k = len(names)
    counts = Counter(lab.tolist())
    report: dict[str, Any] = {
        "taxonomy": tax.report,
        "behaviours": {n: counts.get(i, 0) for i, n in enumerate(names)},
        "n_sentences": len(lab),
        "n_rollouts": len(rolls),
    }
    probe = None
    if cfg.selector == "probe":
        probe, report["selector"] = train_selector(table.pre, lab, table.centre, k, cfg.seed)
    else:
        acc = float((tax.labels(table.pre) == lab).float().mean())
        report["selector"] = {"in_sample_accuracy": round(acc, 4), "n_rows": len(lab)}
    tok_labels = _token_labels(rolls, table.owner, lab.tolist())
    if cfg.vectors == "optimised":
        vecs, bias, report["vectors"] = optimise_vectors(base, rolls, tok_labels, table.think_argmax, k, cfg)
    else:
        own_cfg = DecodeConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, batch_size=cfg.batch_size)
        own = [c.prompt_ids + c.token_ids for c in generate(base, [r.prompt_ids for r in rolls], own_cfg)]
        plens = [len(r.prompt_ids) for r in rolls]
        vecs, bias, report["vectors"] = mean_diff_vectors(base, rolls, tok_labels, own, plens, k, cfg)
    allowed = tuple(i for i in range(k) if counts.get(i, 0) > 0)
    steerer = Steerer(vecs, bias, names, cfg.steer_layer, cfg.sae_layer, table.centre, probe, tax.sae, allowed)
    return steerer, report


def _score(
    outs: Sequence[HybridOutput], tok: Any, golds: Sequence[str], grader: str
) -> tuple[list[bool], dict[str, Any]]:
    correct = [_grade(tok.decode(o.token_ids), o.finished, g, grader) for o, g in zip(outs, golds)]
    n_tok = sum(len(o.token_ids) for o in outs)
    n_steer = sum(b is not None for o in outs for b in o.behaviours)
    pushes = sorted(v for o in outs for v in o.pushes)
    return correct, {
        "accuracy": round(sum(correct) / len(correct), 4),
        "steered_token_fraction": round(n_steer / max(1, n_tok), 4),
        "mean_tokens": round(n_tok / len(outs), 2),
        "truncated_fraction": round(sum(not o.finished for o in outs) / len(outs), 4),
        "median_push_to_residual": round(pushes[len(pushes) // 2], 4) if pushes else None,
    }


def _gap(h: float, b: float, t: float) -> float | None:
    return None if t == b else round((h - b) / (t - b), 4)


def _by_level(correct: Sequence[bool], levels: Sequence[int | None]) -> dict[str, float]:
    acc: dict[int, list[bool]] = {}
    for c, lv in zip(correct, levels):
        if lv is not None:
            acc.setdefault(lv, []).append(c)
    return {str(k): round(sum(v) / len(v), 4) for k, v in sorted(acc.items())}


def run_hybrid(
    base_handle: Any,
    thinking_handle: Any,
    problems: Sequence[task.Problem] | None,
    cfg: HybridConfig,
    out: str | Path | None = None,
    replace: bool = False,
    *,
    questions: Sequence[Question] | None = None,
    train_questions: Sequence[Question] | None = None,
) -> HybridRun:
    """Build the steerer on training rollouts, evaluate base, thinking, hybrid and the controls, and write a
    ``hybrid_run`` artifact at ``out``.

    Evaluation: ``problems`` (organism problems; None: ``cfg.n_eval`` held-out ones) or ``questions`` (any graded
    set, in the thinking model's chat format, graded by ``cfg.grader``); training rollouts: ``cfg.n_train``
    organism problems of a disjoint stream, or ``train_questions`` (their prompts).
    """
    cfg.check_models(base_handle, thinking_handle)
    if questions is not None and problems is not None:
        raise ValueError("give problems (organism) or questions, not both")
    if cfg.grader != "organism" and (questions is None or train_questions is None):
        raise ValueError(f"grader {cfg.grader!r} grades given questions: pass questions and train_questions")
    if questions is None:
        chosen = task.problems(cfg.n_eval, EVAL_SEED) if problems is None else problems
        questions = organism_questions(thinking_handle, chosen)
    if train_questions is None:
        train_questions = organism_questions(thinking_handle, task.problems(cfg.n_train, TRAIN_SEED + cfg.seed))
    questions, train_questions = list(questions), list(train_questions)
    if not questions or not train_questions:
        raise ValueError("no questions to evaluate or to train on")
    tok = thinking_handle.tokenizer
    rolls = rollouts(thinking_handle, [q.prompt for q in train_questions], 1.0, cfg.seed + 1, cfg)
    steerer, build = build_steerer(base_handle, thinking_handle, rolls, cfg)

    prompts = [tok(q.prompt, add_special_tokens=False)["input_ids"] for q in questions]
    golds = [q.gold for q in questions]
    levels = [q.level for q in questions]
    dcfg = DecodeConfig(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed, batch_size=cfg.batch_size
    )
    plain = {}
    for name, h in (("base", base_handle), ("thinking", thinking_handle)):
        comps = generate(h, prompts, dcfg)
        plain[name] = [HybridOutput(c.token_ids, [None] * len(c.token_ids), c.finish_reason == "eos") for c in comps]
    hyb = hybrid_generate(base_handle, thinking_handle, prompts, steerer, cfg, "hybrid")
    runs: dict[str, tuple[list[bool], dict[str, Any]]] = {
        k: _score(v, tok, golds, cfg.grader) for k, v in plain.items()
    }
    runs["hybrid"] = _score(hyb, tok, golds, cfg.grader)
    if cfg.controls:
        rb = hybrid_generate(base_handle, thinking_handle, prompts, steerer, cfg, "random_behaviour")
        rv = hybrid_generate(base_handle, thinking_handle, prompts, steerer.randomised(cfg.seed + 17), cfg)
        runs["random_behaviour"] = _score(rb, tok, golds, cfg.grader)
        runs["random_vectors"] = _score(rv, tok, golds, cfg.grader)
    b, t, h = (runs[k][1]["accuracy"] for k in ("base", "thinking", "hybrid"))
    controls = {
        k: {**runs[k][1], "gap_recovered": _gap(runs[k][1]["accuracy"], b, t)}
        for k in ("random_behaviour", "random_vectors")
        if k in runs
    }
    agree = build["taxonomy"].get("agreement")
    summary: dict[str, Any] = {
        "n_problems": len(questions),
        "base_accuracy": b,
        "thinking_accuracy": t,
        "hybrid_accuracy": h,
        "gap_recovered": _gap(h, b, t),
        "steered_token_fraction": runs["hybrid"][1]["steered_token_fraction"],
        "controls": controls,
        "accuracy_by_level": {k: _by_level(v[0], levels) for k, v in runs.items()},
        "runs": {k: v[1] for k, v in runs.items()},
        "taxonomy_agreement": agree and {k: agree[k] for k in ("purity", "inverse_purity", "ari", "nmi")},
        "behaviours": build["behaviours"],
        "selector": build["selector"],
        "vectors": build["vectors"],
        "format": "the thinking model's chat prompt, shared by all three; one grader ("
        + ("final_answer" if cfg.grader == "organism" else cfg.grader)
        + ")",
        "base_model": base_handle.source,
        "thinking_model": thinking_handle.source,
    }
    records = []
    for i, q in enumerate(questions):
        o = hyb[i]
        records.append(
            {
                "uid": q.id,
                "question": q.text or q.prompt,
                "level": q.level,
                "gold": q.gold,
                "tokens": _texts(tok, o.token_ids),
                "behaviours": o.behaviours,
                "correct": runs["hybrid"][0][i],
                "finished": o.finished,
                "base_text": tok.decode(plain["base"][i].token_ids),
                "base_correct": runs["base"][0][i],
                "thinking_text": tok.decode(plain["thinking"][i].token_ids),
                "thinking_correct": runs["thinking"][0][i],
            }
        )
    taxonomy = {
        **build,
        "names": list(steerer.names),
        "allowed": list(steerer.allowed),
        "base": {
            "source": base_handle.source,
            "hash": base_handle.weight_hash,
            "d_model": base_handle.geometry.d_model,
            "n_layers": base_handle.geometry.n_layers,
            "model_type": str(getattr(base_handle.model.config, "model_type", "")),
        },
        "thinking": {"source": thinking_handle.source, "hash": thinking_handle.weight_hash},
    }
    run = HybridRun(Path(out) if out is not None else None, summary, records, asdict(cfg), taxonomy, steerer)
    if out is not None:
        run.save(out, replace=replace)
    return run


@dataclass
class HybridRun:
    """A hybrid run: ``summary`` (accuracies, gap recovered, steered share, controls), per-problem ``records``
    (question, generated tokens as strings, per-token behaviour or None, correct), the config and the taxonomy."""

    path: Path | None
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    config: dict[str, Any]
    taxonomy: dict[str, Any]
    steerer: Steerer | None = None

    def save(self, out: str | Path, replace: bool = False) -> ArtifactDir:
        from safetensors.torch import save_file

        if self.steerer is None:
            raise ValueError("this HybridRun has no steerer to save")
        st = self.steerer

        def write(tmp: Path) -> dict[str, int]:
            (tmp / SUMMARY_FILE).write_text(json.dumps(self.summary, indent=1) + "\n", encoding="utf-8")
            (tmp / TAXONOMY_FILE).write_text(json.dumps(self.taxonomy, indent=1) + "\n", encoding="utf-8")
            with open(tmp / RECORDS_FILE, "w", encoding="utf-8") as f:
                for r in self.records:
                    f.write(json.dumps(r) + "\n")
            tensors = {"vectors": st.vectors, "bias": st.bias, "centre": st.centre}
            if st.probe is not None:
                tensors["probe"] = st.probe
            if st.sae is not None:
                tensors.update({f"sae.{k}": v.detach() for k, v in st.sae.state_dict().items()})
            save_file({k: v.float().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS_FILE))
            return {RECORDS_FILE: len(self.records)}

        art = write_artifact(out, KIND, ARTIFACT_FORMATS[KIND], self.config, {}, write, replace=replace)
        self.path = art.path
        return art

    @classmethod
    def open(cls, path: str | Path) -> HybridRun:
        """Read a ``hybrid_run`` artifact (hash-checked); a foreign or damaged directory raises naming it."""
        art = ArtifactDir.open(path, KIND, ARTIFACT_FORMATS[KIND], check="hash")
        with reading(path):
            return cls._read(art)

    @classmethod
    def _read(cls, art: ArtifactDir) -> HybridRun:
        from .behaviours import TinySAE

        summary = art.json(SUMMARY_FILE)
        taxonomy = art.json(TAXONOMY_FILE)
        try:
            lines = art.file(RECORDS_FILE).read_text(encoding="utf-8").splitlines()
            records = [json.loads(x) for x in lines if x.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptFileError(f"{art.path / RECORDS_FILE} is not JSON lines ({e}); {DAMAGED}") from None
        t = art.tensors(TENSORS_FILE)
        cfg = dict(art.manifest.config)
        sae = None
        if "sae.W_dec" in t:
            sae = TinySAE(t["sae.W_dec"].shape[1], t["sae.W_dec"].shape[0], int(cfg.get("topk", 1)))
            sae.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("sae.")})
        steerer = Steerer(
            t["vectors"],
            t["bias"],
            tuple(taxonomy["names"]),
            int(cfg["steer_layer"]),
            int(cfg["sae_layer"]),
            t["centre"],
            t.get("probe"),
            sae,
            tuple(taxonomy.get("allowed", ())),
        )
        return cls(art.path, summary, records, cfg, taxonomy, steerer)

    def vectors(self) -> dict[str, SteeringVector]:
        """One :class:`SteeringVector` (bias + V[b], at ``steer_layer``, position ``last``) per behaviour.

        Its γ is the smallest guardrail coefficient; ``gamma_detail`` records that the hybrid chose among all of
        them per steered token, and steered only where the two models' greedy tokens differed."""
        if self.steerer is None:
            raise ValueError("this HybridRun has no steerer")
        st, info = self.steerer, self.taxonomy.get("base", {})
        coefficients = [float(c) for c in self.config.get("coefficients", (1.0,))]
        detail = {
            "coefficients": coefficients,
            "per_token": "the coefficient whose greedy token the thinking model finds most likely",
            "steered": "only where the base's and the thinking model's greedy next tokens differ",
        }
        out = {}
        for i, name in enumerate(st.names):
            meta = VectorMeta(
                d_model=st.vectors.shape[1],
                layers=(st.layer,),
                positions="last",
                model_id=str(info.get("source", "")),
                model_hash=info.get("hash"),
                n_layers=info.get("n_layers"),
                recipe={
                    "paper": "arXiv 2510.07364",
                    "behaviour": name,
                    "method": self.config.get("vectors"),
                    "model_type": str(info.get("model_type", "")),
                },
                gamma=min(coefficients),
                gamma_detail=detail,
            )
            out[name] = SteeringVector((st.bias + st.vectors[i])[None], meta)
        return out
