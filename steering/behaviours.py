"""Reasoning behaviours of thinking traces: token-level sentences, a top-k SAE taxonomy and its ground truth.

Sentences (research/steering.md §3.1, adapted to token streams): a sentence ends at a token whose text ends with
``.``, ``?`` or ``!``; the next token starts the next one. The same rule runs at generation time, so "a sentence
starts" means "the previous emitted token ended one". The text after ``</think>`` (answer and end token) is one
more, final pseudo-sentence, so the "give the answer" moment has a behaviour too.

Taxonomy (§3.1): each sentence's activation is the mean of the thinking model's layer output over its token span
``[start − 1, end)``, centred by the mean over traces of each trace's mean activation over its reasoning span, and
L2-normalised. A TinySAE-style top-k SAE (encoder ``Linear(d, K)``, unit-norm decoder rows renormalised after every
step, loss = fraction of variance unexplained, Adam at ``2e-4/sqrt(K/2^14)``, early stopping) is trained on those
rows; a sentence's behaviour is the argmax of the full (not top-k) encoder pre-activations.

Ground truth for the organisms (:func:`organism_labels`): the task writes a known set of sentence types (start,
compute, slip, correct, conclude, recheck, answer), so the unsupervised taxonomy can be scored by purity and ARI.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ORGANISM_BEHAVIOURS",
    "Taxonomy",
    "TinySAE",
    "agreement",
    "ends_sentence",
    "fit_sae",
    "normalise_rows",
    "organism_labels",
    "sentence_spans",
]

ORGANISM_BEHAVIOURS = ("start", "compute", "slip", "correct", "conclude", "recheck", "answer", "other")
_READ = re.compile(r"\b[a-p]\d[;.]")


def ends_sentence(token_text: str) -> bool:
    """Whether a token ends a sentence (its text, right-stripped, ends with ``.``, ``?`` or ``!``)."""
    return token_text.rstrip().endswith((".", "?", "!"))


def sentence_spans(token_texts: Sequence[str], think_end: str = "</think>") -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` of the sentences of a generated token stream (see the module docstring).

    Sentences end at tokens that :func:`ends_sentence`; ``think_end`` closes the last thinking sentence and starts
    the final answer pseudo-sentence. Whitespace-only pieces are dropped.
    """
    spans: list[tuple[int, int]] = []
    start = 0
    for i, t in enumerate(token_texts):
        if t == think_end:
            if i > start:
                spans.append((start, i))
            start = i
            continue
        if ends_sentence(t) and start <= i:
            spans.append((start, i + 1))
            start = i + 1
    if start < len(token_texts):
        spans.append((start, len(token_texts)))
    return [(a, b) for a, b in spans if "".join(token_texts[a:b]).strip()]


def organism_labels(sentences: Sequence[str], think_end: str = "</think>") -> list[str]:
    """Known sentence types of one organism trace (in order), the ground truth for the unsupervised taxonomy.

    ``start`` (first operand / "let me work this out"), ``compute`` (read an operand and compute), ``slip`` ("wait,
    ... is wrong"), ``correct`` (the corrected step after a slip), ``conclude`` ("the answer is"), ``recheck``
    ("let me check" and the verbose style's redundant re-check steps), ``answer`` (after ``</think>``), ``other``.
    """
    out: list[str] = []
    checking = False
    for raw in sentences:
        s = raw.strip()
        if s.startswith(think_end):
            label = "answer"
        elif "wait" in s:
            label = "slip"
        elif "answer is" in s:
            label, checking = "conclude", False
        elif "let me check" in s:
            label, checking = "recheck", True
        elif s.startswith(("first", "let me work")):
            label = "start"
        elif checking:
            label = "recheck"
        elif s.startswith("so:") and out and out[-1] == "slip":
            label = "correct"
        elif _READ.search(s) or "=" in s:
            label = "compute"
        else:
            label = "other"
        out.append(label)
    return out


