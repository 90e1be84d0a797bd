"""The reasoning-model families beside Qwen2 (DeepSeek-R1-Distill-Llama: Llama; Qwen3, with per-head q/k norms):
tiny random models of each go through loading, hooks, generation, gated attention and steering like the organisms."""

from __future__ import annotations

import pytest
import torch
from test_generation import QUESTIONS, encode, hf_greedy
from test_heads import decode_steps
from test_models import HOOKS, run_all
from transformers import DynamicCache

from reasonscope.capture import CaptureConfig, capture, capture_batch, select_positions
from reasonscope.generation import DecodeConfig, generate
from reasonscope.heads import CompressionPolicy, compressed_cache, gated_attention
from reasonscope.heads.gated import gated_run
from reasonscope.hooks import HOOK_SPECS
from reasonscope.models import load_model
from steering.vector import SteeringVector, VectorMeta

from conftest import make_task_traces

ARCHS = ["llama", "qwen3"]


@pytest.fixture(scope="module", params=ARCHS)
def arch_handle(request, tmp_path_factory):
    """A 2-layer model of the family (4 query / 2 KV heads, head_dim 8) with the organism tokenizer, weights of
    std 0.3 so that its greedy text varies."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    from reasonscope.organisms.tokenizer import build_tokenizer

    tok = build_tokenizer()
    common = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    cfg = LlamaConfig(**common) if request.param == "llama" else Qwen3Config(head_dim=8, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return load_model(path)


def test_geometry_and_every_hook(arch_handle):
    h = arch_handle
    g = h.geometry
    assert (g.n_layers, g.d_model, g.n_heads, g.n_kv_heads, g.head_dim) == (2, 32, 4, 2, 8)
    ids = torch.tensor(encode(h, QUESTIONS[:1]))
    got = run_all(h, ids, torch.ones_like(ids), HOOKS)
    for name in HOOKS:
        assert got[name].shape == HOOK_SPECS[name.split(".", 2)[2]].size(g, 1, ids.shape[1]), name
    hidden = h.model(ids.to(h.device), output_hidden_states=True).hidden_states
    assert torch.allclose(got["blocks.0.hook_resid_post"], hidden[1], atol=1e-5)


def test_logits_in_chunks_and_the_early_stopping_cache(arch_handle, monkeypatch):
    """``run_chunks`` (stopping at the final norm) gives ``run``'s logits; ``run_with_cache`` gives a block's output."""
    import reasonscope.budget as budget

    h = arch_handle
    ids = torch.tensor(encode(h, QUESTIONS[:1]))
    want = h.run(ids)
    monkeypatch.setattr(budget, "LOGIT_BUDGET", 2 * budget.vocab_size(h))
    chunks = list(h.run_chunks(ids))
    assert len(chunks) == -(-ids.shape[1] // 2)
    torch.testing.assert_close(torch.cat([x for _, x in chunks], 1), want, rtol=1e-5, atol=1e-5)
    hidden = h.model(ids.to(h.device), output_hidden_states=True).hidden_states
    got = h.run_with_cache(ids, names="blocks.0.hook_resid_post")["blocks.0.hook_resid_post"]
    torch.testing.assert_close(got, hidden[1], rtol=1e-5, atol=1e-5)


def test_greedy_generation_equals_hf_generate(arch_handle):
    h = arch_handle
    prompts = encode(h)
    out = generate(h, prompts, DecodeConfig(max_new_tokens=16, batch_size=2, refill=1))
    for p, c in zip(prompts, out):
        assert c.token_ids == hf_greedy(h, p, 16)
    assert len({tuple(c.token_ids) for c in out}) > 1


def test_gated_attention_and_the_physical_cache(arch_handle):
    h = arch_handle
    seq = torch.tensor(encode(h, QUESTIONS[:1]))
    ones = torch.ones(2, 2)
    with torch.no_grad(), gated_attention(h, ones) as state:
        assert torch.allclose(gated_run(h, state, seq), h.run(seq), atol=1e-5)  # alpha = 1: the model itself
    policy, keep = CompressionPolicy(sink=2, recent=4), torch.tensor([[True, False], [False, True]])

    with torch.no_grad():
        with gated_attention(h, keep.float(), policy):
            simulated = decode_steps(h, seq, 6, DynamicCache(config=h.model.config))
        with compressed_cache(h, keep, policy) as (cache, _):
            physical = decode_steps(h, seq, 6, cache)
        full = decode_steps(h, seq, 6, DynamicCache(config=h.model.config))
    assert (physical - simulated).abs().max() <= 1e-4 and (physical - full).abs().max() > 1e-3


def test_steering_applies_and_is_removed(arch_handle):
    h = arch_handle
    g = h.geometry
    torch.manual_seed(0)
    vec = SteeringVector(torch.randn(1, g.d_model), VectorMeta(d_model=g.d_model, layers=(0,), n_layers=g.n_layers))
    ids = torch.tensor(encode(h, QUESTIONS[:1]))
    before = h.run(ids)
    with vec.apply(h, gamma=4.0):
        steered = h.run(ids)
        text = generate(h, [ids[0].tolist()], DecodeConfig(max_new_tokens=8))
    assert not torch.allclose(before, steered, atol=1e-3)
    assert torch.equal(h.run(ids), before) and len(text[0].token_ids) >= 1


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_backends_agree(arch_handle, backend):
    h = arch_handle
    ids = torch.tensor([p[:10] for p in encode(h, QUESTIONS[:2])])
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"]
    mask = torch.ones_like(ids)
    ref = run_all(h, ids, mask, names)
    got = run_all(load_model(h.path, backend=backend), ids, mask, names)
    for n in names:
        assert torch.allclose(got[n], ref[n], atol=1e-5), n
    assert torch.allclose(got["logits"], ref["logits"], atol=1e-4)


def test_capture_batched_equals_one_by_one_and_the_store_equals_a_run(arch_handle, tmp_path):
    h = arch_handle
    traces = make_task_traces(h.tokenizer, 6)
    hooks = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_post"]
    cfg = CaptureConfig(hooks=hooks, positions="all", padding_side="left")
    pos = [select_positions(t, "all") for t in traces]
    batched = capture_batch(h, traces, pos, cfg)
    for i, t in enumerate(traces):
        single = capture_batch(h, [t], [pos[i]], cfg)
        for name in hooks:
            # fp32 residuals reach ~25 here: left padding changes the summation order by ~1e-5
            assert torch.allclose(batched[name][i], single[name][0], atol=1e-4), (name, i)
    store = capture(h, traces, CaptureConfig(hooks=hooks[1:], positions="think"), str(tmp_path / "s"), progress=False)
    t = traces[3]
    got: dict[str, torch.Tensor] = {}
    h.run(torch.tensor([t.token_ids]), hooks={hooks[1]: lambda x: got.update(x=x[0].cpu())})
    a, b = t.think_span
    assert torch.allclose(store.get(hooks[1], trace=t.id), got["x"][a:b], atol=1e-5)
