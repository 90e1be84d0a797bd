"""Export a :class:`SteeringVector` for serving and import vectors from serving formats.

- ``gguf``: a llama.cpp control vector (``general.architecture = "controlvector"``, ``controlvector.model_hint``,
  ``controlvector.layer_count``, F32 1-D ``direction.N`` added to the output of block ``N``, N >= 1: llama.cpp
  rejects ``direction.0``; research/steering.md §5.1). The directions are stored unscaled; serve with
  ``--control-vector-scaled FILE:γ`` (``controlvector.default_scale`` records γ). Written with the ``gguf``
  package (``GGUFWriter``), read back with ``GGUFReader``; repeng's ``ControlVector.import_gguf`` reads it too.
- ``easysteer``: the GGUF layout EasySteer/vLLM reads (every layer, ``direction.0`` included) plus
  ``<name>.steering.json``, a ``SteeringSpec``-shaped request (scale, layers, positions as an ``ApplySpec``).
- ``safetensors``: tensors ``direction.N`` and the full metadata as JSON in the header.

Import (:func:`load_vector`): a ``steering_vector`` artifact directory, any of the above, an ASC-style ``.pt``
tensor of per-pair difference rows ``[n_pairs, d_model]`` (the vector is their mean; ``layer`` must be given) or a
``.pt`` dict ``{behaviour: {"mean": [n_layers, d_model], ...}}`` (``key`` picks the behaviour; row L -> block L;
when the dict also holds ``"overall"``, the mean over all sentences, the direction is behaviour − overall, as its
readers compute it). An imported vector carries no strength (``gamma_rule="imported"``): give γ when applying it.
``.pt`` files are loaded with ``weights_only=True``: a file holding code is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from reasonscope.artifacts import MANIFEST, atomic_path

from .vector import Positions, SteeringVector, VectorMeta, meta_json

__all__ = ["FORMATS", "Format", "export_vector", "load_vector", "read_gguf", "spec_path", "write_gguf"]

Format = Literal["gguf", "easysteer", "safetensors"]
FORMATS: tuple[Format, ...] = get_args(Format)
ARCH = "controlvector"
META_KEY = "reasonscope.meta"  # full VectorMeta as JSON; llama.cpp, repeng and EasySteer ignore extra keys
_DIRECTION = re.compile(r"^direction\.([0-9]+)$", re.ASCII)
MAX_LAYER = 2**31 - 1  # llama.cpp parses N with std::stoi
OVERALL = "overall"  # a behaviour .pt's mean over all sentences (steering-thinking-llms' mean_vectors layout)
ASC_PT_NOTE = (
    "ASC rows: vector = mean of per-pair rows; ASC's generate.py replays them as h - gamma*mean "
    "(gamma 0.27 R1-Distill-Qwen-7B, 0.46 R1-Distill-Llama-8B, 0.5 QwQ-32B): apply with gamma=-0.27 etc."
)
# EasySteer ApplySpec for each position rule (research/steering.md §1.2, §5.4)
_APPLY: dict[str, dict[str, Any]] = {
    "all": {"prompt": "all", "generation": "all"},
    "last": {"prompt_positions": [-1], "generation": "all"},
    "generated": {"generation": "all"},
    "prompt": {"prompt_positions": [-1]},
}


def _model_hint(vec: SteeringVector, model_hint: str | None) -> str:
    return model_hint or str(vec.meta.recipe.get("model_type") or "") or "unknown"


def _layer_of(name: str, where: Path) -> int | None:
    """The layer N of a tensor named ``direction.N`` (None for another name); N beyond llama.cpp's int raises."""
    m = _DIRECTION.match(name)
    if m is None:
        return None
    layer = int(m.group(1))
    if layer > MAX_LAYER:
        raise ValueError(f"{where}: {name} names layer {layer}, beyond any model (llama.cpp refuses the file)")
    return layer


def write_gguf(
    vec: SteeringVector, path: str | Path, model_hint: str | None = None, include_layer0: bool = False
) -> Path:
    """Write ``vec`` as a GGUF v3 control vector at ``path`` (atomically).

    llama.cpp cannot address layer 0, so a vector holding it is refused unless ``include_layer0`` (EasySteer).
    """
    path = Path(path)
    _check_gguf(vec, include_layer0)
    with atomic_path(path) as tmp:
        _write_gguf_at(vec, tmp, model_hint)
    return path


