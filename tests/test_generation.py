"""The generation engine: equal to HF ``generate``, batching-invariant, seeded, stoppable, forceable, hookable."""

from __future__ import annotations

import pytest
import torch

from reasonscope.generation import DecodeConfig, SlotCache, current_batch, generate, sample, uniform

from conftest import grad_modes, organisms, torch_hooks, varied_model

QUESTIONS = [
    "given a3, b4, c1, d9. what is a + b - c + d?",
    "given e2. what is e?",
    "given f1, g5. what is f + g?",
    "given h7, i2, j4. what is h - i + j?",
    "given k0. what is k?",
]


@pytest.fixture(scope="module")
def varied(tiny_model_dir):
    return varied_model(tiny_model_dir)


def encode(handle, questions=QUESTIONS) -> list[list[int]]:
    return [handle.tokenizer(handle.chat_prompt(q), add_special_tokens=False)["input_ids"] for q in questions]


def hf_greedy(handle, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF ``generate`` on one unpadded prompt, cut after the first EOS."""
    eos = handle.tokenizer.eos_token_id
    out = handle.model.generate(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=int),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=handle.tokenizer.pad_token_id,
    )[0, len(prompt) :].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def forced_eos_at(lengths: dict[int, int], eos: int):
    """An ``on_token`` callback ending request ``i`` after ``lengths[i]`` tokens."""

    def on_token(batch, tokens, logits):
        limit = torch.tensor([lengths.get(r, 10**9) for r in batch.rows.tolist()], device=tokens.device)
        return torch.where(batch.n_generated + 1 >= limit, torch.full_like(tokens, eos), tokens)

    return on_token


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_equals_hf_generate(tiny_model_dir, attn):
    h = varied_model(tiny_model_dir, attn)
    prompts = encode(h)
    out = generate(h, prompts, DecodeConfig(max_new_tokens=24, batch_size=2, refill=1))
    for p, c in zip(prompts, out):
        assert c.prompt_ids == p and c.token_ids == hf_greedy(h, p, 24)
        assert c.finish_reason == ("eos" if c.token_ids[-1] == h.tokenizer.eos_token_id else "length")
    assert len({tuple(c.token_ids) for c in out}) == len(prompts) and len(set(out[0].token_ids)) > 10


def test_continuous_batching_equals_one_by_one(varied):
    prompts = encode(varied) * 2  # 10 requests through 3 slots, ending at different steps
    lengths = {i: 3 + (7 * i) % 11 for i in range(len(prompts))}
    eos = varied.tokenizer.eos_token_id
    batched = generate(
        varied,
        prompts,
        DecodeConfig(max_new_tokens=16, batch_size=3, refill=1),
        on_token=forced_eos_at(lengths, eos),
    )
    for i, p in enumerate(prompts):
        alone = generate(varied, [p], DecodeConfig(max_new_tokens=16), on_token=forced_eos_at({0: lengths[i]}, eos))
        assert batched[i].token_ids == alone[0].token_ids
        assert len(batched[i].token_ids) == min(lengths[i], 16) or batched[i].token_ids[-1] == eos


def test_decode_steps_read_each_row_group_s_own_key_span(varied, monkeypatch):
    """SDPA decode steps sort slots by length and attend per row group over its own span: same tokens as one span
    for all rows, fewer keys read, and the model's attention implementation restored afterwards."""
    import transformers.integrations.sdpa_attention as hf_sdpa

    from reasonscope import generation

    prompts = encode(varied) * 4  # 20 requests of 5 prompt lengths through 8 slots, ending at different steps
    lengths = {i: 2 + (17 * i) % 60 for i in range(len(prompts))}
    eos = varied.tokenizer.eos_token_id
    cfg = DecodeConfig(max_new_tokens=64, batch_size=8, refill=2)
    calls: list[tuple[int, int]] = []
    real = hf_sdpa.sdpa_attention_forward

    def spy(module, query, key, value, mask, **kwargs):
        if query.shape[2] == 1:
            calls.append((query.shape[0], key.shape[2]))
        return real(module, query, key, value, mask, **kwargs)

    monkeypatch.setattr(hf_sdpa, "sdpa_attention_forward", spy)

    def keys_read() -> tuple[list[list[int]], int]:
        calls.clear()
        out = generate(varied, prompts, cfg, on_token=forced_eos_at(lengths, eos))
        return [c.token_ids for c in out], sum(rows * span for rows, span in calls)

    grouped, read = keys_read()
    assert varied.model.config._attn_implementation == "sdpa"
    with monkeypatch.context() as m:
        m.setattr(generation._Engine, "unsorted", property(lambda self: False, lambda self, v: None), raising=False)
        unsorted, read_unsorted = keys_read()  # groups of slots in admission order
    monkeypatch.setattr(generation, "SPAN_GROUPS", 1)
    whole, read_whole = keys_read()
    assert grouped == unsorted == whole
    assert read < 0.9 * read_unsorted < 0.9 * read_whole, (read, read_unsorted, read_whole)


def test_span_groups_split_rows_into_runs_with_their_longest_span():
    from reasonscope.generation import _span_groups

    assert _span_groups([9, 7, 4, 4, 1, 1], 3) == ((0, 2, 9), (2, 4, 4), (4, 6, 1))
    assert _span_groups([5, 5, 5, 2], 2) == ((0, 4, 5),)  # equal spans merge
    assert _span_groups([3, 8, 2, 1, 1], 2) == ((0, 3, 8), (3, 5, 1))


def test_row_groups_are_a_cpu_path(tiny_model_dir):
    """Grouped key spans run on CPU only (one SDPA call is faster on CUDA); the meta device stands in for a GPU."""
    from reasonscope.generation import SLICED_SDPA, _sliced

    cpu = varied_model(tiny_model_dir).model
    with _sliced(cpu) as sliced:
        assert sliced and cpu.config._attn_implementation == SLICED_SDPA
    assert cpu.config._attn_implementation == "sdpa"
    elsewhere = cpu.to("meta")
    with _sliced(elsewhere) as sliced:
        assert not sliced and elsewhere.config._attn_implementation == "sdpa"


def test_slot_cache_grows_by_doubling_and_keeps_its_contents():
    cache = SlotCache(slots=2, capacity=100)
    cache.reserve(5)
    cache.prefill(torch.tensor([1, 0]))
    k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    cache.update(k, v, 0)
    assert cache.keys[0].shape == (2, 3, 5, 4)
    for asked, size in [(5, 5), (6, 10), (70, 70), (90, 100), (100, 100)]:
        cache.reserve(asked)
        assert cache.size == size and cache.keys[0].shape[2] == size and cache.values[0].shape[2] == size
    assert torch.equal(cache.keys[0][[1, 0], :, :5], k) and torch.equal(cache.values[0][[1, 0], :, :5], v)
    assert not cache.keys[0][:, :, 5:].any()
    with pytest.raises(ValueError, match="capacity 100"):
        cache.reserve(101)


def test_kv_memory_follows_the_longest_sequence(varied, monkeypatch):
    """Rows that stop early leave the cache at their length (rounded up by doubling), not at max_new_tokens."""
    sizes = []
    reserve = SlotCache.reserve

    def spy(self, length):
        reserve(self, length)
        sizes.append(self.size)

    monkeypatch.setattr(SlotCache, "reserve", spy)
    prompts = encode(varied)
    eos = varied.tokenizer.eos_token_id
    cfg = DecodeConfig(max_new_tokens=400, batch_size=3, refill=1)
    out = generate(varied, prompts, cfg, on_token=forced_eos_at(dict.fromkeys(range(len(prompts)), 4), eos))
    longest = max(len(c.prompt_ids) + len(c.token_ids) for c in out)
    assert all(len(c.token_ids) <= 4 for c in out)
    assert max(sizes) < 2 * longest < max(map(len, prompts)) + 400


def test_activations_during_generation_equal_a_plain_forward(varied):
    """Every token's residual stream in the slot cache (left-padded prefill groups, refills) = a plain forward."""
    prompts = encode(varied)
    name = "blocks.1.hook_resid_post"
    seen: dict[tuple[int, int], torch.Tensor] = {}

    def record(x):
        b = current_batch()
        for row, (r, pos) in enumerate(zip(b.rows.tolist(), b.positions.tolist())):
            for col, p in enumerate(pos):
                if r >= 0 and p >= 0:
                    seen[(r, p)] = x[row, col].clone()

    out = generate(
        varied,
        prompts,
        DecodeConfig(max_new_tokens=12, batch_size=3, refill=2),
        hooks={name: record},
        on_token=forced_eos_at({1: 4, 3: 9}, varied.tokenizer.eos_token_id),
    )
    for r, c in enumerate(out):
        ids = c.prompt_ids + c.token_ids[:-1]  # the last token is chosen, never fed
        ref: dict[str, torch.Tensor] = {}
        varied.run(torch.tensor([ids]), hooks={name: lambda x, ref=ref: ref.update(x=x[0].clone())})
        assert all((r, p) in seen for p in range(len(ids))) and (r, len(ids)) not in seen
        got = torch.stack([seen[(r, p)] for p in range(len(ids))])
        torch.testing.assert_close(got, ref["x"], rtol=1e-4, atol=1e-5)


def test_plain_calls_skip_autograd_and_kept_activations_stay_usable_in_it(tiny_handle, monkeypatch):
    """A call nothing can look into runs under inference_mode; with a hook on the model, what it keeps can still
    enter autograd (e.g. a probe trained on it)."""
    h = tiny_handle
    modes = grad_modes(h.model, monkeypatch)
    cfg = DecodeConfig(max_new_tokens=3)
    plain = generate(h, QUESTIONS[:2], cfg)
    assert modes and all(modes)
    modes.clear()
    kept: list[torch.Tensor] = []
    handle = h.model.model.layers[0].register_forward_hook(
        lambda m, a, out: kept.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        hooked = generate(h, QUESTIONS[:2], cfg)
    finally:
        handle.remove()
    assert modes and not any(modes) and [c.token_ids for c in hooked] == [c.token_ids for c in plain]
    w = torch.ones(kept[0].shape[-1], requires_grad=True, device=kept[0].device)
    (kept[0] @ w).sum().backward()
    assert w.grad is not None


def test_text_prompts_and_empty_prompt(tiny_handle):
    text = [tiny_handle.chat_prompt(q) for q in QUESTIONS[:2]]
    assert [c.token_ids for c in generate(tiny_handle, text, DecodeConfig(max_new_tokens=5))] == [
        c.token_ids for c in generate(tiny_handle, encode(tiny_handle, QUESTIONS[:2]), DecodeConfig(max_new_tokens=5))
    ]
    with pytest.raises(ValueError, match="empty prompt"):
        generate(tiny_handle, [[]])
    for flat in (text[0], [1, 2, 3], torch.tensor([1, 2, 3])):  # one prompt not wrapped in a list
        with pytest.raises(TypeError, match="wrap it in a list"):
            generate(tiny_handle, flat)  # type: ignore[arg-type]
    (c,) = generate(tiny_handle, torch.tensor([[1, 2, 3]]), DecodeConfig(max_new_tokens=2))
    assert c.prompt_ids == [1, 2, 3] and all(type(t) is int for t in c.prompt_ids)


def test_decode_config_checks_its_fields():
    assert DecodeConfig(stop="</think>").stop == ("</think>",)  # one string is one stop string, not its characters
    assert DecodeConfig(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]
    for bad, message in [
        (dict(stop=("",)), "non-empty strings"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(prefill_tokens=0), "prefill_tokens must be >= 1"),
        (dict(refill=0), "refill must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            DecodeConfig(**bad)  # type: ignore[arg-type]


def test_generate_takes_hook_patterns(varied):
    """``hooks`` names may be patterns, as in ``ModelHandle.run``."""
    prompts = encode(varied)[:2]
    cfg = DecodeConfig(max_new_tokens=6)
    v = torch.randn(varied.geometry.d_model, generator=torch.Generator().manual_seed(1)) * 5
    names = {f"blocks.{i}.hook_resid_post": (lambda x: x + v) for i in range(varied.geometry.n_layers)}
    want = [c.token_ids for c in generate(varied, prompts, cfg, hooks=names)]
    assert want != [c.token_ids for c in generate(varied, prompts, cfg)]
    for pattern in ("blocks.*.hook_resid_post", "hook_resid_post"):
        assert [c.token_ids for c in generate(varied, prompts, cfg, hooks={pattern: lambda x: x + v})] == want


def test_sampling_is_seeded_and_batching_invariant(varied):
    prompts = encode(varied)[:2] * 3
    cfg = DecodeConfig(max_new_tokens=12, temperature=1.0, seed=5, batch_size=4)
    one = [c.token_ids for c in generate(varied, prompts, cfg)]
    assert one == [c.token_ids for c in generate(varied, prompts, cfg)]
    single = DecodeConfig(**{**cfg.__dict__, "batch_size": 1})
    assert one == [c.token_ids for c in generate(varied, prompts, single)]
    assert len({tuple(t) for t in one}) > 2  # identical prompts, different requests: different samples
    assert one != [c.token_ids for c in generate(varied, prompts, DecodeConfig(**{**cfg.__dict__, "seed": 6}))]
    nucleus = DecodeConfig(max_new_tokens=12, temperature=1.0, top_p=1e-6)  # keeps only the most likely token
    greedy = DecodeConfig(max_new_tokens=12)
    assert [c.token_ids for c in generate(varied, prompts, nucleus)] == [
        c.token_ids for c in generate(varied, prompts, greedy)
    ]


def test_streams_name_each_request_s_random_draws(varied):
    """``streams``: swapped keys swap the samples; a continuation from a prefix with ``start`` = its length draws
    what the full run drew after that prefix."""
    prompt = encode(varied)[0]
    cfg = DecodeConfig(max_new_tokens=12, temperature=1.0, seed=3, eos_token_ids=(-1,))
    a, b = (c.token_ids for c in generate(varied, [prompt, prompt], cfg))
    assert a != b
    swapped = [c.token_ids for c in generate(varied, [prompt, prompt], cfg, streams=[(1, 0), (0, 0)])]
    assert swapped == [b, a]
    rest = DecodeConfig(**{**cfg.__dict__, "max_new_tokens": 7})
    (tail,) = generate(varied, [prompt + a[:5]], rest, streams=[(0, 5)])
    assert tail.token_ids == a[5:]
    with pytest.raises(ValueError, match="one \\(key, start\\) per prompt"):
        generate(varied, [prompt], cfg, streams=[(0, 0), (1, 0)])


def test_sample_follows_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    tokens = sample(probs.log().expand(1000, 4), 1.0, 1.0, u)
    assert torch.bincount(tokens, minlength=4).tolist() == [500, 0, 300, 200]
    top = sample(probs.log().expand(1000, 4), 1.0, 0.7, u)  # nucleus {0, 2}: mass 0.8 >= 0.7
    assert torch.bincount(top, minlength=4).tolist() == [625, 0, 375, 0]
    top_u = torch.tensor([1 - 2**-53], dtype=torch.float64)  # rounds to 1.0 in float32
    assert sample(probs.log()[None], 1.0, 1.0, top_u).item() == 3  # the last token of positive probability
    assert sample(torch.tensor([[5.0, 4.0, -float("inf")]]), 1.0, 1.0, top_u).item() == 1
    assert sample(probs.log()[None], 1.0, 0.7, top_u).item() == 2  # inside the nucleus {0, 2}
    draws = [uniform(0, r, s) for r in range(50) for s in range(50)]
    assert all(0 <= x < 1 for x in draws) and len(set(draws)) == len(draws) and 0.45 < sum(draws) / 2500 < 0.55


def test_stop_strings(varied):
    tok = varied.tokenizer
    prompts = encode(varied)[:3]
    full = generate(varied, prompts, DecodeConfig(max_new_tokens=20))
    ids = full[0].token_ids
    k = next(k for k in range(4, 16) if tok.decode(ids[k : k + 2]).isascii() and len(tok.decode(ids[k : k + 2])) > 2)
    stop = tok.decode(ids[k : k + 2])  # a string the first request writes by its (k+2)th token
    stopped = generate(varied, prompts, DecodeConfig(max_new_tokens=20, stop=(stop,)))
    got = stopped[0].token_ids
    assert stopped[0].finish_reason == "stop" and stop in tok.decode(got) and stop not in tok.decode(got[:-1])
    assert got == ids[: len(got)] and len(got) <= k + 2
    for f, s in zip(full[1:], stopped[1:]):  # other rows stop only where they write it too
        assert (stop in tok.decode(f.token_ids)) == (s.finish_reason == "stop")
        assert s.token_ids == f.token_ids[: len(s.token_ids)]


def test_forced_tokens(varied):
    end = varied.think_ids[1]
    prompts = encode(varied)[:3]
    cfg = DecodeConfig(max_new_tokens=10, batch_size=3)

    def force_end(batch, tokens, logits):  # a monitor closing the thinking of request 1 at its 4th token
        hit = (batch.rows == 1) & (batch.n_generated == 3)
        return torch.where(hit, torch.full_like(tokens, end), tokens)

    plain = generate(varied, prompts, cfg)
    forced = generate(varied, prompts, cfg, on_token=force_end)
    assert forced[0].token_ids == plain[0].token_ids and forced[2].token_ids == plain[2].token_ids
    head = plain[1].token_ids[:3] + [end]
    assert forced[1].token_ids[:4] == head
    assert forced[1].token_ids == head + hf_greedy(varied, prompts[1] + head, 6)  # decoding goes on from it


def test_hooks_act_during_decoding_with_per_row_state(varied):
    prompts = encode(varied)[:3]
    cfg = DecodeConfig(max_new_tokens=10, batch_size=2, refill=1)
    plain = generate(varied, prompts, cfg)
    d = varied.geometry.d_model
    v = torch.randn(d, generator=torch.Generator().manual_seed(0)) * 20
    gamma = torch.tensor([0.0, 1.0, 0.0])  # steer request 1 only
    seen = []

    def steer(x):
        b = current_batch()
        seen.append(b.prefill)
        if b.prefill:
            return None  # decoding only: the prompt is read unsteered
        return x + gamma.to(x.device)[b.rows].view(-1, 1, 1) * v.to(x.device)

    steered = generate(varied, prompts, cfg, hooks={"blocks.0.hook_resid_post": steer})
    assert True in seen and False in seen and current_batch() is None
    assert steered[0].token_ids == plain[0].token_ids and steered[2].token_ids == plain[2].token_ids
    assert steered[1].token_ids[0] == plain[1].token_ids[0]  # the first token comes from the prefill
    assert steered[1].token_ids != plain[1].token_ids


def test_hooks_removed_after_an_exception(tiny_handle):
    calls = []
    hooks_before = torch_hooks(tiny_handle.model)

    def boom(x):
        calls.append(current_batch().prefill)
        if not calls[-1]:
            raise RuntimeError("boom in decode")

    with pytest.raises(RuntimeError, match="boom in decode"):
        generate(
            tiny_handle,
            encode(tiny_handle)[:2],
            DecodeConfig(max_new_tokens=5),
            hooks={"blocks.1.hook_resid_post": boom},
        )
    assert calls == [True, False] and current_batch() is None
    assert torch_hooks(tiny_handle.model) == hooks_before
    assert tiny_handle.model.config._attn_implementation == tiny_handle.attn_implementation == "sdpa"
    assert generate(tiny_handle, encode(tiny_handle)[:1], DecodeConfig(max_new_tokens=3))[0].token_ids


def test_unsupported_attention_names_the_fix(tiny_model_dir):
    from reasonscope.models import load_model

    h = load_model(tiny_model_dir)
    h.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        generate(h, encode(h)[:1])
    h.model.config._attn_implementation = "sdpa"
    h.model.config.layer_types = ["sliding_attention"] * h.geometry.n_layers
    with pytest.raises(ValueError, match="use_sliding_window=False"):
        generate(h, encode(h)[:1])


@organisms
def test_organism_greedy_equals_hf_generate():
    from reasonscope.models import load_model
    from reasonscope.organisms import evaluate, task

    h = load_model("organism:thinking")
    tok = h.tokenizer
    prompts = [
        tok(h.chat_prompt(p.question), add_special_tokens=False)["input_ids"]
        for p in task.problems(30, evaluate.EVAL_SEED)
    ]
    out = generate(h, prompts, DecodeConfig(max_new_tokens=640, batch_size=8))
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    ref = h.model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=640,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )[:, width:].tolist()
    ref = [r[: r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r for r in ref]
    same = sum(c.token_ids == r for c, r in zip(out, ref))
    assert same >= 29, f"{same}/30 equal to HF generate"
    assert any(c.finish_reason == "eos" for c in out) and len({len(c.token_ids) for c in out}) > 5


def test_an_unpadded_prefill_leaves_the_causal_mask_to_the_model(varied, monkeypatch):
    """Prompts of one length prefill without a ``[rows, T, T]`` mask (SDPA runs causal, as HF's own forward does);
    padded ones get the 4D mask; both give the one-by-one tokens (``test_continuous_batching_equals_one_by_one``)."""
    masks: list[object] = []
    forward = type(varied.model).forward

    def spy(self, *args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            masks.append(kwargs["attention_mask"])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(varied.model), "forward", spy)
    a, b = encode(varied)[:2]
    assert len(a) != len(b)
    generate(varied, [a, a[:]], DecodeConfig(max_new_tokens=2))
    assert masks == [None]
    generate(varied, [a, b], DecodeConfig(max_new_tokens=2))
    assert isinstance(masks[1], torch.Tensor) and masks[1].shape == (2, 1, max(len(a), len(b)), max(len(a), len(b)))


def test_key_positions_realign_attention_patterns_of_a_batch(tiny_model_dir):
    """``Batch.key_positions`` maps a pattern's key columns to sequence positions, so each request's attention read
    during batched generation (left padding, refills, shared prefixes) equals its one-by-one pattern."""
    h = varied_model(tiny_model_dir, attn="eager")
    prompts = encode(h)[:3]
    prompts.append(prompts[0] + prompts[1][-20:])  # shares the first prompt's tokens
    n_new = 4

    def read(cfg: DecodeConfig, ps: list[list[int]], on_token=None) -> dict[tuple[int, int], torch.Tensor]:
        got: dict[tuple[int, int], torch.Tensor] = {}

        def hook(p: torch.Tensor) -> None:
            b = current_batch()
            keys = b.key_positions()
            for i, r in enumerate(b.rows.tolist()):
                if r < 0:  # an idle row has no real key
                    idle.append(bool((keys[i] == -1).all()))
                    continue
                for q in range(p.shape[2]):
                    at = int(b.positions[i, q])
                    if at >= 0:
                        real = keys[i] >= 0
                        row = torch.zeros(int(keys[i].max()) + 1)
                        row[keys[i][real]] = p[i, :, q][:, real].sum(0)  # heads summed: one vector per query
                        assert not row[at + 1 :].any()  # causal: no later position
                        got[r, at] = row[: at + 1]

        generate(h, ps, cfg, hooks={"blocks.1.attn.hook_pattern": hook}, on_token=on_token)
        return got

    idle: list[bool] = []
    alone: dict[tuple[int, int], torch.Tensor] = {}
    for r, p in enumerate(prompts):
        alone |= {(r, at): v for (_, at), v in read(DecodeConfig(max_new_tokens=n_new), [p]).items()}
    for cfg in (
        DecodeConfig(max_new_tokens=n_new, batch_size=4),
        DecodeConfig(max_new_tokens=n_new, batch_size=2, refill=1),
        DecodeConfig(max_new_tokens=n_new, batch_size=4, share_prefixes=True),
    ):
        batched = read(cfg, prompts)
        shared = cfg.share_prefixes  # a member's shared prompt tokens are seen once, in its root's pass
        assert batched.keys() >= {(r, at) for r, at in alone if not shared or at >= len(prompts[r])}, cfg
        for k, v in batched.items():
            assert torch.allclose(v, alone[k], atol=1e-5), (cfg, k)
    eos = h.tokenizer.eos_token_id

    def end_some(b, tokens, logits):  # a third of the requests end at their first token: their rows go idle
        return torch.where((b.rows % 3 == 0) & (b.rows >= 0), torch.full_like(tokens, eos), tokens)

    read(DecodeConfig(max_new_tokens=n_new, batch_size=16), encode(h)[:4] * 4, on_token=end_some)
    assert idle and all(idle)


def test_a_prefill_after_decode_steps_starts_at_position_zero():
    """A refill's prefill follows decode steps; the cache then reports 0 seen tokens and asks for no offset, which is
    what HF's mask builder reads for an unpadded prefill (transformers 5.9 from ``get_seq_length``, later releases
    from ``get_query_offset`` and ``get_mask_sizes``)."""
    cache = SlotCache(slots=2, capacity=64)
    cache.reserve(16)
    cache.decode(torch.tensor([9, 11]), 12)
    assert cache.get_seq_length() == 12
    with pytest.raises(RuntimeError, match="only a prefill"):
        cache.get_mask_sizes(1)
    cache.prefill(torch.tensor([1]))
    assert cache.get_seq_length() == 0 and cache.get_query_offset() == 0 and cache.get_mask_sizes(7) == (7, 0)


def test_organism_bf16_greedy_equals_unbatched_hf_generate_up_to_near_ties():
    """bf16: a padded row's prefill runs SDPA's masked kernel and an unpadded one its causal kernel, so two logits
    one bf16 step apart can swap; all but a near-tie or two must match HF ``generate`` on the lone prompt."""
    from reasonscope.models import load_model
    from reasonscope.organisms import evaluate, task

    h = load_model("organism:thinking", dtype="bf16")
    tok = h.tokenizer
    prompts = [
        tok(h.chat_prompt(p.question), add_special_tokens=False)["input_ids"]
        for p in task.problems(24, evaluate.EVAL_SEED)
    ]
    out = generate(h, prompts, DecodeConfig(max_new_tokens=96, batch_size=8, refill=1))
    same = sum(c.token_ids == hf_greedy(h, p, 96) for p, c in zip(prompts, out))
    assert h.model.dtype == torch.bfloat16 and same >= 22, f"{same}/24 equal to HF generate"
