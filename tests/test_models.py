"""load_model, hook naming and the three backends on a tiny random GQA model."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from reasonscope.hooks import HOOK_SPECS, attach, hook_names, parse_hook
from reasonscope.models import Geometry, ModelNotFoundError, cache_kwargs, load_model

from conftest import organisms

HOOKS = [f"blocks.{layer}.{kind}" for layer in (0, 1) for kind in HOOK_SPECS if kind != "attn.hook_pattern"]


def batch(handle, texts):
    enc = handle.tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def run_all(handle, ids, mask, names):
    got = {}

    def keep(name):
        return lambda x: got.__setitem__(name, x.detach().clone())

    logits = handle.run(ids, mask, hooks={n: keep(n) for n in names})
    got["logits"] = logits.detach()
    return got


def test_geometry_and_markers(tiny_handle):
    g = tiny_handle.geometry
    assert g == Geometry(n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_model=32)
    assert g.group_size == 2
    start, end = tiny_handle.think_ids
    assert tiny_handle.tokenizer.convert_ids_to_tokens([start, end]) == ["<think>", "</think>"]
    assert tiny_handle.chat_prompt("a=1. what is a?").endswith("<think>")
    assert len(tiny_handle.hook_names) == 2 * len(HOOK_SPECS)


def test_hook_shapes_follow_conventions(tiny_handle):
    ids, mask = batch(tiny_handle, ["a=3, b=4. what is a + b?", "a=3?"])
    got = run_all(tiny_handle, ids, mask, HOOKS)
    ids, mask = ids.to(tiny_handle.device), mask.to(tiny_handle.device)
    hf = tiny_handle.model(
        ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), output_hidden_states=True
    )
    # layer N = output of block N = HF hidden_states[N + 1] (the last one is after the final norm)
    assert torch.allclose(got["blocks.0.hook_resid_post"], hf.hidden_states[1], atol=1e-6)
    assert torch.allclose(got["blocks.1.hook_resid_pre"], hf.hidden_states[1], atol=1e-6)
    assert got["blocks.1.attn.hook_z"].shape == (*ids.shape, 4, 8)
    resid = got["blocks.0.hook_resid_pre"] + got["blocks.0.hook_attn_out"] + got["blocks.0.hook_mlp_out"]
    assert torch.allclose(resid, got["blocks.0.hook_resid_post"], atol=1e-5)


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_backends_agree_with_plain_hf(tiny_model_dir, tiny_handle, backend):
    texts = ["a=3, b=4, c=1. what is a + b - c?", "d=2. what is d?"]  # left padding in row 2
    ids, mask = batch(tiny_handle, texts)
    ref = run_all(tiny_handle, ids, mask, HOOKS)
    other = run_all(load_model(tiny_model_dir, backend=backend), ids, mask, HOOKS)
    m = mask.bool()
    for name in ref:
        assert torch.allclose(other[name][m], ref[name][m], atol=1e-5), name


@pytest.mark.parametrize("backend", ["hf", "transformer_lens", "nnsight"])
def test_run_with_cache_reads_what_hooks_read(tiny_model_dir, tiny_handle, backend):
    """``run_with_cache`` gives the activations a reading hook sees, in every backend; an edit hook acts first."""
    texts = ["a=3, b=4, c=1. what is a + b - c?", "d=2. what is d?"]
    ids, mask = batch(tiny_handle, texts)
    ref = run_all(tiny_handle, ids, mask, HOOKS)
    handle = tiny_handle if backend == "hf" else load_model(tiny_model_dir, backend=backend)
    got = handle.run_with_cache(ids, mask, "blocks.*.hook_resid_post")
    assert sorted(got) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    m = mask.bool()
    for name, x in got.items():
        assert torch.allclose(x[m], ref[name][m], atol=1e-5), name
    zeroed = handle.run_with_cache(
        ids,
        mask,
        ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"],
        hooks={"blocks.0.hook_resid_post": lambda x: x * 0},
    )
    assert not zeroed["blocks.0.hook_resid_post"].any() and not zeroed["blocks.1.hook_resid_pre"].any()


@pytest.mark.parametrize("backend", ["hf", "transformer_lens", "nnsight"])
def test_run_with_cache_stops_before_the_logits(tiny_model_dir, tiny_handle, backend):
    """In every backend the pass ends at the last cached point: neither the later blocks nor the unembedding run,
    and no hook is left behind."""
    from conftest import torch_hooks

    handle = tiny_handle if backend == "hf" else load_model(tiny_model_dir, backend=backend)
    ids, mask = batch(handle, ["a=3, b=4. what is a + b?"])
    before, hooks = handle.run(ids, mask), torch_hooks(handle.model)
    calls: list[str] = []
    spies = [
        handle.model.get_output_embeddings().register_forward_hook(lambda *a: calls.append("unembed")),
        handle.model.model.layers[1].register_forward_hook(lambda *a: calls.append("block 1")),
    ]
    try:
        got = handle.run_with_cache(ids, mask, "blocks.0.hook_resid_post")
        assert calls == [] and list(got) == ["blocks.0.hook_resid_post"]
        handle.run(ids, mask)
        assert calls == ["block 1", "unembed"]
    finally:
        for s in spies:
            s.remove()
    assert torch_hooks(handle.model) == hooks and torch.equal(handle.run(ids, mask), before)


@pytest.mark.parametrize("backend", ["hf", "transformer_lens", "nnsight"])
def test_run_chunks_give_the_logits_of_run(tiny_model_dir, tiny_handle, backend, monkeypatch):
    """Chunks of positions within the logit budget, equal to ``run``'s logits with the same hooks, in every backend,
    whose unembedding reads one chunk's positions at a time."""
    import reasonscope.budget as budget

    ids, mask = batch(tiny_handle, ["a=3, b=4, c=1. what is a + b - c?", "d=2. what is d?"])
    handle = tiny_handle if backend == "hf" else load_model(tiny_model_dir, backend=backend)
    hooks = {"blocks.0.hook_resid_post": lambda x: x * 0.5}
    want, plain = handle.run(ids, mask, hooks), handle.run(ids, mask)
    vocab = budget.vocab_size(handle)
    monkeypatch.setattr(budget, "LOGIT_BUDGET", 2 * 3 * vocab)  # 3 positions of 2 rows a chunk
    widths: list[int] = []
    head = handle.model.get_output_embeddings().register_forward_hook(lambda m, i, o: widths.append(i[0].shape[1]))
    try:
        chunks = list(handle.run_chunks(ids, mask, hooks))
    finally:
        head.remove()
    assert [c.start for c, _ in chunks] == list(range(0, ids.shape[1], 3))
    torch.testing.assert_close(torch.cat([x for _, x in chunks], 1), want, rtol=1e-5, atol=1e-5)
    assert max(widths) == 3 and sum(widths) == ids.shape[1]
    assert torch.equal(handle.run(ids, mask), plain)  # the hooks are gone


