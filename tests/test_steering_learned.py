"""Learned steering vectors: the decision moves, the trust region holds, the model is left as it was."""

from __future__ import annotations

import pytest
import torch

from reasonscope.models import load_model
from steering.learned import LearnConfig, learn_vector

PROMPTS = ["a=3, b=4. what is a + b?<think>", "d=2. what is d?<think>", "e=1, f=5. what is e + f?<think>"]
TARGETS = [" first a3. b4; 3+4=7.</think>", " first d2.</think>", " first e1. f5; 1+5=6.</think>"]
SOURCES = [" let me see. a3. b4; 3+4=7.</think>", " let me see. d2.</think>", " let me see. e1. f5; 1+5=6.</think>"]


@pytest.fixture
def sharp(tiny_model_dir):
    """The tiny random model with a 30x unembedding: its near-uniform next-token distributions become peaked enough
    for a steering vector to decide between tokens (at init no logit differs from another by more than ~0.6)."""
    h = load_model(tiny_model_dir)
    with torch.no_grad():
        h.model.get_output_embeddings().weight.mul_(30)
    return h


def p_first(h, vec=None, gamma=1.0):
    """P(the targets' first token) after each prompt, steered by ``vec`` at the prompt's last token."""
    tok = h.tokenizer
    first = [tok(t, add_special_tokens=False)["input_ids"][0] for t in TARGETS]
    out = []
    for p, f in zip(PROMPTS, first):
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            if vec is None:
                logits = h.run(ids)
            else:
                with vec.apply(h, gamma=gamma):
                    logits = h.run(ids)
        out.append(float(logits[0, -1].softmax(-1)[f]))
    return torch.tensor(out)


@pytest.mark.parametrize("positions", ["prompt", "last"])
def test_learned_vector_moves_the_decision(sharp, positions):
    h = sharp
    before = p_first(h)
    weights = [q.detach().clone() for q in h.model.parameters()]
    flags = [q.requires_grad for q in h.model.parameters()]
    cfg = LearnConfig(steps=60, batch_size=3, lr=0.1, kl_weight=1.0, positions=positions)
    vec = learn_vector(h, PROMPTS, TARGETS, SOURCES, (0, 1), cfg, {"note": "test"})
    after = p_first(h, vec)  # a plain forward pass steers the last position under both rules: the decision
    assert float(after.min()) > 0.9 and bool((after > before).all())
    assert vec.layers == (0, 1) and vec.meta.positions == positions and vec.meta.gamma == 1.0
    assert vec.meta.recipe["method"] == "learned" and vec.meta.recipe["note"] == "test"
    assert vec.meta.recipe["final_p_target"] > 0.9
    assert all(torch.equal(a, b) for a, b in zip(weights, h.model.parameters()))  # the model is frozen
    assert [q.requires_grad for q in h.model.parameters()] == flags  # and left as it was


def test_the_trust_region_keeps_the_other_predictions(sharp):
    h = sharp
    free = learn_vector(h, PROMPTS, TARGETS, SOURCES, (0, 1), LearnConfig(steps=40, batch_size=3, kl_weight=0.0))
    held = learn_vector(h, PROMPTS, TARGETS, SOURCES, (0, 1), LearnConfig(steps=40, batch_size=3, kl_weight=50.0))
    assert held.meta.recipe["final_mean_kl"] < 0.5 * free.meta.recipe["final_mean_kl"]


def test_flags_are_restored_when_training_raises(tiny_model_dir, monkeypatch):
    h = load_model(tiny_model_dir)
    flags = [q.requires_grad for q in h.model.parameters()]
    assert any(flags)

    def broken(*args, **kwargs):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(h, "run", broken)
    with pytest.raises(RuntimeError, match="forward failed"):
        learn_vector(h, PROMPTS, TARGETS, SOURCES, (0,), LearnConfig(steps=2))
    assert [q.requires_grad for q in h.model.parameters()] == flags


