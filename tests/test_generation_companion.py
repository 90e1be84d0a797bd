"""The generation engine's companion model (lockstep decoding, its own hooks) and re-runs of batch rows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_generation import encode, forced_eos_at

from reasonscope.generation import Batch, DecodeConfig, current_batch, generate

from conftest import torch_hooks, varied_model

LAYER = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def main(tiny_model_dir):
    return varied_model(tiny_model_dir)


@pytest.fixture(scope="module")
def other(tiny_model_dir):
    """Another model on the same tokenizer (other weights, eager attention: its own mask kind)."""
    return varied_model(tiny_model_dir, attn="eager", seed=1)


def cfg(**kw) -> DecodeConfig:
    return DecodeConfig(**{"max_new_tokens": 10, "batch_size": 3, "refill": 1, **kw})


def record_companion(seen: dict):
    def on_token(batch, tokens, logits):
        for row, (r, n) in enumerate(zip(batch.rows.tolist(), batch.n_generated.tolist())):
            if r >= 0:
                seen[(r, n)] = batch.companion_logits[row].clone()

    return on_token


def assert_companion_reads(seen: dict, out, handle) -> None:
    """Every step's companion logits = a plain forward of ``handle`` over the request's sequence."""
    for r, c in enumerate(out):
        ref = handle.run(torch.tensor([c.prompt_ids + c.token_ids[:-1]]))[0].float()
        got = torch.stack([seen[(r, n)] for n in range(len(c.token_ids))])
        torch.testing.assert_close(got, ref[len(c.prompt_ids) - 1 :], rtol=1e-4, atol=1e-4)


def test_companion_logits_equal_the_companion_alone(main, other):
    prompts = encode(main)
    lengths = {0: 3, 2: 7, 4: 2}  # rows end at different steps: refills and the final compaction
    force = forced_eos_at(lengths, main.tokenizer.eos_token_id)
    seen: dict = {}

    def on_token(batch, tokens, logits):
        record_companion(seen)(batch, tokens, logits)
        return force(batch, tokens, logits)

    out = generate(main, prompts, cfg(), on_token=on_token, companion=other)
    plain = generate(main, prompts, cfg(), on_token=force)
    assert [c.token_ids for c in out] == [c.token_ids for c in plain]  # the companion only reads
    assert_companion_reads(seen, out, other)
    alone = generate(other, prompts, cfg(), on_token=force)
    assert any(a.token_ids != c.token_ids for a, c in zip(alone, out))  # it follows the model, not itself


def test_hooks_run_on_their_own_model_only(main):
    """The companion may be the model itself: each hook still fires in its own model's passes only."""
    prompts = encode(main)[:3]
    v = torch.randn(main.geometry.d_model, generator=torch.Generator().manual_seed(0)) * 20
    passes, reads = [], []
    seen: dict = {}

    def on_token(batch, tokens, logits):
        passes.append(batch.prefill)
        record_companion(seen)(batch, tokens, logits)

    def steer(x):
        return x + v.to(x.device)

    out = generate(
        main,
        prompts,
        cfg(),
        hooks={LAYER: steer},
        on_token=on_token,
        companion=main,
        companion_hooks={LAYER: lambda x: reads.append(current_batch().prefill)},
    )
    steered = generate(main, prompts, cfg(), hooks={LAYER: steer})
    assert [c.token_ids for c in out] == [c.token_ids for c in steered]
    assert reads == passes  # once per pass, not in the model's pass too
    assert_companion_reads(seen, out, main)  # the companion pass is unsteered


def test_rerun_with_unchanged_state_changes_nothing(main, other):
    prompts = encode(main)
    force = forced_eos_at({1: 4, 3: 6}, main.tokenizer.eos_token_id)
    inside: list[tuple[list[int], bool]] = []
    checked = []

    def hook(x):
        b = current_batch()
        inside.append((b.rows.tolist(), b.prefill))

    def on_token(batch, tokens, logits):
        assert batch.rerun(torch.tensor([], dtype=torch.long)).shape == (0, logits.shape[1])
        idx = (batch.rows >= 0).nonzero()[:, 0][::2]
        inside.clear()
        again = batch.rerun(idx)
        assert inside == [(batch.rows[idx].tolist(), batch.prefill)]  # hooks see the sub-batch
        torch.testing.assert_close(again, logits[idx], rtol=1e-5, atol=1e-5)
        checked.append(batch.prefill)
        return force(batch, tokens, logits)

    plain = generate(main, prompts, cfg(), on_token=force)
    for companion in (None, other):
        out = generate(main, prompts, cfg(), hooks={LAYER: hook}, on_token=on_token, companion=companion)
        assert [c.token_ids for c in out] == [c.token_ids for c in plain]
    assert True in checked and False in checked


