"""The hook registry as data: select_hooks patterns, geometry-derived shapes and widths, eager attention."""

from __future__ import annotations

import pytest
import torch

from reasonscope.hooks import HOOK_SPECS, attach, check_attention, hook_names, needs_eager, select_hooks
from reasonscope.models import Geometry, load_model

G = Geometry(n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, d_model=32)


def test_select_hooks_patterns():
    assert select_hooks("blocks.*.hook_resid_post", 3) == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert select_hooks("hook_resid_post", 3) == select_hooks("blocks.*.hook_resid_post", 3)
    assert select_hooks("blocks.1-2.attn.hook_z", 4) == ["blocks.1.attn.hook_z", "blocks.2.attn.hook_z"]
    # comma-separated strings and lists agree, duplicates collapse, order is execution order
    s = select_hooks("blocks.1.hook_resid_post, blocks.0.attn.hook_z,hook_resid_post", 2)
    assert s == select_hooks(["hook_resid_post", "blocks.0.attn.hook_z", "blocks.1.hook_resid_post"], 2)
    assert s == ["blocks.0.attn.hook_z", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert select_hooks("blocks.3.*", 4) == [n for n in hook_names(4) if n.startswith("blocks.3.")]
    assert select_hooks("blocks.0.attn.*", 4) == ["blocks.0.attn.hook_z", "blocks.0.attn.hook_pattern"]


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("blocks.0.resid", "no kind matches 'resid'.*hook_resid_post"),
        ("hook_resid", "no kind matches"),
        ("blocks.4.hook_resid_post", "layers 0..3"),
        ("blocks.2-9.hook_resid_post", "layer 9 is out of range"),
        ("blocks.3-1.hook_resid_post", "write it low-high, e.g. 1-3"),
        ("blocks.x.hook_resid_post", "not a number, a range A-B or"),
        (" , ", "no hook selected"),
        ([], "no hook selected"),
    ],
)
def test_select_hooks_errors_name_valid_choices(pattern, message):
    with pytest.raises(ValueError, match=message):
        select_hooks(pattern, 4)


def test_specs_carry_shape_width_and_flags():
    z, pattern, resid = HOOK_SPECS["attn.hook_z"], HOOK_SPECS["attn.hook_pattern"], HOOK_SPECS["hook_resid_post"]
    assert z.splits_heads and not resid.splits_heads
    assert pattern.needs_eager and not any(s.needs_eager for k, s in HOOK_SPECS.items() if k != "attn.hook_pattern")
    assert z.size(G, 2, 5) == (2, 5, 4, 8) and z.width(G) == 32 and z.shape == "[batch, pos, n_heads, head_dim]"
    assert resid.width(G) == 32 and resid.size(G, 1, 3) == (1, 3, 32)
    assert pattern.size(G, 2, 5) == (2, 4, 5, 5) and pattern.per_key and pattern.width(G, n_keys=7) == 28
    with pytest.raises(ValueError, match="n_keys"):
        pattern.width(G)
    x = torch.randn(2, 5, 32)
    assert torch.equal(z.from_canonical(z.to_canonical(x, 4)), x) and z.to_canonical(x, 4).shape == (2, 5, 4, 8)


def test_needs_eager_and_check():
    assert needs_eager(["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"])
    assert not needs_eager(["blocks.0.hook_resid_post"])
    check_attention(["blocks.0.attn.hook_pattern"], "eager")
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        check_attention(["blocks.0.attn.hook_pattern"], "sdpa")


def test_shapes_match_the_registry_on_every_backend(tiny_model_dir):
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    for backend in ("hf", "transformer_lens", "nnsight"):
        h = load_model(tiny_model_dir, backend=backend, attn_implementation="eager")
        got: list[tuple[int, ...]] = []
        h.run(ids, hooks={"blocks.1.*": lambda x, got=got: got.append(tuple(x.shape))})
        names = select_hooks("blocks.1.*", h.geometry.n_layers)
        expect = [HOOK_SPECS[n.split(".", 2)[2]].size(h.geometry, 1, 5) for n in names]
        assert sorted(got) == sorted(expect), backend