def normalise_rows(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``(x − centre)`` L2-normalised per row (the SAE's input space)."""
    y = x.float() - centre.float()
    return y / y.norm(dim=-1, keepdim=True).clamp_min(1e-8)


class TinySAE(torch.nn.Module):
    """Top-k SAE (TinySAE, as ``clustering_sae_topk``): ``encode = topk(enc(x − b_dec))``, unit-norm decoder rows."""

    def __init__(self, d: int, n_latents: int, k: int):
        super().__init__()
        if n_latents < 2 or not 1 <= k <= n_latents:
            raise ValueError(f"need n_latents >= 2 and 1 <= k <= n_latents, got n_latents={n_latents}, k={k}")
        self.k = k
        self.encoder = torch.nn.Linear(d, n_latents)
        self.W_dec = torch.nn.Parameter(torch.randn(n_latents, d))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        self.renormalise()

    @torch.no_grad()
    def renormalise(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x - self.b_dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = self.pre(x).topk(self.k, dim=-1)
        return (top.values[..., None] * self.W_dec[top.indices]).sum(-2) + self.b_dec

    @torch.no_grad()
    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's behaviour: argmax of the full encoder pre-activations (no top-k)."""
        return self.pre(x.float()).argmax(-1)


def fvu(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained ``‖x̂ − x‖² / ‖x − mean(x)‖²`` over a batch."""
    return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def _spread_rows(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` rows of ``x`` far apart (farthest-point from a random first row): the decoder's initial directions."""
    picks = [int(torch.randint(len(x), (1,), generator=gen))]
    dist = (x - x[picks[0]]).norm(dim=-1)
    for _ in range(n - 1):
        picks.append(int(dist.argmax()))
        dist = torch.minimum(dist, (x - x[picks[-1]]).norm(dim=-1))
    return x[picks]


def fit_sae(
    x: torch.Tensor,
    n_latents: int,
    k: int = 3,
    seed: int = 0,
    max_epochs: int = 300,
    patience: int = 10,
    batch_size: int = 512,
) -> tuple[TinySAE, dict[str, Any]]:
    """Train a :class:`TinySAE` on rows ``x [n, d]`` (already centred and normalised); returns it and a report.

    Early stopping watches the FVU of a held-out 10% (all rows when there are fewer than 50).
    """
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"fit_sae needs rows [n >= 2, d], got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("fit_sae: the activations hold NaN or inf")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = x.float()
    perm = torch.randperm(len(x), generator=gen)
    n_val = len(x) // 10 if len(x) >= 50 else 0
    val, train = (x[perm[:n_val]], x[perm[n_val:]]) if n_val else (x, x)
    sae = TinySAE(x.shape[1], n_latents, k)
    with torch.no_grad():
        sae.b_dec.copy_(train.mean(0))
        sae.W_dec.copy_(_spread_rows(train - train.mean(0), n_latents, gen))
        sae.renormalise()
        sae.encoder.weight.copy_(sae.W_dec)
        sae.encoder.bias.zero_()
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / math.sqrt(n_latents / 2**14))
    best, best_state, stale, epochs = math.inf, None, 0, 0
    for epoch in range(1, max_epochs + 1):
        epochs = epoch
        order = torch.randperm(len(train), generator=gen)
        for s in range(0, len(train), batch_size):
            b = train[order[s : s + batch_size]]
            loss = fvu(sae(b), b) if len(b) > 1 else (sae(b) - b).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sae.renormalise()
        with torch.no_grad():
            v = float(fvu(sae(val), val))
        if v < best - 1e-5:
            best, stale = v, 0
            best_state = {n: p.detach().clone() for n, p in sae.state_dict().items()}
        else:
            stale += 1
            if stale >= patience:
                break
    if best_state is not None:
        sae.load_state_dict(best_state)
    counts = Counter(sae.labels(x).tolist())
    report = {
        "n_rows": len(x),
        "n_latents": n_latents,
        "k": k,
        "epochs": epochs,
        "val_fvu": round(best, 5),
        "latent_counts": {str(i): counts.get(i, 0) for i in range(n_latents)},
    }
    return sae, report


def _pairs(k: float) -> float:
    return k * (k - 1) / 2


def adjusted_rand_index(table: dict[str, Counter[str]]) -> float:
    """Hubert-Arabie adjusted Rand index of a contingency table {cluster: Counter(type: count)}."""
    rows = [sum(c.values()) for c in table.values()]
    cols: Counter[str] = Counter()
    for c in table.values():
        cols.update(c)
    n = sum(rows)
    index = sum(_pairs(v) for c in table.values() for v in c.values())
    a, b = sum(_pairs(r) for r in rows), sum(_pairs(v) for v in cols.values())
    expected = a * b / _pairs(n) if n > 1 else 0.0
    top = (a + b) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)


def normalized_mutual_information(table: dict[str, Counter[str]]) -> float:
    """Mutual information over the arithmetic mean of the two entropies (1.0 when both are single-valued)."""
    rows = {k: sum(c.values()) for k, c in table.items()}
    cols: Counter[str] = Counter()
    for c in table.values():
        cols.update(c)
    n = sum(rows.values())
    mi = sum(v / n * math.log(n * v / (rows[k] * cols[t])) for k, c in table.items() for t, v in c.items() if v)
    h = [-sum(v / n * math.log(v / n) for v in counts if v) for counts in (rows.values(), cols.values())]
    mean_h = (h[0] + h[1]) / 2
    return 1.0 if mean_h <= 0 else max(0.0, mi / mean_h)


def agreement(pred: Sequence[Any], truth: Sequence[str]) -> dict[str, Any]:
    """How well clusters ``pred`` match known types ``truth``: purity, inverse purity, ARI, NMI, majority names."""
    if len(pred) != len(truth) or not pred:
        raise ValueError(f"agreement needs equally long non-empty label lists, got {len(pred)} and {len(truth)}")
    p = [str(x) for x in pred]
    table: dict[str, Counter[str]] = {}
    for a, b in zip(p, truth):
        table.setdefault(a, Counter())[b] += 1
    inverse: dict[str, Counter[str]] = {}
    for a, b in zip(p, truth):
        inverse.setdefault(b, Counter())[a] += 1
    n = len(p)
    return {
        "purity": round(sum(c.most_common(1)[0][1] for c in table.values()) / n, 4),
        "inverse_purity": round(sum(c.most_common(1)[0][1] for c in inverse.values()) / n, 4),
        "ari": round(adjusted_rand_index(table), 4),
        "nmi": round(normalized_mutual_information(table), 4),
        "majority": {a: c.most_common(1)[0][0] for a, c in sorted(table.items())},
        "contingency": {a: dict(c.most_common()) for a, c in sorted(table.items())},
    }


@dataclass(frozen=True)
class Taxonomy:
    """A fitted behaviour taxonomy: the SAE, the centre of its input space, names per latent, and agreement."""

    sae: TinySAE
    centre: torch.Tensor
    names: tuple[str, ...]
    report: dict[str, Any]

    def labels(self, acts: torch.Tensor) -> torch.Tensor:
        return self.sae.labels(normalise_rows(acts, self.centre))
