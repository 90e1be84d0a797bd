"""Exports for serving (llama.cpp GGUF, EasySteer, safetensors) and imports (GGUF, repeng, ASC/behaviour .pt)."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from steering.export import export_vector, load_vector, read_gguf, write_gguf
from steering.vector import SteeringVector, VectorMeta

GGUF_TYPES = {4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def parse_gguf(path: Path) -> tuple[dict, dict]:
    """An independent GGUF v3 reader (research/steering.md §5.1): KV pairs and {name: (type, shape, floats)}."""
    b = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        (v,) = struct.unpack_from(fmt, b, pos)
        pos += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        s = b[pos : pos + n].decode()
        pos += n
        return s

    assert b[:4] == b"GGUF"
    pos = 4
    assert take("<I") == 3
    n_tensors, n_kv = take("<Q"), take("<Q")
    kv = {}
    for _ in range(n_kv):
        key, vtype = string(), take("<I")
        kv[key] = string() if vtype == 8 else take(GGUF_TYPES[vtype])
    infos = []
    for _ in range(n_tensors):
        name, n_dims = string(), take("<I")
        dims = [take("<Q") for _ in range(n_dims)]
        infos.append((name, dims, take("<I"), take("<Q")))
    align = kv.get("general.alignment", 32)
    data = -(-pos // align) * align
    tensors = {}
    for name, dims, kind, offset in infos:
        assert offset % align == 0
        n = int(np.prod(dims))
        tensors[name] = (kind, dims, np.frombuffer(b, "<f4", n, data + offset))
    return kv, tensors


def vector(layers=(1, 3), d=16, **meta) -> SteeringVector:
    torch.manual_seed(1)
    m = VectorMeta(d_model=d, layers=layers, n_layers=4, positions="last", gamma=0.4, gamma_rule="sweep", **meta)
    return SteeringVector(torch.randn(len(layers), d), m)


def test_gguf_layout_is_a_llama_cpp_control_vector(tmp_path):
    vec = vector(recipe={"method": "mean_diff", "model_type": "qwen2"})
    path = write_gguf(vec, tmp_path / "v.gguf")
    kv, tensors = parse_gguf(path)
    assert list(kv)[:3] == ["general.architecture", "controlvector.model_hint", "controlvector.layer_count"]
    assert kv["general.architecture"] == "controlvector" and kv["controlvector.model_hint"] == "qwen2"
    assert kv["controlvector.layer_count"] == 2 and kv["controlvector.default_scale"] == pytest.approx(0.4)
    assert sorted(tensors) == ["direction.1", "direction.3"]
    for layer in (1, 3):
        kind, dims, data = tensors[f"direction.{layer}"]
        assert kind == 0 and dims == [16]  # F32, 1-D
        assert np.array_equal(data, vec.direction(layer).numpy())
    directions, fields = read_gguf(path)
    assert sorted(directions) == [1, 3] and fields["controlvector.model_hint"] == "qwen2"
    method = vec.export_gguf(tmp_path / "m.gguf", model_hint="llama")  # the vector's own method, repeng's spelling
    assert method == tmp_path / "m.gguf" and read_gguf(method)[1]["controlvector.model_hint"] == "llama"
    assert all(np.array_equal(read_gguf(method)[0][k], directions[k]) for k in (1, 3))


def test_gguf_refuses_layer_zero_for_llama_cpp(tmp_path):
    vec = vector(layers=(0, 2))
    with pytest.raises(ValueError, match=r"direction\.0"):
        write_gguf(vec, tmp_path / "v.gguf")
    assert not list(tmp_path.iterdir())  # nothing written
    files = export_vector(vec, tmp_path / "e.gguf", "easysteer")
    _, tensors = parse_gguf(files[0])
    assert sorted(tensors) == ["direction.0", "direction.2"]
    spec = json.loads(files[1].read_text())
    assert spec["vectors"][0]["apply"] == {"prompt_positions": [-1], "generation": "all"}
    assert spec["vectors"][0]["scale"] == pytest.approx(0.4) and spec["vectors"][0]["layers"] == [0, 2]


@pytest.mark.parametrize(
    "positions, apply",
    [
        ("all", {"prompt": "all", "generation": "all"}),
        ("last", {"prompt_positions": [-1], "generation": "all"}),
        ("generated", {"generation": "all"}),
        ("prompt", {"prompt_positions": [-1]}),
    ],
)
def test_easysteer_apply_spec_follows_the_position_rule(tmp_path, positions, apply):
    vec = vector()
    vec = SteeringVector(vec.directions, dataclasses.replace(vec.meta, positions=positions))
    files = export_vector(vec, tmp_path / "e.gguf", "easysteer")
    assert json.loads(files[1].read_text())["vectors"][0]["apply"] == apply
    assert load_vector(files[0]).meta.positions == positions


@pytest.mark.parametrize("fmt, name", [("gguf", "v.gguf"), ("easysteer", "e.gguf"), ("safetensors", "v.safetensors")])
def test_export_import_round_trip(tmp_path, fmt, name):
    vec = vector()
    export_vector(vec, tmp_path / name, fmt)
    back = load_vector(tmp_path / name)
    assert torch.equal(back.directions, vec.directions) and back.meta == vec.meta
    one = load_vector(tmp_path / name, layer=3)
    assert one.layers == (3,) and torch.equal(one.directions[0], vec.direction(3))


def test_imports_a_repeng_style_gguf(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "r.gguf"), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 2)
    for layer, value in ((2, 1.0), (5, -2.0)):
        w.add_tensor(f"direction.{layer}", np.full(8, value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    vec = load_vector(tmp_path / "r.gguf")
    assert vec.layers == (2, 5) and vec.meta.gamma_rule == "imported" and vec.meta.d_model == 8
    assert vec.meta.recipe["model_hint"] == "llama" and float(vec.direction(5)[0]) == -2.0


def test_safetensors_with_uneven_or_mislabelled_directions_are_refused_naming_the_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"direction.1": torch.ones(8), "direction.2": torch.ones(9)}, str(tmp_path / "uneven.safetensors"))
    with pytest.raises(ValueError, match=r"uneven\.safetensors: .*different lengths"):
        load_vector(tmp_path / "uneven.safetensors")
    meta = dataclasses.replace(vector().meta, d_model=9)
    save_file(
        {"direction.1": torch.ones(16), "direction.3": torch.ones(16)},
        str(tmp_path / "w.safetensors"),
        metadata={"reasonscope.meta": json.dumps(meta.to_dict())},
    )
    with pytest.raises(ValueError, match=r"w\.safetensors: "):
        load_vector(tmp_path / "w.safetensors")
    save_file({"direction.1": torch.ones(2, 4)}, str(tmp_path / "2d.safetensors"))
    with pytest.raises(ValueError, match=r"2d\.safetensors: each direction must be one \[d_model\] vector"):
        load_vector(tmp_path / "2d.safetensors")
    bf16 = torch.randn(2, 16).to(torch.bfloat16)  # numpy has no bfloat16
    save_file({"direction.1": bf16[0], "direction.2": bf16[1]}, str(tmp_path / "bf16.safetensors"))
    assert torch.equal(load_vector(tmp_path / "bf16.safetensors").directions, bf16.float())


def test_bad_gguf_files_are_refused(tmp_path):
    import gguf

    good = write_gguf(vector(), tmp_path / "v.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"cut\.gguf"):
        load_vector(cut)
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="not a control vector"):
        load_vector(tmp_path / "m.gguf")


class Payload:
    """Not a tensor: a .pt holding it must be refused (weights_only)."""


def test_pt_imports(tmp_path):
    rows = torch.randn(5, 16)
    torch.save(rows, tmp_path / "asc.pt")
    vec = load_vector(tmp_path / "asc.pt", layer=20 % 4)
    assert vec.layers == (0,) and torch.allclose(vec.direction(0), rows.mean(0)) and vec.meta.positions == "last"
    with pytest.raises(ValueError, match="--layer"):
        load_vector(tmp_path / "asc.pt")
    behaviours = {"backtracking": {"mean": torch.randn(4, 16)}, "checking": {"mean": torch.randn(4, 16)}}
    torch.save(behaviours, tmp_path / "beh.pt")
    vec = load_vector(tmp_path / "beh.pt", key="checking")
    assert vec.layers == (0, 1, 2, 3) and torch.equal(vec.direction(2), behaviours["checking"]["mean"][2])
    assert load_vector(tmp_path / "beh.pt", key="checking", layer=2).layers == (2,)
    with pytest.raises(ValueError, match="--key"):
        load_vector(tmp_path / "beh.pt")
    overall = torch.randn(4, 16) * 50  # steering-thinking-llms' layout: raw means plus the mean over all sentences
    torch.save({**behaviours, "overall": {"mean": overall}}, tmp_path / "raw.pt")
    vec = load_vector(tmp_path / "raw.pt", key="checking", layer=1)
    assert torch.allclose(vec.direction(1), behaviours["checking"]["mean"][1] - overall[1])
    with pytest.raises(ValueError, match="not a direction"):
        load_vector(tmp_path / "raw.pt", key="overall")
    torch.save({"x": {"mean": torch.full((2, 16), float("nan"))}}, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="layer 0 holds NaN"):
        load_vector(tmp_path / "nan.pt")
    (tmp_path / "text.pt").write_text("export const v = [1, 2];\n")  # not a torch file at all
    with pytest.raises(ValueError, match=r"text\.pt is not a readable torch file"):
        load_vector(tmp_path / "text.pt", layer=0)
    torch.save(Payload(), tmp_path / "code.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_vector(tmp_path / "code.pt", layer=0)


def test_export_round_trip_of_an_artifact(tmp_path):
    vec = vector()
    vec.save(tmp_path / "art")
    assert torch.equal(load_vector(tmp_path / "art").directions, vec.directions)
    with pytest.raises(ValueError, match="no direction for layer 2"):
        load_vector(tmp_path / "art", layer=2)


def _raw_gguf(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "controlvector")
    for name, data in tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_round_trips_are_bit_exact_metadata_included(tmp_path):
    vec = vector(recipe={"sweep": (0.5, 1.0), "layers": ()}, gamma_detail={"a": (1, 2)})
    vec.directions[0, 0] = -0.0  # the sign of zero survives
    assert vec.meta.recipe == {"sweep": [0.5, 1.0], "layers": []}  # tuples read back as JSON lists: stored so
    for fmt, name in (("gguf", "v.gguf"), ("safetensors", "v.safetensors")):
        back = load_vector(export_vector(vec, tmp_path / name, fmt)[0])
        assert back.meta == vec.meta and torch.equal(
            back.directions.view(torch.int32), vec.directions.view(torch.int32)
        )
    with pytest.raises(ValueError, match="recipe must hold JSON values"):
        VectorMeta(d_model=4, layers=(1,), recipe={"path": Path("x")})


def test_direction_indices_llama_cpp_cannot_read_are_refused(tmp_path):
    huge = _raw_gguf(tmp_path / "huge.gguf", {"direction.4000000000": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match=r"huge\.gguf: direction\.4000000000 names layer 4000000000"):
        load_vector(huge)
    arabic = _raw_gguf(tmp_path / "digits.gguf", {"direction.\u0663": np.ones(4, np.float32)})  # not ASCII digits
    with pytest.raises(ValueError, match="not named direction"):
        load_vector(arabic)
    dup = _raw_gguf(
        tmp_path / "dup.gguf", {"direction.1": np.ones(4, np.float32), "direction.01": np.ones(4, np.float32)}
    )
    assert float(load_vector(dup).direction(1)[0]) == 2.0  # llama.cpp sums tensors for one layer
    from safetensors.torch import save_file

    save_file({"direction.1": torch.ones(4), "direction.01": torch.ones(4)}, str(tmp_path / "dup.safetensors"))
    with pytest.raises(ValueError, match="two tensors for one layer"):
        load_vector(tmp_path / "dup.safetensors")
    torch.save({4_000_000_000: torch.ones(4)}, tmp_path / "huge.pt")
    with pytest.raises(ValueError, match="beyond any model"):
        load_vector(tmp_path / "huge.pt")


def test_easysteer_export_writes_both_files_or_neither(tmp_path):
    (tmp_path / "e.steering.json").mkdir()  # the request cannot be written there
    with pytest.raises(OSError):
        export_vector(vector(), tmp_path / "e.gguf", "easysteer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.steering.json"]  # no GGUF left without its request


def test_layer_dict_pt_and_safetensors_under_any_name(tmp_path):
    d = {2: torch.randn(16), 5: torch.randn(16)}  # steering-vectors' {layer: direction}, saved as is
    torch.save(d, tmp_path / "layers.pt")
    vec = load_vector(tmp_path / "layers.pt")
    assert vec.layers == (2, 5) and torch.equal(vec.direction(5), d[5]) and vec.meta.gamma_rule == "imported"
    assert load_vector(tmp_path / "layers.pt", layer=2).layers == (2,)
    with pytest.raises(ValueError, match="no direction for layer 3"):
        load_vector(tmp_path / "layers.pt", layer=3)
    with pytest.raises(ValueError, match="drop --key"):
        load_vector(tmp_path / "layers.pt", key="2")
    vec = vector()
    export_vector(vec, tmp_path / "v.st", "safetensors")  # any suffix: read by its header
    assert torch.equal(load_vector(tmp_path / "v.st").directions, vec.directions)
