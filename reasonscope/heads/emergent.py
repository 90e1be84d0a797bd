"""Emergent reasoning heads (Thinking Sparks, heads.md §5): heads whose importance rises from base to thinking.

Attribution (the same for both models): integrated gradients of a KL metric w.r.t. a scale ``s`` on each
query head's output (``blocks.L.attn.hook_z``) along ``s: 1 → 0`` (midpoint Riemann sum), at the thinking
positions of *thinking-style* texts (prompt + ``<think>`` + a thinking model's reasoning) and at the answer
positions of *direct-answer* texts (prompt + a direct answer); metric = mean KL(p_clean ‖ p_s). The style score
of a head is its thinking-style attribution minus its direct-answer one, normalised to unit mass
(``Ĩ = |I| / Σ|I|``, §5.1 A.6). Emergence ``E = (Ĩ_post − Ĩ_pre) / (Ĩ_post + Ĩ_pre + 1e-6)``.

Validation (§5.1 A.7): zero-ablation and scaling ×0.5/×1.3 of the top heads against as many random heads
(several draws), measured by greedy accuracy and thinking length through the generation engine, every
intervention a request of one call (per-request scales read through ``current_batch().rows``).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..budget import sum_by_runs, vocab_size
from ..generation import DecodeConfig, current_batch, generate
from ..traces.generate import split_generation
from ..traces.grading import get_grader
from .scorers import kl_rows


@dataclass(frozen=True)
class StyleText:
    """Token ids of one text and the positions whose next-token distribution the metric reads."""

    token_ids: list[int]
    positions: list[int]  # p: logits at p predict token p + 1


def style_texts(handle: Any, prompt: str, thinking_ids: Sequence[int], answer_ids: Sequence[int]) -> list[StyleText]:
    """The thinking-style text (``prompt`` opening ``<think>`` + ``thinking_ids``) and the direct-answer text
    (the prompt with ``<think></think>`` closed at once + ``answer_ids``). The prompt may end in whitespace after
    ``<think>`` (R1's and Qwen3's templates write ``<think>\n``)."""
    tok = handle.tokenizer
    start, end = handle.think_ids
    ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    opened = start in ids and not tok.decode(ids[len(ids) - ids[::-1].index(start) :]).strip()
    if not opened:
        raise ValueError(
            "style texts need a chat prompt that ends by opening <think> (handle.chat_prompt(question, thinking=True))"
        )
    think = ids + list(thinking_ids)
    direct = ids + [end] + list(answer_ids)
    return [
        StyleText(think, list(range(len(ids) - 1, len(think) - 1))),
        StyleText(direct, list(range(len(ids), len(direct) - 1))),
    ]


def _scale_hooks(scale: torch.Tensor, per_request: bool = False) -> dict[str, Any]:
    """``blocks.L.attn.hook_z`` hooks multiplying query head outputs by ``scale [L, H]`` (or ``[requests, L, H]``)."""

    def make(layer: int) -> Any:
        def hook(z: torch.Tensor) -> torch.Tensor:
            s = scale[..., layer, :]
            if per_request:
                batch = current_batch()
                if batch is None:
                    raise RuntimeError("per-request head scales are read inside reasonscope.generation.generate only")
                s = s[batch.rows.clamp(min=0).to(s.device)][:, None, :, None]
            else:
                s = s[None, None, :, None]
            return z * s.to(z)  # the scales may live on the CPU (attribution's leaf), z on the model's device

        return hook

    return {f"blocks.{layer}.attn.hook_z": make(layer) for layer in range(scale.shape[-2])}


def head_attribution(handle: Any, texts: Sequence[StyleText], steps: int = 8) -> torch.Tensor:
    """``[L, H]`` query-head IG of mean KL(p_clean ‖ p_s) along ``s: 1 → 0``; Σ ≈ KL(clean ‖ all heads zeroed)."""
    if steps < 1:
        raise ValueError(f"attribution needs steps >= 1, got {steps}")
    if not texts:
        raise ValueError("no texts to attribute; give at least one StyleText")
    g = handle.geometry
    grads = torch.zeros(g.n_layers, g.n_heads)
    vocab = vocab_size(handle)
    for text in texts:
        ids = torch.tensor([text.token_ids], device=handle.device)
        where = torch.tensor(text.positions, device=handle.device)
        with torch.no_grad():
            clean = handle.run_hidden(ids)[0].detach()

        def kl(x: torch.Tensor, at: tuple, clean: torch.Tensor = clean) -> torch.Tensor:
            return kl_rows(handle.unembed(clean[at]), handle.unembed(x)).sum()

        for k in range(1, steps + 1):
            s = torch.full((g.n_layers, g.n_heads), 1.0 - (k - 0.5) / steps, requires_grad=True)
            hidden = handle.run_hidden(ids, hooks=_scale_hooks(s))[0]  # positions unembedded a run at a time
            (grad,) = torch.autograd.grad(sum_by_runs(hidden, where, vocab, kl) / len(where), s)
            grads += grad.detach().cpu()
    return -grads / (steps * len(texts))


def style_scores(handle: Any, pairs: Sequence[Sequence[StyleText]], steps: int = 8) -> torch.Tensor:
    """Per head: attribution on thinking-style texts minus on direct-answer texts, unit mass (``|I| / Σ|I|``)."""
    think = head_attribution(handle, [p[0] for p in pairs], steps)
    direct = head_attribution(handle, [p[1] for p in pairs], steps)
    diff = (think - direct).abs()
    return diff / diff.sum().clamp_min(1e-12)


def emergence(base: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """``E = (I_post − I_pre) / (I_post + I_pre + 1e-6)`` per head (Thinking Sparks A.6)."""
    return (post - base) / (post + base + 1e-6)


def top_heads(scores: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The ``k`` highest-scoring ``(layer, head)`` pairs, best first."""
    flat = scores.flatten().argsort(descending=True)[:k].tolist()
    return [(i // scores.shape[1], i % scores.shape[1]) for i in flat]


def random_heads(n_layers: int, n_heads: int, k: int, seed: int, exclude: Sequence[tuple[int, int]] = ()) -> list:
    """``k`` distinct random ``(layer, head)`` pairs outside ``exclude``."""
    g = torch.Generator().manual_seed(seed)
    pool = [(i // n_heads, i % n_heads) for i in torch.randperm(n_layers * n_heads, generator=g).tolist()]
    return [p for p in pool if p not in set(exclude)][:k]


def validate_heads(
    handle: Any,
    prompts: Sequence[str],
    golds: Sequence[str],
    heads: Sequence[tuple[int, int]],
    factors: Sequence[float] = (0.0, 0.5, 1.3),
    random_draws: int = 3,
    max_new_tokens: int = 512,
    batch_size: int = 64,
    grader: str = "organism",
    seed: int = 0,
) -> dict[str, Any]:
    """Greedy accuracy and mean thinking tokens with ``heads`` scaled by each factor (0 = zero-ablation), against
    ``random_draws`` sets of as many random heads, and unmodified."""
    g = handle.geometry
    if not heads:
        raise ValueError("no heads to validate; give at least one (layer, head)")
    for layer, head in heads:
        if not (0 <= layer < g.n_layers and 0 <= head < g.n_heads):
            raise ValueError(f"head L{layer}H{head} is outside this model ({g.n_layers} layers x {g.n_heads} heads)")
    sets = {"heads": list(heads)}
    for d in range(random_draws):
        sets[f"random/{d}"] = random_heads(g.n_layers, g.n_heads, len(heads), seed * 1000 + d, heads)
    arms: list[tuple[str, float, list[tuple[int, int]]]] = [("none", 1.0, [])] + [
        (name, f, hs) for f in factors for name, hs in sets.items()
    ]
    scales = torch.ones(len(arms), g.n_layers, g.n_heads)
    for i, (_, f, hs) in enumerate(arms):
        for layer, head in hs:
            scales[i, layer, head] = f
    tok = handle.tokenizer
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    n = len(prompts)
    done = generate(
        handle,
        encoded * len(arms),
        DecodeConfig(max_new_tokens=max_new_tokens, batch_size=batch_size),
        hooks=_scale_hooks(scales.repeat_interleave(n, 0).to(handle.device), per_request=True),
    )
    grade = get_grader(grader)
    rows: dict[str, dict[str, Any]] = {}
    for i, (name, f, _) in enumerate(arms):
        acc = think = 0.0
        for j in range(n):
            c = done[i * n + j]
            parts = split_generation(handle, encoded[j], c.token_ids, prompts[j].rstrip().endswith(handle.think_start))
            span = parts["think_span"]
            think += 0 if span is None else span[1] - span[0]
            acc += (not parts["truncated"]) and bool(grade.is_correct(grade.extract(parts["answer"]), golds[j]))
        key = "none" if name == "none" else f"{name.split('/')[0]}@{f:g}"
        rows.setdefault(key, {"accuracy": [], "mean_think_tokens": []})
        rows[key]["accuracy"].append(acc / n)
        rows[key]["mean_think_tokens"].append(think / n)
    return {k: _mean_sd(r) for k, r in rows.items()}


def _mean_sd(row: dict[str, list[float]]) -> dict[str, Any]:
    """Mean of each metric over draws, with the accuracy's and thinking length's sample sd (0 for one draw)."""
    out: dict[str, Any] = {m: sum(v) / len(v) for m, v in row.items()}
    for m, name in (("accuracy", "accuracy_sd"), ("mean_think_tokens", "think_sd")):
        out[name] = statistics.stdev(row[m]) if len(row[m]) > 1 else 0.0
    out["draws"] = len(row["accuracy"])
    return out


def emergent_heads(
    base: Any,
    post: Any,
    prompts: Sequence[str],
    golds: Sequence[str],
    k: int = 2,
    steps: int = 8,
    n_attribution: int = 16,
    max_new_tokens: int = 512,
    random_draws: int = 3,
    grader: str = "organism",
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Score both models on the post model's own texts, rank heads by the rise of their normalised importance
    (``I_post − I_pre``), validate the top ``k`` on ``post``. The paper's emergence ``E`` is reported beside it;
    it is not the ranking, as a ratio it puts heads unimportant in both models on a par with those that rose.

    The first ``n_attribution`` prompts give the style texts (the post model's greedy thinking and answer);
    every prompt is used for validation.
    """
    gb, gp = base.geometry, post.geometry
    if (gb.n_layers, gb.n_heads) != (gp.n_layers, gp.n_heads) or len(base.tokenizer) != len(post.tokenizer):
        raise ValueError(
            f"base ({gb.n_layers}x{gb.n_heads}, vocab {len(base.tokenizer)}) and model ({gp.n_layers}x"
            f"{gp.n_heads}, vocab {len(post.tokenizer)}) differ; give the base the model was tuned from"
        )
    if not 1 <= k <= gp.n_layers * gp.n_heads // 2:
        raise ValueError(f"k={k} heads; choose 1..{gp.n_layers * gp.n_heads // 2} so as many random heads exist")
    tok = post.tokenizer
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[:n_attribution]]
    done = generate(post, encoded, DecodeConfig(max_new_tokens=max_new_tokens, batch_size=batch_size))
    pairs = []
    for p, ids, c in zip(prompts, encoded, done):
        parts = split_generation(post, ids, c.token_ids, True)
        span = parts["think_span"]
        if span is None or parts["truncated"] or span[1] == span[0]:
            continue
        new = parts["token_ids"][len(ids) :]
        answer = new[span[1] - span[0] + 1 :]
        if answer:
            pairs.append(style_texts(post, p, new[: span[1] - span[0]], answer))
    if not pairs:
        raise ValueError(
            "the model closed no thinking with an answer on these prompts; use a thinking model and "
            "more tokens (max_new_tokens)"
        )
    s_base, s_post = style_scores(base, pairs, steps), style_scores(post, pairs, steps)
    e = emergence(s_base, s_post)
    rise = s_post - s_base
    heads = top_heads(rise, k)
    return {
        "base_scores": s_base.tolist(),
        "model_scores": s_post.tolist(),
        "emergence": e.tolist(),
        "top_heads": [f"L{layer}H{head}" for layer, head in heads],
        "rise": [round(float(rise[layer, head]), 4) for layer, head in heads],
        "n_texts": len(pairs),
        "validation": validate_heads(
            post,
            prompts,
            golds,
            heads,
            random_draws=random_draws,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            grader=grader,
            seed=seed,
        ),
    }