def test_bad_input_is_refused(tiny_handle):
    h = tiny_handle
    with pytest.raises(ValueError, match="prefix"):
        learn_vector(h, PROMPTS[:1], [" first"], [" first a3."], (0,), LearnConfig(steps=1))
    with pytest.raises(ValueError, match="as many targets"):
        learn_vector(h, PROMPTS, TARGETS[:2], SOURCES, (0,), LearnConfig(steps=1))
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        learn_vector(h, PROMPTS, TARGETS, SOURCES, (7,), LearnConfig(steps=1))
    with pytest.raises(ValueError, match="positions"):
        LearnConfig(positions="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        LearnConfig(steps=0)
    with pytest.raises(ValueError, match="kl_weight"):
        LearnConfig(kl_weight=float("nan"))
    with pytest.raises(ValueError, match="micro_batch"):
        LearnConfig(micro_batch=0)


@pytest.mark.parametrize("positions", ["prompt", "last"])
def test_micro_batches_learn_the_batch_vector(sharp, positions):
    """Pairs one or two a forward pass (accumulated gradients) give the vector of the whole batch at once."""
    h = sharp
    whole = LearnConfig(steps=8, batch_size=3, lr=0.1, kl_weight=1.0, positions=positions, micro_batch=3)
    ref = learn_vector(h, PROMPTS, TARGETS, SOURCES, (0, 1), whole)
    for micro in (1, 2):
        cfg = LearnConfig(steps=8, batch_size=3, lr=0.1, kl_weight=1.0, positions=positions, micro_batch=micro)
        got = learn_vector(h, PROMPTS, TARGETS, SOURCES, (0, 1), cfg)
        torch.testing.assert_close(got.directions, ref.directions, atol=1e-5, rtol=1e-4)
        for key in ("final_p_target", "final_mean_kl"):
            assert got.meta.recipe[key] == pytest.approx(ref.meta.recipe[key], abs=1e-4)
    assert float(ref.directions.norm()) > 0.1


def test_passes_are_sized_to_the_logit_budget(sharp, monkeypatch):
    """By default a step's pairs share a forward pass while their log-probs fit LOGIT_BUDGET; a smaller budget
    splits them, and the vector stays the same."""
    import reasonscope.budget as budget
    import steering.learned as learned

    pair = ([1] * 5, [2] * 10, [3] * 12, 0)  # one pass holds rows x 17 tokens x vocab log-probs
    assert learned._parts([pair] * 4, None, 100) == [[pair] * 4]
    monkeypatch.setattr(budget, "LOGIT_BUDGET", 2 * 17 * 100)
    assert learned._parts([pair] * 5, None, 100) == [[pair] * 2, [pair] * 2, [pair]]
    assert learned._parts([pair] * 5, 3, 100) == [[pair] * 3, [pair] * 2]
    cfg = LearnConfig(steps=6, batch_size=3, lr=0.1, kl_weight=1.0)
    monkeypatch.setattr(budget, "LOGIT_BUDGET", 1)  # one pair a pass
    split = learn_vector(sharp, PROMPTS, TARGETS, SOURCES, (0, 1), cfg)
    monkeypatch.setattr(budget, "LOGIT_BUDGET", 1 << 40)
    whole = learn_vector(sharp, PROMPTS, TARGETS, SOURCES, (0, 1), cfg)
    torch.testing.assert_close(split.directions, whole.directions, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_the_backends_learn_the_same_vector(tiny_model_dir, tiny_handle, backend):
    cfg = LearnConfig(steps=5, batch_size=3)
    ref = learn_vector(tiny_handle, PROMPTS, TARGETS, SOURCES, (0, 1), cfg)
    got = learn_vector(load_model(tiny_model_dir, backend=backend), PROMPTS, TARGETS, SOURCES, (0, 1), cfg)
    assert torch.allclose(got.directions, ref.directions, atol=1e-5) and float(ref.directions.norm()) > 0.1