def _check_gguf(vec: SteeringVector, include_layer0: bool) -> None:
    if 0 in vec.layers and not include_layer0:
        raise ValueError(
            "llama.cpp rejects a control vector with direction.0 (it cannot steer the output of block 0); "
            "extract at layers >= 1, or export --format easysteer (which reads layer 0)"
        )
    if max(vec.layers) > MAX_LAYER:
        raise ValueError(f"layer {max(vec.layers)} is beyond any model; llama.cpp would refuse the file")


def _write_gguf_at(vec: SteeringVector, tmp: Path, model_hint: str | None) -> None:
    import gguf

    order = sorted(range(len(vec.layers)), key=lambda i: vec.layers[i])
    w = gguf.GGUFWriter(str(tmp), ARCH)
    w.add_string(f"{ARCH}.model_hint", _model_hint(vec, model_hint))
    w.add_uint32(f"{ARCH}.layer_count", len(vec.layers))
    w.add_string(f"{ARCH}.method", str(vec.meta.recipe.get("method", "unknown")))
    w.add_string(f"{ARCH}.site", "resid_post")
    w.add_string(f"{ARCH}.positions", vec.meta.positions)
    w.add_float32(f"{ARCH}.default_scale", float(vec.meta.gamma))
    w.add_bool(f"{ARCH}.normalized", False)
    w.add_string(META_KEY, meta_json(vec.meta))
    for i in order:
        w.add_tensor(f"direction.{vec.layers[i]}", vec.directions[i].numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_gguf(path: str | Path) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
    """``({layer: float32 [d]}, {key: value})`` of a control-vector GGUF; anything else raises naming the file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; check the path")
    try:
        reader = gguf.GGUFReader(str(path))
        fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
        tensors = [(t.name, t.tensor_type, tuple(int(x) for x in t.shape), np.array(t.data)) for t in reader.tensors]
    except Exception as e:  # noqa: BLE001 - GGUFReader raises many types on a damaged file
        raise ValueError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it is truncated or not GGUF"
        ) from None
    arch = fields.get("general.architecture")
    if arch != ARCH:
        raise ValueError(f"{path} is a GGUF of architecture {arch!r}, not a control vector ({ARCH!r})")
    out: dict[int, np.ndarray] = {}
    for name, kind, shape, data in tensors:
        layer = _layer_of(name, path)
        if layer is None:
            raise ValueError(f"{path}: tensor {name!r} is not named direction.<layer>; not a control vector")
        if kind != gguf.GGMLQuantizationType.F32 or len(shape) != 1:
            raise ValueError(f"{path}: {name} must be a 1-D F32 tensor (llama.cpp's rule), got {kind.name} {shape}")
        d = data.astype(np.float32).reshape(-1)
        out[layer] = out[layer] + d if layer in out else d.copy()  # duplicates sum, as in llama.cpp
    if not out:
        raise ValueError(f"{path} holds no direction.<layer> tensors")
    if len({v.shape for v in out.values()}) != 1:
        raise ValueError(f"{path}: directions have different lengths; every direction must have n_embd values")
    return out, fields


def _write_safetensors(vec: SteeringVector, path: Path) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        tensors = {f"direction.{layer}": vec.directions[i].clone() for i, layer in enumerate(vec.layers)}
        save_file(tensors, str(tmp), metadata={META_KEY: meta_json(vec.meta)})
    return path


def spec_path(path: Path) -> Path:
    """Where an EasySteer export writes its request beside the GGUF at ``path``."""
    return path.with_name(path.stem + ".steering.json")


def export_vector(vec: SteeringVector, path: str | Path, format: Format, model_hint: str | None = None) -> list[Path]:
    """Write ``vec`` in ``format`` at ``path``; returns the files written."""
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not one of {', '.join(FORMATS)}")
    if format == "gguf":
        return [write_gguf(vec, path, model_hint)]
    if format == "safetensors":
        return [_write_safetensors(vec, path)]
    spec = {
        "vectors": [
            {
                "source": path.name,
                "algorithm": "direct",
                "scale": vec.meta.gamma,
                "layers": sorted(vec.layers),
                "normalize": False,
                "apply": _APPLY[vec.meta.positions],
            }
        ]
    }
    _check_gguf(vec, include_layer0=True)
    with atomic_path(path) as tmp_gguf, atomic_path(spec_path(path)) as tmp_spec:  # both files, or neither
        _write_gguf_at(vec, tmp_gguf, model_hint)
        tmp_spec.write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
    return [path, spec_path(path)]


# ---------------------------------------------------------------------------- import


def _from_layers(
    directions: Mapping[int, np.ndarray | torch.Tensor],
    where: Path,
    fmt: str,
    meta_text: str | None = None,
    extra: Mapping[str, Any] | None = None,
    positions: Positions = "all",
) -> SteeringVector:
    layers = sorted(directions)
    if layers and layers[-1] > MAX_LAYER:
        raise ValueError(f"{where}: layer {layers[-1]} is beyond any model; llama.cpp reads layers up to {MAX_LAYER}")
    flat = [_float32(directions[x]) for x in layers]
    if any(r.ndim != 1 for r in flat):
        shapes = {x: tuple(r.shape) for x, r in zip(layers, flat)}
        raise ValueError(f"{where}: each direction must be one [d_model] vector, got shapes {shapes}")
    if len({len(r) for r in flat}) > 1:
        widths = {x: len(r) for x, r in zip(layers, flat)}
        raise ValueError(f"{where}: its directions have different lengths {widths}; each must have d_model values")
    rows = torch.stack(flat)
    if meta_text:
        try:
            meta = VectorMeta.from_dict(json.loads(meta_text))
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{where}: its {META_KEY} metadata is damaged ({e}); re-export the vector") from None
        order = [meta.layers.index(x) for x in layers] if set(layers) == set(meta.layers) else None
        if order is None:
            raise ValueError(f"{where}: directions for layers {layers} differ from its metadata's {list(meta.layers)}")
        meta = VectorMeta.from_dict({**meta.to_dict(), "layers": layers})
    else:
        recipe = {"imported_from": str(where), "format": fmt, **dict(extra or {})}
        meta = VectorMeta(
            d_model=rows.shape[1], layers=tuple(layers), positions=positions, recipe=recipe, gamma_rule="imported"
        )
    rows = _finite(rows, layers, where)
    try:
        return SteeringVector(rows, meta)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _float32(d: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A float32 tensor of ``d`` (a bfloat16 tensor converts in torch: numpy has no bfloat16)."""
    return d.float() if isinstance(d, torch.Tensor) else torch.as_tensor(np.asarray(d), dtype=torch.float32)


def _finite(rows: torch.Tensor, layers: list[int], where: Path) -> torch.Tensor:
    bad = ~torch.isfinite(rows).all(-1)
    if bool(bad.any()):
        raise ValueError(f"{where}: the direction for layer {layers[int(bad.nonzero()[0, 0])]} holds NaN or inf")
    return rows


def _load_pt(path: Path, layer: int | None, key: str | None) -> SteeringVector:
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds more than tensors (code or custom objects; refused: loaded with weights_only=True): "
            f"{str(e).splitlines()[0]}"
        ) from None
    except Exception as e:  # noqa: BLE001  (torch.load raises RuntimeError, EOFError, KeyError, ... on foreign bytes)
        raise ValueError(f"{path} is not a readable torch file ({e!r}); it is truncated or not a .pt") from None
    if isinstance(obj, torch.Tensor):
        if layer is None:
            raise ValueError(f"{path} is a bare tensor that does not record its layer; give the layer (--layer N)")
        if obj.ndim not in (1, 2):
            raise ValueError(f"{path}: expected [n_pairs, d_model] difference rows or one [d_model] vector")
        rows = obj.float().reshape(-1, obj.shape[-1])
        extra = {"method": "mean_diff", "n_pairs": len(rows), "note": ASC_PT_NOTE}
        return _from_layers({layer: rows.mean(0)}, path, "pt", extra=extra, positions="last")
    if isinstance(obj, Mapping) and obj and all(_layer_entry(k, v) for k, v in obj.items()):
        # {layer: [d_model]} (steering-vectors' layer_activations saved as is): one direction per block output
        picked = {int(k): v for k, v in obj.items()}
        if key is not None:
            raise ValueError(f"{path} holds directions by layer {sorted(picked)}, not behaviours; drop --key")
        if layer is not None:
            if layer not in picked:
                raise ValueError(f"{path} has no direction for layer {layer}; it has layers {sorted(picked)}")
            picked = {layer: picked[layer]}
        return _from_layers(picked, path, "pt", extra={"method": "unknown"})
    if isinstance(obj, Mapping):
        obj = {str(k): v for k, v in obj.items()}
        names = sorted(k for k in obj if k != OVERALL)
        if key == OVERALL:
            raise ValueError(
                f"{path}[{OVERALL!r}] is the mean activation over all sentences, not a direction; choose a behaviour "
                f"(--key NAME) of {names}"
            )
        if key is None and len(names) != 1:
            raise ValueError(f"{path} holds behaviours {names}; choose one (--key NAME)")
        key = key if key is not None else names[0]
        if key not in obj:
            raise ValueError(f"{path} has no behaviour {key!r}; it has {names}")
        mean = _mean_rows(obj, key, path)
        info: dict[str, Any] = {"behaviour": key, "method": "mean_diff"}
        if OVERALL in obj:  # raw per-behaviour means beside their overall mean: the feature is the difference
            mean = mean - _mean_rows(obj, OVERALL, path)
            info["note"] = f"behaviour mean − {OVERALL!r} mean"
        picked = {i: mean[i] for i in range(len(mean))} if layer is None else {layer: _row(mean, layer, path)}
        return _from_layers(picked, path, "pt", extra=info)
    raise ValueError(f"{path} holds a {type(obj).__name__}; expected a tensor or a {{behaviour: {{'mean': ...}}}} dict")


