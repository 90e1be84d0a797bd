"""Emergent heads: head-output attribution, emergence, and ablation/scaling validation (tiny model)."""

from __future__ import annotations

import pytest
import torch

from reasonscope.heads.emergent import (
    _scale_hooks,
    emergence,
    head_attribution,
    random_heads,
    style_texts,
    top_heads,
    validate_heads,
)
from reasonscope.heads.scorers import token_kl
from reasonscope.organisms import task

from conftest import varied_model


@pytest.fixture(scope="module")
def texts(tiny_handle):
    tok = tiny_handle.tokenizer
    p = task.problems(2, seed=2, levels=(2,))
    out = []
    for q in p:
        prompt = tiny_handle.chat_prompt(q.question)
        out.append(
            style_texts(
                tiny_handle,
                prompt,
                tok("a3; 3+4=7.", add_special_tokens=False)["input_ids"],
                tok(str(q.answer), add_special_tokens=False)["input_ids"],
            )
        )
    return out


def test_style_texts_score_the_continuation(tiny_handle, texts):
    think, direct = texts[0]
    start, end = tiny_handle.think_ids
    first = think.positions[0]
    assert think.token_ids[first] == start and direct.token_ids[direct.positions[0]] == end
    assert think.positions[-1] == len(think.token_ids) - 2
    with pytest.raises(ValueError, match="opening <think>"):
        style_texts(tiny_handle, "no think here", [1], [2])


def test_style_texts_take_r1s_prompt_that_ends_in_a_newline_after_think(r1_tiny_dir):
    from reasonscope.models import load_model

    h = load_model(r1_tiny_dir)
    prompt = h.chat_prompt("what is 2 + 3?", thinking=True)
    assert prompt.endswith("<think>\n")
    think, direct = style_texts(h, prompt, [17, 18], [19])
    n = len(h.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert think.positions == [n - 1, n] and direct.token_ids[n] == h.think_ids[1]


def test_head_attribution_is_complete(tiny_handle, texts):
    """Σ IG ≈ KL(clean ‖ every head output zeroed) (Riemann sum along s: 1 → 0)."""
    g = tiny_handle.geometry
    t = texts[0][0]
    scores = head_attribution(tiny_handle, [t], steps=16)
    assert scores.shape == (g.n_layers, g.n_heads)
    ids = torch.tensor([t.token_ids])
    with torch.no_grad():
        clean = tiny_handle.run(ids)[0]
        zero = tiny_handle.run(ids, hooks=_scale_hooks(torch.zeros(g.n_layers, g.n_heads)))[0]
    end = token_kl(clean, zero, torch.tensor(t.positions)).mean()
    assert torch.isclose(scores.sum(), end, rtol=0.05)


def test_emergence_and_head_picks():
    base, post = torch.tensor([[0.5, 0.1], [0.2, 0.2]]), torch.tensor([[0.1, 0.5], [0.2, 0.2]])
    e = emergence(base, post)
    assert e[0, 1] > 0.6 and e[0, 0] < -0.6 and e[1, 0].abs() < 1e-5
    assert top_heads(post - base, 1) == [(0, 1)]
    r = random_heads(2, 2, 2, seed=0, exclude=[(0, 1)])
    assert len(r) == 2 and (0, 1) not in r and len(set(r)) == 2


def test_validate_heads_arms(tiny_model_dir):
    """Each arm generates under its own scales: ablating a head changes the rollouts, scaling it by 1 does not (a
    model whose greedy text varies, so the arms can differ)."""
    h = varied_model(tiny_model_dir, seed=4)  # its rollouts close </think> at varied lengths
    probs = task.problems(3, seed=4, levels=(2,))
    prompts = [h.chat_prompt(p.question) for p in probs]
    golds = [str(p.answer) for p in probs]
    res = validate_heads(h, prompts, golds, [(0, 0)], factors=(0.0, 1.0), random_draws=2, max_new_tokens=24)
    assert set(res) == {"none", "heads@0", "random@0", "heads@1", "random@1"}
    assert res["heads@1"] == {**res["none"], "draws": 1} and res["random@1"]["draws"] == 2
    assert res["heads@0"]["mean_think_tokens"] != res["none"]["mean_think_tokens"]
    with pytest.raises(ValueError, match="outside this model"):
        validate_heads(h, prompts, golds, [(5, 0)])