def steer_once(handle, prompts, at: dict[int, int], batch_size: int, rerun: bool, companion=None):
    """Steer request ``r`` on the pass that chooses its token ``at[r]`` (0: the prefill, whole prompt), either
    in that pass (``rerun=False``) or by re-running its row from ``on_token`` and emitting the re-run's greedy
    token. Returns the tokens and each request's logits ``[steps, vocab]`` (the re-run's where steered).
    """
    n = len(prompts)
    v = torch.randn(handle.geometry.d_model, generator=torch.Generator().manual_seed(2)) * 5
    when = torch.tensor([at.get(r, -1) for r in range(n)] + [-1])  # index -1 (idle rows): never
    gamma = torch.zeros(n + 1)
    seen: dict[tuple[int, int], torch.Tensor] = {}

    def hook(x):
        b = current_batch()
        rows = b.rows.cpu()
        g = gamma[rows] if rerun else (b.n_generated.cpu() == when[rows]).float()
        return x + (g.view(-1, 1, 1) * v).to(x.device)

    def on_token(batch, tokens, logits):
        rows = batch.rows.cpu()
        idx = ((batch.n_generated.cpu() == when[rows]) & (rows >= 0)).nonzero()[:, 0]
        if rerun and len(idx):
            gamma[rows[idx]] = 1.0
            try:
                steered = batch.rerun(idx.to(batch.rows.device))
            finally:
                gamma.zero_()
            logits, tokens = logits.clone(), tokens.clone()
            logits[idx.to(logits.device)], tokens[idx.to(tokens.device)] = steered, steered.argmax(-1)
        for row, (r, k) in enumerate(zip(batch.rows.tolist(), batch.n_generated.tolist())):
            if r >= 0:
                seen[(r, k)] = logits[row]
        return tokens

    c = DecodeConfig(max_new_tokens=8, batch_size=batch_size, refill=1)
    out = generate(handle, prompts, c, hooks={LAYER: hook}, on_token=on_token, companion=companion)
    tokens = [o.token_ids for o in out]
    return tokens, [torch.stack([seen[(r, k)] for k in range(len(t))]) for r, t in enumerate(tokens)]


def test_rerun_keeps_the_steered_keys_and_values(main, other):
    """A re-run row's keys and values replace the first run's: later tokens read the steered position."""
    prompts = encode(main)
    at = {0: 2, 1: 0, 2: 5, 4: 1}
    ref, ref_logits = steer_once(main, prompts, at, 3, rerun=False)
    assert ref != [c.token_ids for c in generate(main, prompts, DecodeConfig(max_new_tokens=8))]
    alone = [steer_once(main, [p], {0: at.get(i, -1)}, 1, rerun=True) for i, p in enumerate(prompts)]
    runs = [
        steer_once(main, prompts, at, 3, rerun=True),
        steer_once(main, prompts, at, 3, rerun=True, companion=other),
        ([t[0] for t, _ in alone], [lg[0] for _, lg in alone]),
    ]
    for tokens, logits in runs:
        assert tokens == ref
        for got, want in zip(logits, ref_logits):  # every later step reads the steered keys and values
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_rerun_only_inside_its_on_token(main):
    kept: list[Batch] = []

    def on_token(batch, tokens, logits):
        kept.append(batch)
        if len(kept) == 2:
            with pytest.raises(RuntimeError, match="its own pass"):
                kept[0].rerun(torch.tensor([0]))

    generate(main, encode(main)[:2], cfg(max_new_tokens=3), on_token=on_token)
    with pytest.raises(RuntimeError, match="its own pass"):
        kept[-1].rerun(torch.tensor([0]))
    with pytest.raises(RuntimeError, match="on_token"):
        Batch(torch.zeros(1), torch.zeros(1, 1), torch.zeros(1), False, 1).rerun(torch.tensor([0]))


def test_hooks_removed_when_on_token_raises(main, other):
    before = torch_hooks(main.model), torch_hooks(other.model)

    def on_token(batch, tokens, logits):
        if not batch.prefill:
            batch.rerun(torch.tensor([0]))
            raise RuntimeError("boom in on_token")

    with pytest.raises(RuntimeError, match="boom in on_token"):
        generate(
            main,
            encode(main)[:2],
            cfg(),
            hooks={LAYER: lambda x: None},
            on_token=on_token,
            companion=other,
            companion_hooks={"blocks.1.hook_resid_post": lambda x: None},
        )
    assert (torch_hooks(main.model), torch_hooks(other.model)) == before and current_batch() is None