def _layer_entry(k: Any, v: Any) -> bool:
    return isinstance(k, int) and not isinstance(k, bool) and isinstance(v, torch.Tensor) and v.ndim == 1


def _mean_rows(obj: Mapping[str, Any], key: str, path: Path) -> torch.Tensor:
    entry = obj[key]
    mean = entry.get("mean") if isinstance(entry, Mapping) else entry
    if not isinstance(mean, torch.Tensor) or mean.ndim != 2:
        raise ValueError(f"{path}[{key!r}] has no 'mean' tensor [n_layers, d_model]")
    return mean.float()


def _row(mean: torch.Tensor, layer: int, path: Path) -> torch.Tensor:
    if not 0 <= layer < len(mean):
        raise ValueError(f"{path}: layer {layer} does not exist (rows 0..{len(mean) - 1})")
    return mean[layer]


def _select(vec: SteeringVector, layer: int | None, where: Path) -> SteeringVector:
    if layer is None or vec.layers == (layer,):
        return vec
    if layer not in vec.layers:
        raise ValueError(f"{where} has no direction for layer {layer}; it has layers {list(vec.layers)}")
    meta = VectorMeta.from_dict({**vec.meta.to_dict(), "layers": [layer]})
    return SteeringVector(vec.direction(layer)[None], meta)


