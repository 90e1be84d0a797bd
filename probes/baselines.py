"""Baselines every probe is compared with (probes.md §5.3): position, entropy, self-surprise, bag of words and the
question alone.

Each is a logistic probe on features of the labelled chunks, trained by the same loop and split as the activation
probes: ``position`` = (share of the thinking, chunk index), ``entropy`` = mean next-token entropy of the chunk and
``surprise`` = the largest ``-log p`` of a token written in the thinking so far (when the labels have them, from
``probe labels --entropy``), ``bag_of_words`` = hashed word counts of the chunk text (log1p), ``question`` = the
same counts of the trace's question, one feature vector for every chunk of it: what difficulty alone predicts
(labels written before the question was recorded have no such baseline).
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from . import metrics
from .batched import BatchedProbe
from .data import TEST, TRAIN, Labelled
from .labels import LabelTable
from .train import predict, standardize, train

if TYPE_CHECKING:  # pragma: no cover
    from .train import ProbeConfig

BOW_DIM = 512
_WORD = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")


def bag_of_words(text: str, dim: int = BOW_DIM) -> torch.Tensor:
    """``log1p`` of hashed (crc32) counts of the lower-cased words, digits and symbols of ``text``."""
    v = torch.zeros(dim)
    for w in _WORD.findall(text.lower()):
        v[zlib.crc32(w.encode()) % dim] += 1
    return v.log1p()


def baseline_features(labels: LabelTable, rows: list[int]) -> dict[str, torch.Tensor]:
    """Feature matrices ``[n, k]`` of each baseline for the label-table ``rows``."""
    feats = {
        "position": torch.tensor([[labels.share[i], float(labels.chunk[i])] for i in rows]),
        "bag_of_words": torch.stack([bag_of_words(labels.text[i]) for i in rows]),
    }
    questions = {t: labels.traces.get(t, {}).get("question") for t in {labels.trace_id[i] for i in rows}}
    if rows and all(q is not None for q in questions.values()):
        words = {t: bag_of_words(str(q)) for t, q in questions.items()}
        feats["question"] = torch.stack([words[labels.trace_id[i]] for i in rows])
    for name in ("entropy", "surprise"):
        if name in labels.targets:
            vals = [labels.targets[name][i] for i in rows]
            feats[name] = torch.tensor([[0.0 if math.isnan(e) else e] for e in vals])
    return feats


def baseline_report(labels: LabelTable, data: Labelled, cfg: ProbeConfig) -> dict[str, dict[str, float]]:
    """Test AUROC (pooled, within-problem) of each baseline, fitted on the training problems."""
    test = data.side == TEST
    out = {}
    cfg = replace(cfg, kind="logistic", device="cpu")
    for name, x in baseline_features(labels, data.label.tolist()).items():
        batches = [(torch.arange(len(data.y)), x[None])]
        probe = BatchedProbe(2, 1, x.shape[1], "logistic", 0, cfg.seed)
        standardize(probe, batches, data.side == TRAIN, torch.device("cpu"))
        train(probe, batches, data, cfg, torch.device("cpu"))
        p = predict(probe, batches, len(data.y), torch.device("cpu"))[0, 0]
        out[name] = {
            "auroc": metrics.auroc(p[test], data.y[test]),
            "auroc_within_problem": metrics.auroc_within(p[test], data.y[test], data.group[test]),
        }
    return out