def test_companion_must_share_tokens_and_device(main):
    prompts = encode(main)[:1]
    small = SimpleNamespace(tokenizer=[0] * 7, device=main.device)
    with pytest.raises(ValueError, match="share the model's tokenizer"):
        generate(main, prompts, companion=small)
    elsewhere = SimpleNamespace(tokenizer=main.tokenizer, device=torch.device("meta"))
    with pytest.raises(ValueError, match="load both on one device"):
        generate(main, prompts, companion=elsewhere)
    with pytest.raises(ValueError, match="without a companion"):
        generate(main, prompts, companion_hooks={LAYER: lambda x: None})


def shared_prompts(handle) -> list[list[int]]:
    """Prompts that share prefixes: cuts of two greedy sequences with a suffix, a duplicate, and short singletons."""
    heads = encode(handle)[:2]
    out: list[list[int]] = []
    for c in generate(handle, heads, DecodeConfig(max_new_tokens=24)):
        seq = c.prompt_ids + c.token_ids
        out += [seq[:cut] + seq[:2] for cut in range(len(c.prompt_ids) - 2, len(seq), 5)]
    return [*out, out[1], *encode(handle)[2:]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefixes_give_the_same_tokens_and_logits(main, other, temperature):
    """Computing a group's common prefix once changes nothing: tokens (greedy or sampled), logits and companion
    logits as unshared."""
    from reasonscope.generation import SHARED_MIN, _prefix_groups

    prompts = shared_prompts(main)
    groups = _prefix_groups(prompts, SHARED_MIN)
    assert any(len(g) > 3 for g in groups) and any(len(g) == 1 for g in groups)
    runs = {}
    for share in (False, True):
        mine: dict = {}
        seen: dict = {}

        def on_token(batch, tokens, logits, mine=mine, seen=seen):
            record_companion(seen)(batch, tokens, logits)
            for row, (r, n) in enumerate(zip(batch.rows.tolist(), batch.n_generated.tolist())):
                if r >= 0:
                    mine[(r, n)] = logits[row].clone()

        c = cfg(share_prefixes=share, max_new_tokens=6, temperature=temperature)
        out = generate(main, prompts, c, on_token=on_token, companion=other)
        runs[share] = ([c.token_ids for c in out], mine, seen)
    assert runs[True][0] == runs[False][0]
    for key, want in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(runs[True][2][key], runs[False][2][key], rtol=1e-4, atol=1e-5)


def test_shared_prefixes_are_computed_once(main):
    """The prefill passes read each group's root prompt once and every other prompt's own tokens only."""
    prompts = shared_prompts(main)
    read: dict[bool, int] = {}
    for share in (False, True):
        tokens = []

        def count(x, tokens=tokens):
            b = current_batch()
            if b.prefill:
                tokens.append(int((b.positions >= 0).sum()))

        generate(main, prompts, cfg(share_prefixes=share, max_new_tokens=2), hooks={LAYER: count})
        read[share] = sum(tokens)
    assert read[False] == sum(map(len, prompts))
    from reasonscope.generation import SHARED_MIN, _common, _prefix_groups

    want = 0
    for g in _prefix_groups(prompts, SHARED_MIN):
        root = prompts[g[0]]
        want += (
            len(root)
            if len(g) == 1
            else len(root) + sum(len(prompts[i]) - min(_common(prompts[i], root), len(prompts[i]) - 1) for i in g)
        )
    assert read[True] == want < read[False] // 2


def test_an_extend_pass_can_be_re_run(main):
    """Re-running a prefill of shared-prefix rows rewrites their tails' keys where the first run wrote them."""
    prompts = shared_prompts(main)
    plain = generate(main, prompts, cfg(share_prefixes=True))

    def rerun_prefills(batch, tokens, logits):
        if batch.prefill:
            again = batch.rerun(torch.arange(len(batch.rows)))
            torch.testing.assert_close(again, logits, rtol=1e-4, atol=1e-5)

    again = generate(main, prompts, cfg(share_prefixes=True), on_token=rerun_prefills, hooks={LAYER: lambda x: None})
    assert [c.token_ids for c in again] == [c.token_ids for c in plain]


def test_prefix_groups_join_the_root_sharing_half_of_a_prompt():
    from reasonscope.generation import _prefix_groups

    a, b = list(range(10)), list(range(10, 20))
    prompts = [a + [1], b, a + [2, 3], a[:3], b + [5], a + [1]]
    assert _prefix_groups(prompts, 10) == [[2, 0, 5], [4, 1], [3]]
    assert _prefix_groups(prompts, 11) == [[2], [0, 5], [4], [1], [3]]
    c = list(range(30))
    halves = [c + [1] * 40, c[:20] + [9] * 30, c + [2] * 20]  # 20 of 50 tokens shared: a root; 30 of 50: joins
    assert _prefix_groups(halves, 16) == [[0, 2], [1]]
