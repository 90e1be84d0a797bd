"""Gated attention per KV head, the physically compressed cache, and their equivalences (tiny model)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from reasonscope.heads import CompressionPolicy, compressed_cache, gated_attention, kv_bytes
from reasonscope.heads.gated import GATED_ATTN, gated_run
from reasonscope.models import cache_kwargs

POLICY = CompressionPolicy(sink=2, recent=4)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 300, (2, 30), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    return ids, mask


def test_policy_validation():
    with pytest.raises(ValueError, match="non-negative"):
        CompressionPolicy(sink=-1)
    with pytest.raises(ValueError, match="keeps no token"):
        CompressionPolicy(sink=0, recent=0)
    with pytest.raises(ValueError, match="'full' or 'window'"):
        CompressionPolicy(prefill="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="covers the whole context"):
        CompressionPolicy(sink=16, recent=64).check_context(60)


def test_alpha_one_is_the_model_and_restored_after_error(tiny_handle, batch):
    ids, mask = batch
    g = tiny_handle.geometry
    ref = tiny_handle.run(ids, mask)
    original = tiny_handle.attn_implementation
    with gated_attention(tiny_handle, torch.ones(g.n_layers, g.n_kv_heads)) as state:
        assert tiny_handle.attn_implementation == GATED_ATTN
        out = tiny_handle.run(ids, mask)
    assert state.calls == g.n_layers
    assert (out - ref)[mask.bool()].abs().max() < 1e-5

    def fails() -> None:
        with gated_attention(tiny_handle, torch.zeros(g.n_layers, g.n_kv_heads), POLICY, torch.tensor([3, 3])):
            tiny_handle.run(ids, mask)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fails()
    assert tiny_handle.attn_implementation == original
    assert torch.equal(tiny_handle.run(ids, mask), ref)


def test_bad_gates_refused(tiny_handle):
    with pytest.raises(ValueError, match=r"needs \[2, 2\]"), gated_attention(tiny_handle, torch.ones(3, 2)):
        pytest.fail("entering the context should have been refused")
    with pytest.raises(ValueError, match="outside"), gated_attention(tiny_handle, torch.full((2, 2), 1.5)):
        pytest.fail("entering the context should have been refused")
    with (
        gated_attention(tiny_handle, torch.ones(2, 2)),
        pytest.raises(RuntimeError, match="already installed"),
        gated_attention(tiny_handle, torch.ones(2, 2)),
    ):
        pytest.fail("entering the context should have been refused")


def test_window_changes_logits_and_padding_is_ignored(tiny_handle, batch):
    ids, mask = batch
    ref = tiny_handle.run(ids, mask)
    alpha = torch.tensor([[0.0, 1.0], [0.3, 0.0]])
    with gated_attention(tiny_handle, alpha, POLICY, prefill_lengths=torch.tensor([10, 10])) as state:
        padded = tiny_handle.run(ids, mask)
        state.prefill_lengths = torch.tensor([10])
        alone = tiny_handle.run(ids[:1, 5:])
    assert (padded[0, 5:] - alone[0]).abs().max() < 1e-5
    assert (padded - ref)[mask.bool()].abs().max() > 1e-2  # the window is felt
    # the prompt (real positions < 10) reads everything: columns 5..14 of the padded row, 0..9 of the other
    assert (padded[0, 5:15] - ref[0, 5:15]).abs().max() < 1e-5 and (padded[1, :10] - ref[1, :10]).abs().max() < 1e-5


def test_per_row_gates_equal_separate_runs(tiny_handle, batch):
    ids, _ = batch
    a1, a2 = torch.tensor([[0.0, 1.0], [1.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.5, 0.0]])
    pre = torch.tensor([8, 8])
    with gated_attention(tiny_handle, torch.stack([a1, a2]), POLICY, prefill_lengths=pre):
        both = tiny_handle.run(ids[[1, 1]])
    for row, a in enumerate((a1, a2)):
        with gated_attention(tiny_handle, a, POLICY, prefill_lengths=pre[:1]):
            assert (tiny_handle.run(ids[1:2])[0] - both[row]).abs().max() < 1e-5


def test_gates_are_differentiable(tiny_handle, batch):
    ids, mask = batch
    alpha = torch.full((2, 2), 0.5, requires_grad=True)
    with gated_attention(tiny_handle, alpha, POLICY, prefill_lengths=torch.tensor([10, 10])):
        logits = tiny_handle.run(ids, mask)
    logits[mask.bool()].logsumexp(-1).sum().backward()
    assert alpha.grad is not None and torch.isfinite(alpha.grad).all() and alpha.grad.abs().sum() > 0


def decode_steps(handle, seq, prefill, cache):
    seq = seq.to(handle.device)
    out = [handle.model(input_ids=seq[:, :prefill], use_cache=True, **cache_kwargs(handle.model, cache)).logits]
    for t in range(prefill, seq.shape[1]):
        out.append(
            handle.model(input_ids=seq[:, t : t + 1], use_cache=True, **cache_kwargs(handle.model, cache)).logits
        )
    return torch.cat(out, 1)


@pytest.mark.parametrize("prefill", ["full", "window"])
def test_physical_cache_equals_mask_simulation(tiny_handle, batch, prefill):
    ids, _ = batch
    seq, n_prefill = ids[1:2], 10
    policy = CompressionPolicy(sink=2, recent=4, prefill=prefill)
    full_mask = torch.tensor([[True, False], [False, False]])
    with torch.no_grad():
        with gated_attention(tiny_handle, full_mask.float(), policy):
            simulated = decode_steps(tiny_handle, seq, n_prefill, DynamicCache(config=tiny_handle.model.config))
        with gated_attention(tiny_handle, full_mask.float(), policy, prefill_lengths=torch.tensor([n_prefill])):
            forced = tiny_handle.run(seq)
        with compressed_cache(tiny_handle, full_mask, policy) as (cache, _):
            physical = decode_steps(tiny_handle, seq, n_prefill, cache)
            held = cache.nbytes()
        full = decode_steps(tiny_handle, seq, n_prefill, DynamicCache(config=tiny_handle.model.config))
    assert (physical - simulated).abs().max() <= 1e-4
    assert (forced - simulated).abs().max() <= 1e-4
    assert (physical - full).abs().max() > 1e-2
    head_dim = tiny_handle.geometry.head_dim
    assert held == kv_bytes(full_mask, seq.shape[1], policy, head_dim, bytes_per_value=4)
    assert held < kv_bytes(torch.ones_like(full_mask), seq.shape[1], policy, head_dim, bytes_per_value=4)


def test_physical_cache_refuses_padding_and_bad_mask(tiny_handle, batch):
    ids, mask = batch
    with (
        pytest.raises(ValueError, match=r"needs \[2, 2\]"),
        compressed_cache(tiny_handle, torch.ones(2, 3, dtype=torch.bool), POLICY),
    ):
        pytest.fail("entering the context should have been refused")
    with (
        compressed_cache(tiny_handle, torch.tensor([[True, False], [True, True]]), POLICY) as (cache, _),
        pytest.raises(ValueError, match="unpadded rows"),
    ):
        tiny_handle.model(
            input_ids=ids.to(tiny_handle.device),
            attention_mask=mask.to(tiny_handle.device),
            use_cache=True,
            **cache_kwargs(tiny_handle.model, cache),
        )


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_backends_agree(tiny_model_dir, tiny_handle, batch, backend):
    from reasonscope.models import load_model

    ids, mask = batch
    other = load_model(tiny_model_dir, backend=backend)
    alpha = torch.tensor([[0.3, 1.0], [0.0, 0.7]])
    pre = torch.tensor([10, 15])
    outs = []
    hidden = []
    for h in (tiny_handle, other):
        with gated_attention(h, alpha, POLICY, prefill_lengths=pre) as state:
            outs.append(gated_run(h, state, ids, mask))
            hidden.append(h.unembed(gated_run(h, state, ids, mask, hidden=True)))
    assert (outs[0] - outs[1])[mask.bool()].abs().max() < 1e-4
    assert max((x - outs[0])[mask.bool()].abs().max() for x in hidden) < 1e-4  # run_hidden under the gates
    assert (other.run(ids, mask) - tiny_handle.run(ids, mask))[mask.bool()].abs().max() < 1e-4


def _step_logits(handle, prompts, alpha, policy, per_request):
    """Per request, the logits of every decode step of a greedy generation under ``alpha``."""
    from reasonscope.generation import DecodeConfig, generate

    seen: dict[int, list[torch.Tensor]] = {}

    def on_token(batch, tokens, logits):
        for row, req in enumerate(batch.rows.tolist()):
            if req >= 0:
                seen.setdefault(req, []).append(logits[row])

    with gated_attention(handle, alpha, policy, per_request=per_request):
        generate(handle, prompts, DecodeConfig(max_new_tokens=20, batch_size=2), on_token=on_token)
    return [torch.stack(seen[i]) for i in range(len(prompts))]


def test_per_request_gates_in_generation_equal_separate_calls(tiny_model_dir):
    """Gate sets per request through the generation engine equal one call per gate set (on a model whose greedy
    rollouts differ between gate sets)."""
    from reasonscope.generation import DecodeConfig
    from reasonscope.heads.rollout import gated_rollouts
    from reasonscope.organisms import task

    from conftest import varied_model

    h = varied_model(tiny_model_dir)
    probs = task.problems(3, seed=3, levels=(2,))
    prompts = [h.chat_prompt(p.question) for p in probs]
    policy = CompressionPolicy(sink=2, recent=3)
    gates = torch.stack([torch.ones(2, 2), torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0]])])
    together = _step_logits(h, prompts * 3, gates.repeat_interleave(3, 0), policy, True)
    for k, a in enumerate(gates):
        alone = _step_logits(h, prompts, a, policy, False)
        for i in range(3):
            assert (alone[i] - together[3 * k + i]).abs().max() < 1e-4
    assert (together[0] - together[3]).abs().max() > 1e-3  # the window is felt
    with (
        pytest.raises(ValueError, match="per-request gates need"),
        gated_attention(h, gates[0], policy, per_request=True),
    ):
        pytest.fail("entering the context should have been refused")
    with pytest.raises(ValueError, match="per-request gates have 2 rows for the 3 requests"):
        _step_logits(h, prompts, gates[:2], policy, True)

    cfg = DecodeConfig(max_new_tokens=16, batch_size=2)
    rolled, _ = gated_rollouts(
        h,
        prompts * 2,
        gates[:2].repeat_interleave(3, 0),
        policy,
        cfg,
        golds=[str(p.answer) for p in probs] * 2,
    )
    alone, _ = gated_rollouts(h, prompts, gates[1], policy, cfg)
    assert [r.token_ids for r in alone] == [r.token_ids for r in rolled[3:]]
    assert [r.token_ids for r in rolled[:3]] != [r.token_ids for r in rolled[3:]]  # all heads windowed: other text
    assert all(r.grade is not None for r in rolled) and all(r.think_span is not None for r in rolled)
    with pytest.raises(ValueError, match="gate sets for"):
        gated_rollouts(h, prompts, gates[:2], policy, cfg)


def test_gated_generation_with_shared_prefixes_equals_unshared(tiny_handle):
    """A shared prefix's rest runs as a prompt pass that reads a cache: it is prefill (read in full), not decode."""
    from reasonscope.generation import DecodeConfig, generate
    from reasonscope.organisms import task

    ids = tiny_handle.tokenizer(tiny_handle.chat_prompt(task.problems(1, seed=5, levels=(3,))[0].question))["input_ids"]
    prompts = [ids[:n] for n in (len(ids) - 8, len(ids) - 3, len(ids))]
    assert len(prompts[0]) >= 16
    policy = CompressionPolicy(sink=2, recent=4)
    runs = []
    for share in (False, True):
        seen: dict[int, list[torch.Tensor]] = {}

        def on_token(batch, tokens, logits, seen=seen):
            for row, req in enumerate(batch.rows.tolist()):
                seen.setdefault(req, []).append(logits[row])

        with gated_attention(tiny_handle, torch.zeros(2, 2), policy):
            cfg = DecodeConfig(max_new_tokens=6, share_prefixes=share)
            generate(tiny_handle, prompts, cfg, on_token=on_token)
        runs.append([torch.stack(seen[i]) for i in range(len(prompts))])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_masked_grouped_attention_is_the_same_with_kv_repeated():
    from reasonscope.heads.gated import _sdpa

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 5, 4), torch.randn(2, 2, 7, 4), torch.randn(2, 2, 7, 4)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    torch.testing.assert_close(_sdpa(q, k, v, mask, None, repeat_kv=True), _sdpa(q, k, v, mask, None, repeat_kv=False))