def _safetensors_header(head: bytes, path: Path) -> bool:
    """Whether ``head``, the first bytes of ``path``, start a safetensors file: a little-endian u64 header length,
    then ``{``."""
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size


def load_vector(path: str | Path, layer: int | None = None, key: str | None = None) -> SteeringVector:
    """Read a vector from an artifact directory, a GGUF / safetensors export, or an ASC / behaviour ``.pt``.

    ``layer`` picks one layer (and is required for a bare ASC tensor); ``key`` picks a behaviour of a ``.pt`` dict.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; check the path")
    if path.is_dir():
        if not (path / MANIFEST).exists():
            raise ValueError(f"{path} is a directory without {MANIFEST}; pass a steering_vector artifact or a file")
        return _select(SteeringVector.open(path), layer, path)
    with open(path, "rb") as f:
        head = f.read(9)  # GGUF's magic, or safetensors' header length and opening brace
    if head[:4] == b"GGUF":
        directions, fields = read_gguf(path)
        extra = {"model_hint": fields.get(f"{ARCH}.model_hint")}
        vec = _from_layers(directions, path, "gguf", fields.get(META_KEY), extra)
        return _select(vec, layer, path)
    if path.suffix == ".safetensors" or _safetensors_header(head, path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta_text = (f.metadata() or {}).get(META_KEY)
                named = [(x, n) for n in f.keys() if (x := _layer_of(n, path)) is not None]  # noqa: SIM118
                if len({x for x, _ in named}) < len(named):
                    raise ValueError(f"{path} holds two tensors for one layer ({sorted(n for _, n in named)})")
                tensors = {x: f.get_tensor(n) for x, n in named}
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on damaged files
            raise ValueError(f"{path} is not a readable safetensors file ({e}); it is truncated or damaged") from None
        if not tensors:
            raise ValueError(f"{path} holds no direction.<layer> tensors; export it with --format safetensors")
        return _select(_from_layers(tensors, path, "safetensors", meta_text), layer, path)
    if path.suffix in (".pt", ".pth", ".bin"):
        return _select(_load_pt(path, layer, key), layer, path)
    raise ValueError(f"{path}: unknown vector file (expected a GGUF, .safetensors, .pt or an artifact directory)")
