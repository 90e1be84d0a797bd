"""``SteeringVector``: per-layer directions with their provenance, applied as ``h + γ·v`` through hooks.

Layer ``L`` is the output of decoder block ``L`` (``blocks.L.hook_resid_post``, llama.cpp ``direction.L``; see
conventions.md). The stored direction is target − source (e.g. concise − verbose), unnormalised; ``gamma`` in the
metadata multiplies it as stored. Position rules: ``all`` (every real token of every forward pass), ``last`` (the
last position of every forward pass: the last prompt token at prefill, then each generated token, as ASC injects),
``generated`` (decode steps of :func:`reasonscope.generation.generate` only), ``prompt`` (the last prompt token
at prefill only: the decision the model takes before its first generated token; in a plain forward pass, the last
position, as ``last``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from reasonscope.artifacts import ARTIFACT_FORMATS, ArtifactDir, CorruptFileError, reading, write_artifact
from reasonscope.generation import current_batch
from reasonscope.hooks import attach, current_mask
from reasonscope.models import ModelHandle

__all__ = ["GAMMA_RULES", "KIND", "POSITIONS", "Positions", "SteeringVector", "VectorMeta", "meta_json"]

KIND = "steering_vector"
Positions = Literal["last", "all", "generated", "prompt"]
POSITIONS: tuple[Positions, ...] = get_args(Positions)
GAMMA_RULES = ("fixed", "kl_bound", "sweep", "imported")
DIRECTIONS_FILE = "directions.safetensors"
REPORT_FILE = "report.json"  # evaluation that chose or checked gamma (optional)


@dataclass(frozen=True)
class VectorMeta:
    """Provenance of a :class:`SteeringVector` (conventions.md: model, width, layers, positions, recipe, γ)."""

    d_model: int
    layers: tuple[int, ...]
    positions: Positions = "all"
    model_id: str = ""
    model_hash: str | None = None  # reasonscope.identity.weight_hash of the model the vector was extracted from
    n_layers: int | None = None  # decoder blocks of that model (None: unknown, e.g. imported files)
    recipe: Mapping[str, Any] = field(default_factory=dict)  # how the directions were extracted
    gamma: float = 1.0  # default strength, multiplying the stored (unnormalised) direction
    gamma_rule: str = "fixed"  # how gamma was chosen: one of GAMMA_RULES
    gamma_detail: Mapping[str, Any] = field(default_factory=dict)  # e.g. a, L, epsilon of the KL bound

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        for name in ("recipe", "gamma_detail"):  # as JSON stores them, so a saved vector reads back equal
            try:
                object.__setattr__(self, name, json.loads(json.dumps(dict(getattr(self, name)))))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{name} must hold JSON values (str, number, bool, None, list, dict): {e}") from None
        if self.d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {self.d_model}")
        if not self.layers:
            raise ValueError("a steering vector needs at least one layer")
        if len(set(self.layers)) != len(self.layers) or any(x < 0 for x in self.layers):
            raise ValueError(f"layers must be distinct and >= 0, got {list(self.layers)}")
        if self.n_layers is not None and max(self.layers) >= self.n_layers:
            raise ValueError(f"layer {max(self.layers)} is out of range for a model with layers 0..{self.n_layers - 1}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions {self.positions!r} is not one of {', '.join(POSITIONS)}")
        if self.gamma_rule not in GAMMA_RULES:
            raise ValueError(f"gamma_rule {self.gamma_rule!r} is not one of {', '.join(GAMMA_RULES)}")
        if not math.isfinite(self.gamma):
            raise ValueError(f"gamma must be finite, got {self.gamma}")

    @classmethod
    def for_model(
        cls, handle: ModelHandle, layers: Sequence[int], positions: Positions, recipe: Mapping[str, Any]
    ) -> VectorMeta:
        """Metadata of a vector extracted from ``handle``'s model (width, depth, source and weight hash)."""
        g = handle.geometry
        return cls(
            d_model=g.d_model,
            layers=tuple(layers),
            positions=positions,
            model_id=handle.source,
            model_hash=handle.weight_hash,
            n_layers=g.n_layers,
            recipe=dict(recipe),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["recipe"], d["gamma_detail"] = dict(self.recipe), dict(self.gamma_detail)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VectorMeta:
        return cls(**{**d, "layers": tuple(d["layers"])})


def _check_directions(directions: torch.Tensor, meta: VectorMeta, where: str) -> torch.Tensor:
    if directions.ndim != 2 or directions.shape != (len(meta.layers), meta.d_model):
        raise ValueError(
            f"{where}: directions have shape {tuple(directions.shape)}, expected [n_layers_used, d_model] = "
            f"[{len(meta.layers)}, {meta.d_model}]"
        )
    bad = ~torch.isfinite(directions).all(-1)
    if bool(bad.any()):
        layer = meta.layers[int(bad.nonzero()[0, 0])]
        raise ValueError(f"{where}: the direction for layer {layer} holds NaN or inf; re-extract the vector")
    return directions.detach().to(torch.float32).cpu().contiguous()


class SteeringVector:
    """Directions ``[n_layers_used, d_model]`` (row i steers ``meta.layers[i]``) and their :class:`VectorMeta`."""

    def __init__(self, directions: torch.Tensor, meta: VectorMeta):
        self.directions = _check_directions(directions, meta, "SteeringVector")
        self.meta = meta

    def __repr__(self) -> str:
        return (
            f"SteeringVector(layers={list(self.meta.layers)}, d_model={self.meta.d_model}, "
            f"positions={self.meta.positions!r}, gamma={self.meta.gamma:g} ({self.meta.gamma_rule}))"
        )

    @property
    def layers(self) -> tuple[int, ...]:
        return self.meta.layers

    def direction(self, layer: int) -> torch.Tensor:
        """The direction added at the output of block ``layer``."""
        if layer not in self.meta.layers:
            raise KeyError(f"this vector has no direction for layer {layer}; it has layers {list(self.meta.layers)}")
        return self.directions[self.meta.layers.index(layer)]

    def with_gamma(self, gamma: float, rule: str, detail: Mapping[str, Any] | None = None) -> SteeringVector:
        """The same directions with a new default strength and the rule that chose it."""
        return SteeringVector(
            self.directions, replace(self.meta, gamma=gamma, gamma_rule=rule, gamma_detail=detail or {})
        )

    # ------------------------------------------------------------------ applying

    def check_model(self, handle: Any, layers: Sequence[int] | None = None) -> None:
        """Refuse a model of another width or layer count (naming both), or without one of ``layers`` (default: all
        of the vector's)."""
        g = handle.geometry
        if g.d_model != self.meta.d_model:
            raise ValueError(
                f"steering vector width {self.meta.d_model} does not match the model's d_model {g.d_model} "
                f"({handle.source}); use a vector extracted from this model"
            )
        if self.meta.n_layers is not None and g.n_layers != self.meta.n_layers:
            raise ValueError(
                f"steering vector was extracted from a model with {self.meta.n_layers} layers, {handle.source} has "
                f"{g.n_layers}; use a vector extracted from this model"
            )
        top = max(self.meta.layers if layers is None else layers)
        if top >= g.n_layers:
            origin = self.meta.recipe.get("imported_from")
            raise ValueError(
                f"steering vector layer {top}{f' (from {origin})' if origin else ''} does not exist in "
                f"{handle.source} (layers 0..{g.n_layers - 1}); apply the layers it has with layers=[...], or use a "
                "vector extracted from this model"
            )

    def hooks(
        self,
        handle: ModelHandle,
        gamma: float | Sequence[float] | torch.Tensor | None = None,
        layers: Sequence[int] | None = None,
        positions: Positions | None = None,
    ) -> dict[str, Any]:
        """The hooks :meth:`apply` attaches, by hook name (``blocks.L.hook_resid_post``), as data: combine them with
        your own in one ``handle.run(..., hooks=...)`` or ``generate(..., hooks=...)``. Arguments as in ``apply``."""
        use = tuple(self.meta.layers if layers is None else layers)
        for layer in use:
            self.direction(layer)  # raises naming the layers the vector has
        self.check_model(handle, use)
        rule = self.meta.positions if positions is None else positions
        if rule not in POSITIONS:
            raise ValueError(f"positions {rule!r} is not one of {', '.join(POSITIONS)}")
        g = torch.as_tensor(self.meta.gamma if gamma is None else gamma, dtype=torch.float32).reshape(-1)
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"gamma must be finite, got {g.tolist()}")
        device = handle.device
        g = g.to(device)
        live = isinstance(gamma, torch.Tensor)  # read at every pass: it may change in place or be learned
        shared: dict[str, Any] = {}  # per-row strengths, looked up once per forward pass for all layers
        return {
            f"blocks.{layer}.hook_resid_post": _adder(self.direction(layer).to(device), g, rule, shared, live)
            for layer in use
        }

    @contextmanager
    def apply(
        self,
        handle: ModelHandle,
        gamma: float | Sequence[float] | torch.Tensor | None = None,
        layers: Sequence[int] | None = None,
        positions: Positions | None = None,
    ) -> Iterator[None]:
        """Add ``γ·v`` at the output of each of ``layers`` while the block runs; hooks are removed on exit.

        ``gamma``: one strength, or one per request (inside :func:`reasonscope.generation.generate`, request ``i``
        of the call gets ``gamma[i]``; in ``handle.run``, batch row ``i``). Default: ``meta.gamma``. A tensor is
        read at every forward pass (change it in place, or learn it: gradients reach it); numbers are fixed. ``layers``
        (default all of the vector's) and ``positions`` (default ``meta.positions``) select where.
        """
        hooks = self.hooks(handle, gamma, layers, positions)
        geo = handle.geometry
        with attach(handle.model, hooks, geo.n_layers, geo.n_heads, pure=True):  # generation may skip autograd
            yield

    # ------------------------------------------------------------------ disk

    def save(self, out: str | Path, report: Mapping[str, Any] | None = None, replace: bool = False) -> ArtifactDir:
        """Write a ``steering_vector`` artifact directory (``directions.safetensors``, ``report.json`` if given)."""
        from safetensors.torch import save_file

        def write(tmp: Path) -> dict[str, int]:
            layers = torch.tensor(self.meta.layers, dtype=torch.int64)
            save_file({"directions": self.directions, "layers": layers}, str(tmp / DIRECTIONS_FILE))
            if report is not None:
                (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            return {DIRECTIONS_FILE: len(self.meta.layers)}

        inputs = {"model": self.meta.model_hash} if self.meta.model_hash else {}
        return write_artifact(out, KIND, ARTIFACT_FORMATS[KIND], self.meta.to_dict(), inputs, write, replace=replace)

    @classmethod
    def open(cls, path: str | Path) -> SteeringVector:
        """Read a ``steering_vector`` artifact (hash-checked); a foreign or damaged directory raises naming it."""
        art = ArtifactDir.open(path, KIND, ARTIFACT_FORMATS[KIND], check="hash")
        with reading(path):
            meta = VectorMeta.from_dict(art.manifest.config)
            tensors = art.tensors(DIRECTIONS_FILE)
            if tensors["layers"].tolist() != list(meta.layers):
                raise CorruptFileError(
                    f"{art.path}: the layers in {DIRECTIONS_FILE} differ from the manifest; re-create it"
                )
            return cls(_check_directions(tensors["directions"], meta, str(art.path)), meta)

    def export_gguf(self, path: str | Path, model_hint: str | None = None) -> Path:
        """Write a llama.cpp control vector (see :func:`steering.export.write_gguf`)."""
        from .export import write_gguf

        return write_gguf(self, path, model_hint=model_hint)

    def summary(self) -> dict[str, Any]:
        """Metadata and per-layer norms, JSON-ready."""
        return {**self.meta.to_dict(), "norms": [round(float(n), 6) for n in self.directions.norm(dim=-1)]}


def _adder(
    v: torch.Tensor, gamma: torch.Tensor, rule: Positions, shared: dict[str, Any] | None = None, live: bool = False
) -> Any:
    """The hook adding ``γ_row · v`` to ``x [batch, pos, d_model]`` at the positions ``rule`` selects.

    One strength for all: ``γ·v`` is formed once per device and dtype, so a decode step costs each steered layer one
    ``x + γv`` (``live``: γ is read again at every pass). One per request: per forward pass of
    :func:`reasonscope.generation.generate` the per-row strengths ``[batch, 1, 1]`` are looked up once (one gather)
    and kept in ``shared`` (one dict for all layers of one ``apply``), then each layer adds ``g·v`` (``addcmul``).
    No copy and no host sync either way.
    """
    per_request = len(gamma) > 1
    cache: dict[str, Any] = {} if shared is None else shared
    vs: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def rows_gamma(batch: Any, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)  # a model split over devices (device_map="auto") meets several
        if cache.get("batch") is batch and key in cache["g"]:
            return cache["g"][key]
        if batch.requests != len(gamma):  # checked on the host: no device sync in the forward pass
            raise ValueError(
                f"{len(gamma)} gamma values for the {batch.requests} requests of this generate call; "
                "give one per request (or one for all)"
            )
        tables = cache.setdefault("tables", {})
        table = None if live else tables.get(key)
        if table is None:  # γ per request, then a 0 that idle rows (-1) read: one gather per pass
            table = tables[key] = torch.cat([gamma, gamma.new_zeros(1)]).to(*key)  # never read by autograd
        g = table[batch.rows.to(x.device)].view(-1, 1, 1)
        if cache.get("batch") is not batch:
            cache.update(batch=batch, g={})
        cache["g"][key] = g
        return g

    def hook(x: torch.Tensor) -> torch.Tensor | None:
        key = (x.device, x.dtype)
        if key not in vs:
            with torch.inference_mode(False):  # kept across calls: usable in autograd even if made in a generation
                vx = v.to(*key)
                vs[key] = (vx, vx if per_request or live else (gamma[0] * v).to(*key))
        vx, gv = vs[key]
        if live and not per_request:
            gv = gamma[0].to(x.dtype) * vx
        batch = current_batch()
        g, real = None, None
        if batch is None:
            if rule == "generated":
                raise ValueError(
                    "positions='generated' steers decode steps of reasonscope.generation.generate only; "
                    "use positions='all' or 'last' for a plain forward pass"
                )
            if per_request and len(gamma) != x.shape[0]:
                raise ValueError(f"{len(gamma)} gamma values for a batch of {x.shape[0]} rows; give one or one per row")
            if per_request:
                g = gamma.to(*key)[:, None, None]
        else:
            if (rule == "generated" and batch.prefill) or (rule == "prompt" and not batch.prefill):
                return None
            if per_request:
                g = rows_gamma(batch, x)
                if rule == "all" and batch.shared_by and len({float(gamma[r]) for r in batch.shared_by}) > 1:
                    raise ValueError(
                        "per-request gamma with positions='all' and share_prefixes=True: requests sharing a prompt "
                        "prefix reuse one steered pass over it; give them one gamma or set share_prefixes=False"
                    )
            if rule == "all" and batch.prefill:
                real = (batch.positions.to(x.device) >= 0)[..., None].to(x.dtype)  # left padding stays untouched

        def add(t: torch.Tensor) -> torch.Tensor:
            return t + gv if g is None else torch.addcmul(t, g, vx)

        if x.shape[1] == 1 or (rule == "all" and real is None):
            return add(x)  # every position: one decode position, or all
        if rule in ("last", "prompt"):
            mask = current_mask() if batch is None else None
            out = x.clone()
            if mask is None or bool(mask[:, -1].all()):
                out[:, -1:] = add(x[:, -1:])  # left-padded: the last column is every row's last token
            else:  # a right-padded handle.run batch: each row's last real token
                last = mask.shape[1] - 1 - mask.flip(-1).to(torch.int8).argmax(-1)
                rows = torch.arange(x.shape[0], device=x.device)
                out[rows, last] = add(x[rows, last][:, None])[:, 0]
            return out
        assert real is not None  # rule "all" in a prefill group
        return torch.addcmul(x, real, gv) if g is None else torch.addcmul(x, g * real, vx)

    return hook


def meta_json(meta: VectorMeta) -> str:
    """The metadata as compact JSON (for embedding in exported files)."""
    return json.dumps(meta.to_dict(), sort_keys=True, separators=(",", ":"))
