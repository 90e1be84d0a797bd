"""The ``probe_set`` artifact: fitted probes of every layer, their report, and the model they belong to.

``probes.safetensors`` holds the standardisation (``mean``, ``std`` ``[L, d]``) and the probe weights; the manifest
config records the probe config, the hooks, the width and the weight hash of the model whose activations trained
them. :meth:`ProbeSet.predict` refuses activations of another width, an unknown hook, or another model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from reasonscope.artifacts import ARTIFACT_FORMATS, ArtifactDir, reading, write_artifact
from reasonscope.store import ActivationStore

from .batched import BatchedProbe

if TYPE_CHECKING:  # pragma: no cover
    from reasonscope.models import ModelHandle

    from .labels import LabelTable

KIND = "probe_set"
WEIGHTS, REPORT = "probes.safetensors", "report.json"


@dataclass
class ProbeSet:
    """Fitted probes (one per hook) of one target, with their report; open with :meth:`open`."""

    path: Path
    probe: BatchedProbe
    hooks: list[str]
    width: int
    weight_hash: str
    config: dict[str, Any]
    report: dict[str, Any]
    calibration: dict[str, tuple[float, float]] = field(default_factory=dict)  # hook -> Platt (a, b)

    @classmethod
    def open(cls, path: str | Path) -> ProbeSet:
        """Read a ``probe_set`` artifact written by :func:`probes.fit.fit_probes`."""
        art = ArtifactDir.open(path, KIND, ARTIFACT_FORMATS[KIND], check="hash")  # two small files
        cfg = dict(art.manifest.config)
        with reading(path):
            probe = BatchedProbe.from_tensors(art.tensors(WEIGHTS), cfg["probe"]["kind"])
            return cls(
                Path(path),
                probe.eval(),
                list(cfg["hooks"]),
                int(cfg["width"]),
                str(cfg["weight_hash"]),
                dict(cfg["probe"]),
                art.json(REPORT),
                {h: (float(a), float(b)) for h, (a, b) in cfg.get("calibration", {}).items()},
            )

    @property
    def target(self) -> str:
        return str(self.config["target"])

    @property
    def fit_problems(self) -> frozenset[str]:
        """The problems whose chunks trained or validated these probes (empty for artifacts that predate it)."""
        return frozenset(self.report.get("fit_problems", ()))

    @property
    def best_hook(self) -> str:
        """The hook chosen on validation AUROC (``report["selected_on"]``: pooled or within problems)."""
        return str(self.report["best_hook"])

    def check_model(self, weight_hash: str) -> None:
        """Refuse activations of a model other than the one these probes were fitted on."""
        if weight_hash != self.weight_hash:
            raise ValueError(
                f"these probes ({self.path}) were fitted on the model with weight hash {self.weight_hash}, not "
                f"{weight_hash}; fit probes on this model's activations, or, if it is the same checkpoint, load it "
                "in the dtype its activations were captured in (--dtype): the hash covers the dtype"
            )

    def check_handle(self, handle: ModelHandle) -> None:
        """Refuse a model of another width, with fewer layers than the probed hooks, or other weights."""
        g = handle.geometry
        if g.d_model != self.width:
            raise ValueError(f"model width {g.d_model} != probe width {self.width} ({self.path}); use matching probes")
        deepest = max(int(h.split(".")[1]) for h in self.hooks)
        if deepest >= g.n_layers:
            raise ValueError(f"probes read layer {deepest}, the model has {g.n_layers} layers; use matching probes")
        self.check_model(handle.weight_hash)

    def predict(self, x: torch.Tensor, hook: str | None = None, weight_hash: str | None = None) -> torch.Tensor:
        """Probability of the target for activations ``x`` ``[..., d]`` of ``hook`` (default: the best hook),
        calibrated (Platt scaling fitted on the validation problems). A raw tensor carries no model: pass
        ``weight_hash`` (``handle.weight_hash``) to have another model's activations refused, as
        :meth:`predict_store` and :meth:`check_handle` do."""
        hook = hook or self.best_hook
        if hook not in self.hooks:
            raise KeyError(f"no probe for hook {hook!r}; these probes cover {self.hooks}")
        if x.shape[-1] != self.width:
            raise ValueError(
                f"activations of width {x.shape[-1]} given to probes of width {self.width} ({self.path}); "
                "they come from another model: fit probes on its activations"
            )
        if weight_hash is not None:
            self.check_model(weight_hash)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("activations hold NaN/inf; recapture them (e.g. in float32)")
        flat = x.reshape(-1, x.shape[-1]).to(self.probe.mean)
        a, b = self.calibration.get(hook, (1.0, 0.0))
        with torch.no_grad():
            z = self.probe.layer_logits(flat, self.hooks.index(hook))[0]
            return torch.sigmoid(a * z + b).reshape(x.shape[:-1])

    def predict_store(self, store: ActivationStore, hook: str | None = None) -> torch.Tensor:
        """Probabilities for every row of ``store`` (after checking it comes from the same model)."""
        self.check_model(store.manifest.weight_hash)
        hook = hook or self.best_hook
        return torch.cat([self.predict(x, hook) for x in store.iter_batches(hook, 8192)])

    def evaluate(self, store: ActivationStore, labels: LabelTable, hook: str | None = None) -> dict[str, float]:
        """Metrics of the probe at ``hook`` (default: the best) on the labelled chunks of ``store`` (other traces of
        the same model, e.g. another dataset): AUROC pooled and within problem, ECE, Brier, accuracy, ``n``.
        Chunks of the problems the probes were fitted or validated on are left out (``n_fit_rows_left_out``)."""
        from . import metrics
        from .data import match_labels

        rows, _, y, problems = match_labels(store, labels, self.target)
        held = torch.tensor([q not in self.fit_problems for q in problems], dtype=torch.bool)
        if not bool(held.any()):
            raise ValueError(
                f"every labelled chunk in {store.path} belongs to a problem these probes ({self.path}) were fitted "
                "or validated on; evaluate on other problems, or run `probe eval --probes` alone for the fit's "
                "held-out test problems"
            )
        left_out = int((~held).sum())
        rows, y = rows[held], y[held]
        problems = [q for q, k in zip(problems, held.tolist()) if k]
        if y.min() == y.max():
            raise ValueError(f"the labelled chunks of {self.target!r} in {store.path} are of one class only")
        p = self.predict_store(store, hook)[rows]
        ids = {q: k for k, q in enumerate(sorted(set(problems)))}
        groups = torch.tensor([ids[q] for q in problems])
        return {**metrics.report(p, y, groups), "n_problems": float(len(ids)), "n_fit_rows_left_out": float(left_out)}


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_probeset(
    out: str | Path,
    tensors: dict[str, torch.Tensor],
    probe_config: dict[str, Any],
    hooks: list[str],
    width: int,
    store: ActivationStore,
    report: dict[str, Any],
    calibration: dict[str, list[float]] | None = None,
    replace: bool = False,
) -> ProbeSet:
    """Write the artifact (weights, report, per-hook Platt ``[a, b]``; model identity in the config) and open it."""
    m = store.manifest
    config = {"probe": probe_config, "hooks": hooks, "width": width, "weight_hash": m.weight_hash}
    if calibration:
        config["calibration"] = calibration

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / REPORT).write_text(json.dumps(json_safe(report), indent=1, allow_nan=False), encoding="utf-8")

    write_artifact(
        out,
        KIND,
        ARTIFACT_FORMATS[KIND],
        config,
        {"store": m.fingerprint()},
        write,
        detail={"model_id": m.model_id},
        replace=replace,
    )
    return ProbeSet.open(out)
