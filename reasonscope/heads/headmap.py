"""Head maps on disk (a ``head_map`` artifact, :mod:`reasonscope.artifacts`) and their deployment exports.

Files: ``scores.safetensors`` (``scores [L, H_kv]``, higher = keep full), ``log.json`` (scorer log).
Exports: per-layer TSV of the scores (RLKV ``adapter_weights.tsv`` / DuoAttention
``full_attention_heads.tsv`` layout: one line per layer, one tab-separated value per KV head),
the 0/1 full-head TSV at a sparsity, and a JSON serving config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..artifacts import ArtifactDir, CorruptFileError, atomic_file, reading, write_artifact
from .policy import CompressionPolicy
from .select import select_full_heads

KIND, FORMAT = "head_map", 1


@dataclass(frozen=True)
class HeadMap:
    """Scores ``[L, H_kv]`` of one method for one model, with the policy they were measured under."""

    scores: torch.Tensor
    method: str
    model_hash: str
    policy: CompressionPolicy
    aggregation: str = "kv-head"  # how query-head scores became KV-head scores ("max over group", ...)
    log: list = field(default_factory=list)
    path: Path | None = None

    def check_model(self, handle: Any) -> None:
        """Refuse a map of another shape or from other weights than ``handle``'s."""
        g = handle.geometry
        if tuple(self.scores.shape) != (g.n_layers, g.n_kv_heads):
            shape = ", ".join(map(str, self.scores.shape))
            raise ValueError(
                f"head map {self.path or ''} is [{shape}] but the model has [{g.n_layers}, "
                f"{g.n_kv_heads}] (layers x KV heads); score this model's heads"
            )
        if self.model_hash != handle.weight_hash:
            raise ValueError(
                f"head map {self.path or ''} was scored on weights {self.model_hash}, not this model's "
                f"{handle.weight_hash}; score this model's heads (reasonscope heads score), or, if it is the same "
                "checkpoint, load it in the dtype the map was scored in (--dtype): the hash covers the dtype"
            )

    def full_heads(self, sparsity: float) -> torch.Tensor:
        """Bool ``[L, H_kv]`` kept full at ``sparsity`` (global ranking)."""
        return select_full_heads(self.scores, sparsity)

    def save(self, out: str | Path, config: Mapping[str, Any], inputs: Mapping[str, str]) -> HeadMap:
        """Write the artifact atomically; returns the map with its ``path``."""
        from safetensors.torch import save_file

        def files(tmp: Path) -> dict[str, int]:
            save_file({"scores": self.scores.detach().float().contiguous().cpu()}, str(tmp / "scores.safetensors"))
            (tmp / "log.json").write_text(json.dumps(self.log, indent=1) + "\n", encoding="utf-8")
            return {"scores.safetensors": self.scores.shape[0]}

        meta = {
            "method": self.method,
            "model_hash": self.model_hash,
            "aggregation": self.aggregation,
            "policy": {"sink": self.policy.sink, "recent": self.policy.recent, "prefill": self.policy.prefill},
            "shape": list(self.scores.shape),
        }
        write_artifact(out, KIND, FORMAT, {**dict(config), **meta}, inputs, files)
        return HeadMap(self.scores, self.method, self.model_hash, self.policy, self.aggregation, self.log, Path(out))

    @classmethod
    def open(cls, path: str | Path) -> HeadMap:
        """Open a complete ``head_map`` artifact (refuses foreign, half-written or damaged ones)."""
        art = ArtifactDir.open(path, KIND, FORMAT, check="hash")  # two small files
        c = art.manifest.config
        with reading(path):
            scores = art.tensors("scores.safetensors")["scores"]
            if list(scores.shape) != list(c["shape"]):
                raise CorruptFileError(
                    f"{path}: scores have shape {list(scores.shape)}, the manifest says {c['shape']}; "
                    "the artifact is damaged, re-run `reasonscope heads score`"
                )
            return cls(
                scores,
                c["method"],
                c["model_hash"],
                CompressionPolicy(**c["policy"]),
                c["aggregation"],
                art.json("log.json"),
                Path(path),
            )

    def export_tsv(self, path: str | Path) -> None:
        """Scores as one tab-separated line per layer (RLKV/DuoAttention layout)."""
        _write_rows(path, [[f"{float(v):.6f}" for v in row] for row in self.scores])

    def export_full_heads_tsv(self, path: str | Path, sparsity: float) -> None:
        """0/1 per layer and KV head (1 = full attention) at ``sparsity``."""
        _write_rows(path, [[str(int(v)) for v in row] for row in self.full_heads(sparsity)])

    def serving_config(self, sparsity: float) -> dict[str, Any]:
        """JSON-ready config for a serving stack: window, sparsity and the full-attention heads per layer."""
        full = self.full_heads(sparsity)
        return {
            "format": "reasonscope.headwise_kv/1",
            "method": self.method,
            "model_hash": self.model_hash,
            "sink": self.policy.sink,
            "recent": self.policy.recent,
            "prefill": self.policy.prefill,
            "sparsity": sparsity,
            "achieved_sparsity": 1.0 - float(full.float().mean()),
            "full_attention_heads": [[int(j) for j in torch.nonzero(row).flatten()] for row in full],
        }


def _write_rows(path: str | Path, rows: list[list[str]]) -> None:
    with atomic_file(path) as f:
        f.write("".join("\t".join(r) + "\n" for r in rows))


def read_tsv(path: str | Path) -> torch.Tensor:
    """Read a per-layer TSV (ours, RLKV ``adapter_weights.tsv`` or DuoAttention ``full_attention_heads.tsv``)."""
    rows = [line.split() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError(f"{path}: not a per-layer TSV (rows of equal length, one per layer)")
    return torch.tensor([[float(v) for v in r] for r in rows])