def test_attention_pattern_needs_eager(tiny_model_dir):
    h = load_model(tiny_model_dir, attn_implementation="eager")
    ids, mask = batch(h, ["a=3, b=4. what is a + b?"])
    got = run_all(h, ids, mask, ["blocks.1.attn.hook_pattern"])
    pattern = got["blocks.1.attn.hook_pattern"]
    assert pattern.shape == (1, 4, ids.shape[1], ids.shape[1])
    assert torch.allclose(pattern.sum(-1).cpu(), torch.ones(1, 4, ids.shape[1]), atol=1e-5)
    assert torch.all(pattern.triu(1) == 0)  # causal


def test_hook_replacement_steers_downstream(tiny_handle):
    ids, mask = batch(tiny_handle, ["a=3, b=4. what is a + b?"])
    base = tiny_handle.run(ids, mask)
    v = torch.randn(32, device=tiny_handle.device)
    steered = tiny_handle.run(ids, mask, hooks={"blocks.0.hook_resid_post": lambda x: x + 5 * v})
    assert not torch.allclose(base, steered)
    again = tiny_handle.run(ids, mask)
    assert torch.equal(base, again)  # hooks are gone after the pass


def test_hooks_removed_when_forward_raises(tiny_handle):
    ids, mask = batch(tiny_handle, ["a=3?"])
    count = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_handle.model.modules())  # noqa: E731
    before = count()

    def boom(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tiny_handle.run(ids, mask, hooks={"blocks.1.hook_mlp_out": boom})
    assert count() == before

    def forward_under_attach():
        with attach(tiny_handle.model, {"blocks.0.hook_resid_pre": boom}, 2, 4):
            assert count() == before + 1
            tiny_handle.model(ids.to(tiny_handle.device))

    with pytest.raises(RuntimeError, match="boom"):  # raised through attach's exit
        forward_under_attach()
    assert count() == before


def test_cache_goes_under_the_name_the_forward_takes(tiny_handle):
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name goes in 5.40); older forwards take
    the old name. The installed model's forward takes whichever name is returned, without a deprecation warning."""

    class Old:
        def forward(self, input_ids=None, past_key_values=None): ...

    class New:
        def forward(self, input_ids=None, cache=None): ...

    assert cache_kwargs(Old(), 1) == {"past_key_values": 1} and cache_kwargs(New(), 2) == {"cache": 2}
    from transformers import DynamicCache

    ids = torch.tensor([[1, 2, 3]], device=tiny_handle.device)
    cache = DynamicCache(config=tiny_handle.model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_handle.model(input_ids=ids, use_cache=True, **cache_kwargs(tiny_handle.model, cache))
    assert cache.get_seq_length() == 3


def test_bad_hook_names():
    with pytest.raises(ValueError, match="valid names"):
        parse_hook("blocks.0.resid", 2)
    with pytest.raises(ValueError, match="layers 0..1"):
        parse_hook("blocks.7.hook_resid_post", 2)
    assert "blocks.1.hook_mlp_out" in hook_names(2)


def test_dtype_and_device(tiny_model_dir):
    h = load_model(tiny_model_dir, dtype="bf16", device="cpu")
    assert next(h.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(tiny_model_dir, dtype="int3")
    with pytest.raises(ValueError, match="unknown backend"):
        load_model(tiny_model_dir, backend="jax")


def test_unknown_sources_fail_fast_with_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(ModelNotFoundError) as e:
        load_model("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    assert time.time() - t < 10
    msg = str(e.value)
    assert "hub: unreachable" in msg and "local directory" in msg and "organism:thinking" in msg
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_weights_saved_without_their_tokenizer_name_the_fix(tiny_model_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("config", "generation_config", "model")):
            shutil.copy(f, bare / f.name)
    with pytest.raises(ValueError, match=r"has no tokenizer files.*tokenizer.save_pretrained"):
        load_model(bare)
    with pytest.raises(ModelNotFoundError, match="unknown organism"):
        load_model("organism:wizard")


@organisms
@pytest.mark.parametrize("kind", ["thinking", "base"])
def test_organisms_load_offline_in_all_backends(kind):
    hf = load_model(f"organism:{kind}")
    g = hf.geometry
    assert g.n_kv_heads < g.n_heads
    ids, mask = batch(hf, [hf.chat_prompt("a=3, b=4. what is a + b?"), hf.chat_prompt("c=1. what is c?")])
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(g.n_layers)]
    ref = run_all(hf, ids, mask, names)
    for backend in ("transformer_lens", "nnsight"):
        other = run_all(load_model(f"organism:{kind}", backend=backend), ids, mask, names)
        for n in names:
            assert torch.allclose(other[n][mask.bool()], ref[n][mask.bool()], atol=1e-4), (backend, n)


@pytest.mark.parametrize("backend", ["hf", "transformer_lens", "nnsight"])
def test_run_with_cache_keeps_every_point_whatever_order_the_backend_fires_them(tiny_model_dir, backend):
    """TransformerLens fires attn.hook_pattern before attn.hook_z: the pass stops only once both are cached."""
    h = load_model(tiny_model_dir, backend=backend, attn_implementation="eager")
    ids = torch.tensor([[3, 4, 5, 6]])
    got = h.run_with_cache(ids, None, "blocks.0.attn.*")
    assert sorted(got) == ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z"]


def test_a_transformer_lens_handle_refuses_to_generate(tiny_model_dir):
    from reasonscope.generation import DecodeConfig, generate

    h = load_model(tiny_model_dir, backend="transformer_lens")
    with pytest.raises(ValueError, match="backend='hf'"):
        generate(h, [[3, 4, 5]], DecodeConfig(max_new_tokens=2))