@pytest.mark.parametrize("backend", ["hf", "nnsight"])
def test_pattern_without_eager_is_a_clear_error(tiny_model_dir, backend):
    h = load_model(tiny_model_dir, backend=backend, attn_implementation="sdpa")
    seen = []
    with pytest.raises(ValueError, match="needs eager attention"):
        h.run(torch.tensor([[1, 2, 3]]), hooks={"blocks.0.attn.hook_pattern": seen.append})
    assert seen == []  # the hook never received None


def test_run_accepts_patterns_and_rejects_overlaps(tiny_handle):
    ids = torch.tensor([[1, 2, 3]])
    seen: list[tuple[int, ...]] = []
    tiny_handle.run(ids, hooks={"hook_resid_post": lambda x: seen.append(tuple(x.shape))})
    assert seen == [(1, 3, 32)] * 2
    with pytest.raises(ValueError, match="two patterns"):
        tiny_handle.run(ids, hooks={"hook_resid_post": print, "blocks.0.hook_resid_post": print})


@pytest.mark.parametrize("backend", ["hf", "transformer_lens", "nnsight"])
def test_a_hook_must_return_none_or_a_same_shape_tensor(tiny_model_dir, backend):
    h = load_model(tiny_model_dir, backend=backend)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(TypeError, match=r"blocks.0.attn.hook_z returned Size; return None"):
        h.run(ids, hooks={"blocks.0.attn.hook_z": lambda z: z.shape})
    with pytest.raises(ValueError, match=r"must keep the activation's shape \(1, 3, 32\)"):
        h.run(ids, hooks={"blocks.1.hook_resid_post": lambda x: x[:, :2]})


@pytest.mark.parametrize("backend", ["hf", "transformer_lens", "nnsight"])
def test_pattern_edits_are_refused_where_they_would_change_nothing(tiny_model_dir, backend):
    """On hf and nnsight the pattern hook runs after the weights met the values: an edit is refused there (a read
    still works), while TransformerLens' pattern hook runs before them and an edit changes the logits."""
    h = load_model(tiny_model_dir, backend=backend, attn_implementation="eager")
    ids = torch.tensor([[1, 2, 3, 4]])
    plain = h.run(ids)
    seen: list[tuple[int, ...]] = []
    h.run(ids, hooks={"blocks.0.attn.hook_pattern": lambda p: seen.append(tuple(p.shape))})
    assert seen == [(1, 4, 4, 4)]
    zero = {"blocks.0.attn.hook_pattern": torch.zeros_like}
    if backend == "transformer_lens":
        assert (h.run(ids, hooks=zero) - plain).abs().max() > 1e-3
        return
    with pytest.raises(ValueError, match=r"blocks.0.attn.hook_pattern is read-only on this backend.*attn.hook_z"):
        h.run(ids, hooks=zero)
    with pytest.raises(ValueError, match="read-only"):  # also when the pattern is the last point cached
        h.run_with_cache(ids, None, "blocks.0.attn.hook_pattern", hooks=zero)
    assert torch.equal(h.run(ids), plain)


def test_a_replacement_takes_the_activation_dtype(tiny_model_dir):
    """``x + v`` with a float32 ``v`` on a bfloat16 model replaces the activation in bfloat16."""
    h = load_model(tiny_model_dir, dtype="bf16")
    ids = torch.tensor([[1, 2, 3]])
    v = torch.ones(h.geometry.d_model)
    got = h.run(ids, hooks={"blocks.1.hook_resid_post": lambda x: x.float() + v})
    want = h.run(ids, hooks={"blocks.1.hook_resid_post": lambda x: x + v.bfloat16()})
    assert torch.equal(got, want)


def test_compose_hooks_chains_functions_on_one_name(tiny_handle):
    from reasonscope.hooks import compose_hooks

    ids = torch.tensor([[3, 4, 5, 6]])
    name = "blocks.0.hook_resid_post"
    seen: list[torch.Tensor] = []
    hooks = compose_hooks({name: lambda x: x + 1.0}, {name: lambda x: seen.append(x.clone())}, {name: lambda x: x * 2})
    plain = tiny_handle.run_with_cache(ids, None, name)[name]
    got = tiny_handle.run_with_cache(ids, None, name, hooks=hooks)[name]
    assert torch.allclose(seen[0], plain + 1.0) and torch.allclose(got, (plain + 1.0) * 2)
    g = tiny_handle.geometry
    with attach(tiny_handle.model, {"blocks.*.hook_resid_post": lambda x: None}, g.n_layers, g.n_heads):
        pass  # attach takes patterns as run does
