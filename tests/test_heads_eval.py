"""``heads eval``: compressed generation sweeps, baselines, KV bytes and rank agreement (tiny model)."""

from __future__ import annotations

import pytest
import torch

from reasonscope.heads import CompressionPolicy, kv_bytes
from reasonscope.heads.accuracy import exhaustive_best
from reasonscope.heads.batches import trace_batches
from reasonscope.heads.evaluate import EvalConfig, check_window, evaluate_heads, spearman, window_for
from reasonscope.heads.rollout import gated_rollouts
from reasonscope.organisms import task

from conftest import varied_model

POLICY = CompressionPolicy(sink=2, recent=3)


@pytest.fixture(scope="module")
def varied(tiny_model_dir):
    """The tiny model with std-0.3 weights: its greedy rollouts change with the heads windowed."""
    return varied_model(tiny_model_dir, seed=4)  # its rollouts close </think> at varied lengths


@pytest.fixture(scope="module")
def problems(tiny_handle):
    probs = task.problems(4, seed=5, levels=(2,))
    return [tiny_handle.chat_prompt(p.question) for p in probs], [str(p.answer) for p in probs]


def test_spearman_and_window():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, x * 10) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0.0, 0.0, 5.0])) == pytest.approx(1.0)
    p = window_for([80, 100, 120])
    assert p.kept == round(0.125 * 100) and p.sink >= 1
    check_window(p, [80, 100, 120])
    with pytest.raises(ValueError, match="over a quarter"):
        check_window(CompressionPolicy(sink=10, recent=20), [80, 100, 120])
    with pytest.raises(ValueError, match="outside"):
        EvalConfig(sparsities=(0.5, 1.5))


def test_evaluate_curves_match_direct_generation(varied, problems):
    """Each method's row holds the metrics of its own selection's rollouts (which differ between selections)."""
    prompts, golds = problems
    g = varied.geometry
    scores = {"a": torch.tensor([[0.9, 0.1], [0.5, 0.3]]), "b": torch.tensor([[0.1, 0.9], [0.3, 0.5]])}
    retrieval = torch.tensor([[1.0, 0.0], [0.6, 0.2]])
    cfg = EvalConfig(
        sparsities=(0.0, 0.5), random_draws=3, max_new_tokens=24, batch_size=5, timing_prompts=1, timing_tokens=4
    )
    own, _ = gated_rollouts(varied, prompts, torch.ones(2, 2), POLICY, cfg_decode(cfg))
    for r in own:
        r.grade = True
    log: list[dict] = []
    names = torch.tensor([[0.1, 0.2], [0.3, 0.9]])
    res = evaluate_heads(
        varied, prompts, golds, scores, POLICY, cfg, own_traces=own, retrieval=retrieval, log=log, name_reads=names
    )
    assert set(res["curves"]) == {"a", "b", "random", "uniform", "exhaustive"}
    assert set(res["curves"]["random"]) == {"0", "0.5"} and set(res["curves"]["exhaustive"]) == {"0.5"}
    row = res["curves"]["a"]["0.5"]
    full = torch.tensor([[True, False], [True, False]])
    direct, _ = gated_rollouts(varied, prompts, full.float(), POLICY, cfg_decode(cfg), golds)
    assert [r.token_ids for r in direct] != [r.token_ids for r in own]  # the selection changes the rollouts
    assert row["accuracy"] == sum(bool(r.grade) for r in direct) / len(direct)
    assert row["mean_think_tokens"] == sum(r.think_tokens for r in direct) / len(direct)
    assert row["mean_think_tokens"] != res["curves"]["a"]["0"]["mean_think_tokens"]
    lengths = [len(r.token_ids) for r in direct]
    assert row["kv_bytes"] == pytest.approx(sum(kv_bytes(full, t, POLICY, g.head_dim, 1, 4) for t in lengths) / 4)
    assert row["achieved_sparsity"] == 0.5 and row["decode_tokens_per_s"] > 0
    assert res["curves"]["a"]["0"]["kv_bytes"] > row["kv_bytes"]
    assert res["curves"]["random"]["0.5"]["draws"] == 3 and res["curves"]["random"]["0.5"]["accuracy_sd"] >= 0
    _, best = exhaustive_best(varied, trace_batches(varied, own, POLICY), 0.5, POLICY)
    assert res["curves"]["exhaustive"]["0.5"]["teacher_forced_accuracy"] == best < 1.0  # half the heads windowed
    assert res["rank_agreement"]["a"]["b"] == pytest.approx(spearman(scores["a"], scores["b"]), abs=1e-4)
    assert res["retrieval_spearman"]["a"] == pytest.approx(1.0) and res["top_head"]["a"]["in_retrieval_top2"]
    assert res["name_reads_top2"] == ["L1H1", "L1H0"] and res["top_head"]["b"] == {
        "head": "L0H1",
        "in_retrieval_top2": False,
        "in_name_reads_top2": False,
    }
    assert res["rank_agreement"]["truth:name_reads"]["a"] == pytest.approx(spearman(names, scores["a"]), abs=1e-4)
    assert log[0]["unique_selections"] < log[0]["requests"]


def test_a_map_named_like_a_truth_keeps_its_own_agreement(varied, problems):
    """``heads score --method retrieval`` names a map "retrieval": the ground truth does not overwrite it."""
    prompts, golds = problems
    mine, truth = torch.tensor([[0.9, 0.1], [0.5, 0.3]]), torch.tensor([[0.1, 0.9], [0.3, 0.5]])
    cfg = EvalConfig(sparsities=(0.0,), random_draws=1, max_new_tokens=4, batch_size=4, timing_prompts=0)
    res = evaluate_heads(varied, prompts[:2], golds[:2], {"retrieval": mine}, POLICY, cfg, retrieval=truth)
    assert res["rank_agreement"]["retrieval"]["truth:retrieval"] == pytest.approx(spearman(mine, truth), abs=1e-4)
    assert res["retrieval_spearman"]["retrieval"] == pytest.approx(-1.0)


def test_evaluate_refuses_a_foreign_map(tiny_handle, problems):
    prompts, golds = problems
    with pytest.raises(ValueError, match="layers x KV heads"):
        evaluate_heads(tiny_handle, prompts, golds, {"x": torch.ones(3, 2)}, POLICY)
    with pytest.raises(ValueError, match="one gold per prompt"):
        evaluate_heads(tiny_handle, prompts, golds[:1], {"x": torch.ones(2, 2)}, POLICY)


def cfg_decode(cfg: EvalConfig):
    from reasonscope.generation import DecodeConfig

    return DecodeConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
