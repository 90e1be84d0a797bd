"""Head scorers, selection, ground truth, accuracy and the head-map artifact (tiny random model)."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from reasonscope.heads import (
    CompressionPolicy,
    HeadConfig,
    HeadMap,
    random_full_heads,
    read_tsv,
    score_heads,
    select_full_heads,
    uniform_full_heads,
)
from reasonscope.heads.accuracy import exhaustive_best, teacher_forced_accuracy
from reasonscope.heads.batches import trace_batches
from reasonscope.heads.retrieval import RECENT, name_reads, operand_reads, read_scores, retrieval_scores
from reasonscope.heads.rlkv import RLKVConfig, advantages, break_ties, rlkv_scores, sparsity_penalty
from reasonscope.heads.scorers import duo_scores, gate_ig_scores, gated_logits, token_kl, windowing_scores

from conftest import varied_model

POLICY = CompressionPolicy(sink=4, recent=8)
# own traces are a 30-token prompt + up to 16 generated: a windowed head keeps most of the prompt and the last 8
# tokens, which breaks the greedy reproduction of some traces but not of all
TF_POLICY = CompressionPolicy(sink=28, recent=8)


@pytest.fixture(scope="module")
def batches(tiny_handle, task_traces):
    return trace_batches(tiny_handle, task_traces, POLICY, batch_size=6)


@pytest.fixture(scope="module")
def varied(tiny_model_dir):
    """The tiny model with std-0.3 weights: its greedy text varies (the fixture's repeats one token: no thinking)."""
    return varied_model(tiny_model_dir)


@pytest.fixture(scope="module")
def own_traces(varied):
    """The varied model's own greedy rollouts (their sampled ids, up to 16 thinking tokens), marked correct (so the
    full model reproduces each exactly)."""
    from reasonscope.generation import DecodeConfig
    from reasonscope.heads.rollout import gated_rollouts
    from reasonscope.organisms import task

    probs = task.problems(6, seed=1, levels=(2,))
    prompts = [varied.chat_prompt(p.question) for p in probs]
    traces, _ = gated_rollouts(varied, prompts, torch.ones(2, 2), TF_POLICY, DecodeConfig(max_new_tokens=16))
    for t in traces:
        t.grade = True
    return traces


def test_selection_rules():
    s = torch.tensor([[0.1, 0.9], [0.5, 0.3]])
    assert select_full_heads(s, 0.5).tolist() == [[False, True], [True, False]]
    assert select_full_heads(s, 0.0).all() and not select_full_heads(s, 1.0).any()
    with pytest.raises(ValueError, match="outside"):
        select_full_heads(s, 1.5)
    tiny = torch.tensor([[1e-7, 2e-7, 3e-7, 4e-7], [5e-7, 6e-7, 7e-7, 8e-7]])  # scores of windowing-KL's size
    assert all(select_full_heads(tiny, 0.5, seed).tolist() == [[False] * 4, [True] * 4] for seed in range(8))
    tied = {tuple(select_full_heads(torch.ones(2, 4), 0.5, seed).flatten().tolist()) for seed in range(8)}
    assert len(tied) > 1 and all(sum(d) == 4 for d in tied)  # exact ties: broken at random, by the seed
    draws = {tuple(random_full_heads(4, 2, 0.5, seed).flatten().tolist()) for seed in range(6)}
    assert len(draws) > 1 and all(sum(d) == 4 for d in draws)
    assert uniform_full_heads(4, 2, 0.5).sum(-1).tolist() == [1, 1, 1, 1]
    two = torch.tensor([[0.2, 0.1]])  # half a head rounds up: 0.25 of 2 compresses 1 (round() gave 0), 0.75 of 2 2
    assert select_full_heads(two, 0.25).tolist() == [[True, False]] and not select_full_heads(two, 0.75).any()
    with pytest.raises(ValueError, match=r"NaN at .*\(0, 0\)"):
        select_full_heads(torch.tensor([[float("nan"), 1.0]]), 0.5)


def test_trace_batches_refuse_a_window_over_the_whole_trace(tiny_handle, task_traces):
    with pytest.raises(ValueError, match="covers the whole context"):
        trace_batches(tiny_handle, task_traces, CompressionPolicy(sink=16, recent=400))


def test_windowing_scores_equal_one_head_at_a_time(tiny_handle, batches):
    scores = windowing_scores(tiny_handle, batches, POLICY, heads_per_pass=3)
    assert scores.shape == (2, 2) and (scores >= 0).all() and scores.max() > 0
    batch = batches[0]
    base = gated_logits(tiny_handle, batch, torch.ones(2, 2), POLICY).detach()
    alpha = torch.ones(2, 2)
    alpha[1, 0] = 0
    kl = token_kl(base, gated_logits(tiny_handle, batch, alpha, POLICY).detach(), batch.scored)
    total = sum(int(b.scored.sum()) for b in batches)
    rest = sum(
        token_kl(base_b, gated_logits(tiny_handle, b, alpha, POLICY).detach(), b.scored).sum()
        for b, base_b in [(b, gated_logits(tiny_handle, b, torch.ones(2, 2), POLICY).detach()) for b in batches[1:]]
    )
    assert torch.isclose(scores[1, 0], (kl.sum() + rest) / total, rtol=1e-4)


def test_gate_ig_is_complete(tiny_handle, batches):
    """Σ IG ≈ KL(full ‖ all heads windowed) − 0 (Riemann sum along α: 1 → 0)."""
    scores = gate_ig_scores(tiny_handle, batches[:1], POLICY, steps=16)
    b = batches[0]
    base = gated_logits(tiny_handle, b, torch.ones(2, 2), POLICY).detach()
    end = token_kl(base, gated_logits(tiny_handle, b, torch.zeros(2, 2), POLICY).detach(), b.scored).mean()
    assert torch.isclose(scores.sum(), end, rtol=0.05)
    ce = gate_ig_scores(tiny_handle, batches[:1], POLICY, steps=2, loss="ce")
    assert ce.shape == (2, 2) and torch.isfinite(ce).all()


def test_gate_ig_weighs_every_scored_position_alike_whatever_the_passes(tiny_handle, task_traces):
    """The same traces grouped one a pass or all in one give the same scores; a pass whose traces are all inside
    the window (nothing scored) is skipped rather than failing."""
    policy = CompressionPolicy(sink=2, recent=3)
    traces = [t for t in task_traces if len(t.token_ids) > 24][:4]
    one = gate_ig_scores(tiny_handle, trace_batches(tiny_handle, traces, policy, batch_size=1), policy, steps=2)
    whole = gate_ig_scores(tiny_handle, trace_batches(tiny_handle, traces, policy, batch_size=8), policy, steps=2)
    torch.testing.assert_close(one, whole, rtol=1e-4, atol=1e-7)
    wide = CompressionPolicy(sink=2, recent=max(len(t.token_ids) for t in traces[:2]))
    mixed = trace_batches(tiny_handle, [*traces, *task_traces], wide, batch_size=1)
    assert any(not b.scored.any() for b in mixed) and any(b.scored.any() for b in mixed)
    assert torch.isfinite(gate_ig_scores(tiny_handle, mixed, wide, steps=1)).all()


def test_duo_learner_trades_kl_for_sparsity(tiny_handle, batches):
    log: list[dict] = []
    alpha = duo_scores(tiny_handle, batches, POLICY, steps=12, lr=0.05, l1=5.0, log=log)
    assert ((alpha >= 0) & (alpha <= 1)).all() and alpha.mean() < 1.0
    assert len(log) == 12 and log[-1]["alpha_mean"] < log[0]["alpha_mean"] + 1e-9


def test_duo_mse_distils_the_final_hidden_states_and_leaves_the_callers_rng(tiny_handle, batches):
    from reasonscope.heads.scorers import full_hidden, gated_hidden

    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    log: list[dict] = []
    alpha = duo_scores(tiny_handle, batches, POLICY, steps=6, lr=0.05, l1=5.0, log=log, loss="mse")
    assert torch.equal(torch.rand(3), want)  # the caller's random stream goes on where it was
    assert log[0]["mse"] == 0.0  # at α = 1 the gated model is the full one
    assert ((alpha >= 0) & (alpha <= 1)).all() and alpha.mean() < 1.0
    b = next(x for x in batches if x.scored.any())
    where = b.scored
    with torch.no_grad():
        mse = ((gated_hidden(tiny_handle, b, alpha, POLICY) - full_hidden(tiny_handle, b))[where] ** 2).mean()
    assert float(mse) > 0
    with pytest.raises(ValueError, match="'kl' or 'mse'"):
        duo_scores(tiny_handle, batches, POLICY, steps=1, loss="l2")  # type: ignore[arg-type]


def test_operand_reads_point_at_definitions(tiny_handle, task_traces):
    tok = tiny_handle.tokenizer
    t = task_traces[0]
    reads = operand_reads(t, tok)
    assert reads
    for r in reads:
        var = tok.decode([t.token_ids[r.query]]).strip()
        definition = tok.decode([t.token_ids[k] for k in r.keys]).strip()
        assert r.query >= t.think_span[0] and definition.startswith(var) and definition[len(var) :].isdigit()
    kv, per_q = retrieval_scores(tiny_handle, task_traces[:3])
    assert kv.shape == (2, 2) and per_q.shape == (2, 4)
    assert torch.equal(kv, per_q.view(2, 2, 2).amax(-1)) and ((per_q >= 0) & (per_q <= 1)).all()


def test_name_reads_point_at_the_chain(tiny_handle, task_traces):
    tok = tiny_handle.tokenizer
    for t in task_traces[:4]:
        reads = name_reads(t, tok)
        assert reads
        for r in reads:
            (key,) = r.keys
            name = tok.decode([t.token_ids[r.query + 1]]).strip()  # the query predicts the name
            assert tok.decode([t.token_ids[key]]).strip() == name and len(name) == 1
            assert r.query + 1 >= t.think_span[0] and key < r.query
            start = max(t.think_span[0], r.query + 1 - RECENT)
            before = [tok.decode([i]).strip() for i in t.token_ids[start : r.query + 1]]
            assert name not in before  # a name mentioned within RECENT tokens may be copied: not a read
    both = read_scores(tiny_handle, task_traces[:3])
    assert set(both) == {"value", "name"}
    assert torch.equal(both["value"][0], retrieval_scores(tiny_handle, task_traces[:3])[0])


def test_teacher_forced_accuracy_and_exhaustive(varied, own_traces):
    """The full model reproduces its own traces, every head windowed does not; the exhaustive best half of the heads
    is the best of every half (which differ)."""
    batches = trace_batches(varied, own_traces, TF_POLICY, batch_size=4)
    assert all(t.think_tokens > 0 for t in own_traces) and all(b.scored.any() for b in batches)
    masks = torch.stack([torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)])
    acc = teacher_forced_accuracy(varied, batches, masks, TF_POLICY)
    assert acc[0] == 1.0 and acc[1] < 1.0
    every = torch.zeros(6, 4, dtype=torch.bool)
    for i, subset in enumerate(itertools.combinations(range(4), 2)):  # exhaustive_best's order
        every[i, list(subset)] = True
    per_subset = teacher_forced_accuracy(varied, batches, every.view(6, 2, 2), TF_POLICY)
    best, best_acc = exhaustive_best(varied, batches, 0.5, TF_POLICY, chunk=2)  # here the best is past chunk one
    assert best.sum() == 2
    assert best_acc == float(per_subset.max()) > float(per_subset.min())
    assert float(teacher_forced_accuracy(varied, batches, best[None], TF_POLICY)[0]) == best_acc


def test_passes_within_the_logit_budget_give_the_same_scores(tiny_handle, batches, varied, own_traces, monkeypatch):
    """With a logit budget of one element every pass holds one row (one head's or one selection's copy of one
    trace) and Duo recomputes the full model's logits instead of keeping them: the scores do not change."""
    import reasonscope.budget as budget

    vocab = budget.vocab_size(tiny_handle)
    own = trace_batches(varied, own_traces, TF_POLICY, batch_size=4)
    draws = [select_full_heads(torch.rand(2, 2, generator=torch.Generator().manual_seed(s)), 0.5) for s in range(5)]
    masks = torch.stack([torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool), *draws])

    def run() -> list[torch.Tensor]:
        return [
            windowing_scores(tiny_handle, batches, POLICY, heads_per_pass=4),
            gate_ig_scores(tiny_handle, batches, POLICY, steps=2),
            duo_scores(tiny_handle, batches, POLICY, steps=4, lr=0.05, l1=1.0),
            teacher_forced_accuracy(varied, own, masks, TF_POLICY),
        ]

    whole = run()
    assert whole[3][0] == 1.0 and whole[3].min() < 1.0  # the selections' accuracies differ
    monkeypatch.setattr(budget, "LOGIT_BUDGET", 1)
    monkeypatch.setattr(budget, "CACHE_BUDGET", 0)
    for got, ref in zip(run(), whole):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)
    widest = max(b.input_ids.shape[1] for b in batches)
    assert [len(b.traces) for b in trace_batches(varied, own_traces, TF_POLICY, batch_size=4)] == [1] * len(own_traces)
    monkeypatch.setattr(budget, "LOGIT_BUDGET", 2 * widest * vocab)  # two of the widest rows a pass
    split = trace_batches(tiny_handle, [t for b in batches for t in b.traces], POLICY, 6)
    assert sum(len(b.traces) for b in split) == sum(len(b.traces) for b in batches)
    assert all(len(b.traces) * b.input_ids.shape[1] * vocab <= budget.LOGIT_BUDGET for b in split)
    assert max(len(b.traces) for b in split) > 2  # shorter rows share a pass


def test_rlkv_pieces():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert torch.allclose(
        advantages(r, torch.tensor([0, 0, 1, 1]), "group"), torch.tensor([1.0, -1.0, 0.0, 0.0]), atol=1e-4
    )
    assert abs(float(advantages(r, torch.zeros(4), "batch").mean())) < 1e-6
    a = torch.ones(2, 2)
    assert float(sparsity_penalty(a, 0.4, 1.0, 0.5)) == 0.0
    assert abs(float(sparsity_penalty(a, 0.8, 1.0, 0.5)) - (2.718281828**0.8 - 1)) < 1e-5
    with pytest.raises(ValueError, match="adv_norm"):
        RLKVConfig(adv_norm="token")  # type: ignore[arg-type]


def test_rlkv_runs_and_refuses_unsolved(tiny_handle, task_traces):
    with pytest.raises(ValueError, match="already solves"):
        rlkv_scores(tiny_handle, task_traces, POLICY)
    solved = list(task_traces[:4])
    for t in solved:
        t.grade = True
    log: list[dict] = []
    try:
        alpha = rlkv_scores(
            tiny_handle,
            solved,
            CompressionPolicy(sink=2, recent=4),
            RLKVConfig(steps=2, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=16),
            log=log,
        )
    finally:
        for t in solved:
            t.grade = None
    assert alpha.shape == (2, 2) and ((alpha >= 0) & (alpha <= 1)).all()
    assert [e["step"] for e in log] == [0, 1] and {"reward_mean", "reg_scaling_factor", "alpha_std"} <= set(log[0])
    assert {"mixed_groups", "mean_think_tokens", "alpha", "pressure", "seconds"} <= set(log[0])


def test_rlkv_gradient_does_not_depend_on_how_rollouts_are_batched(monkeypatch):
    """Each batch's policy-gradient term is back-propagated on its own, normalised by every batch's tokens: one
    rollout a pass (a logit budget of one element) learns the same gates (thinking organism: mixed rewards)."""
    from conftest import ORGANISMS_READY

    if not ORGANISMS_READY:
        pytest.skip("organism weights not trained (reasonscope organism train --out reasonscope/organisms/weights)")
    import reasonscope.budget as budget
    from reasonscope.models import load_model
    from reasonscope.organisms import task
    from reasonscope.traces.record import Trace

    h = load_model("organism:thinking")
    solved = [
        Trace(f"p{i}", h.chat_prompt(p.question), "", "", gold=str(p.answer), grade=True)
        for i, p in enumerate(task.problems(4, seed=3, levels=(3, 4)))
    ]
    cfg = RLKVConfig(steps=2, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=200, lr=0.1)

    def run() -> tuple[torch.Tensor, list[dict]]:
        log: list[dict] = []
        return rlkv_scores(h, solved, CompressionPolicy(sink=4, recent=8), cfg, log=log), log

    ref, ref_log = run()
    monkeypatch.setattr(budget, "LOGIT_BUDGET", 1)
    got, log = run()
    assert 0 < ref_log[0]["reward_mean"] < 1  # advantages are not all zero
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        torch.tensor(log[-1]["pressure"]), torch.tensor(ref_log[-1]["pressure"]), atol=1e-5, rtol=1e-3
    )
    assert max(abs(p) for p in ref_log[-1]["pressure"]) > 1e-4


def test_rlkv_ties_follow_the_reward_gradient():
    alpha = torch.tensor([[0.0, 0.0, 0.004], [1.0, 0.996, 0.5]])  # 0.004 and 0.996: within a step of the bound
    pressure = torch.tensor([[0.2, -0.3, 0.1], [-5.0, 1.0, 0.0]])
    out = break_ties(alpha, pressure, step=0.01)
    assert ((out >= 0) & (out <= 1)).all() and (out - alpha).abs().max() <= 0.004 + 1e-4
    assert out.flatten().argsort(descending=True).tolist() == [4, 3, 5, 0, 2, 1]
    assert break_ties(alpha, pressure, step=0.001).flatten().argsort(descending=True).tolist() == [3, 4, 5, 2, 0, 1]


def test_rlkv_grades_rollouts_with_the_traces_grader(tiny_handle, task_traces, monkeypatch):
    import reasonscope.heads.rlkv as rlkv

    used: list[str] = []
    real = rlkv.gated_rollouts

    def spy(*args):
        used.append(args[-1])
        return real(*args)

    monkeypatch.setattr(rlkv, "gated_rollouts", spy)
    solved = [dataclasses.replace(t, grade=True, meta={**t.meta, "grader": "gsm8k"}) for t in task_traces[:4]]
    cfg = RLKVConfig(steps=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4)
    rlkv_scores(tiny_handle, solved, CompressionPolicy(sink=2, recent=4), cfg)
    rlkv_scores(tiny_handle, solved, CompressionPolicy(sink=2, recent=4), cfg, grader="math")
    assert used == ["gsm8k", "math"]
    solved[0] = dataclasses.replace(solved[0], meta={**solved[0].meta, "grader": "math"})
    with pytest.raises(ValueError, match="traces of one dataset"):
        rlkv_scores(tiny_handle, solved, POLICY, cfg)


def test_rlkv_budget_and_problem_filter(tiny_handle, task_traces):
    solved = list(task_traces[:4])
    for t in solved:
        t.grade = True
    log: list[dict] = []
    try:
        with pytest.raises(ValueError, match="max_think_tokens"):
            rlkv_scores(tiny_handle, solved, POLICY, RLKVConfig(max_think_tokens=0))
        rlkv_scores(  # greedy rollouts (no sampling), stopped by the wall-time budget after the first step
            tiny_handle,
            solved,
            CompressionPolicy(sink=2, recent=4),
            RLKVConfig(
                steps=5, prompts_per_step=2, samples_per_prompt=1, temperature=0.0, max_new_tokens=8, time_budget_s=1e-6
            ),
            log=log,
        )
    finally:
        for t in solved:
            t.grade = None
    assert len(log) == 1
    with pytest.raises(ValueError, match="time_budget_s"):
        RLKVConfig(time_budget_s=0)


def test_head_map_artifact_round_trip_and_exports(tiny_handle, task_traces, tmp_path):
    cfg = HeadConfig(method="window", sink=4, recent=8, batch_size=6)
    hm = score_heads(tiny_handle, task_traces, cfg, tmp_path / "hm")
    back = HeadMap.open(tmp_path / "hm")
    assert torch.equal(back.scores, hm.scores) and back.method == "window" and back.policy == cfg.policy
    back.check_model(tiny_handle)
    back.export_tsv(tmp_path / "alpha.tsv")
    assert torch.allclose(read_tsv(tmp_path / "alpha.tsv"), hm.scores, atol=1e-6)
    back.export_full_heads_tsv(tmp_path / "full.tsv", 0.5)
    assert torch.equal(read_tsv(tmp_path / "full.tsv").bool(), hm.full_heads(0.5))
    serving = json.loads(json.dumps(back.serving_config(0.5)))
    assert sum(len(r) for r in serving["full_attention_heads"]) == 2 and serving["sink"] == 4
    with pytest.raises(FileExistsError):
        score_heads(tiny_handle, task_traces, cfg, tmp_path / "hm")
    wrong = HeadMap(torch.ones(3, 2), "window", hm.model_hash, cfg.policy)
    with pytest.raises(ValueError, match="layers x KV heads"):
        wrong.check_model(tiny_handle)
    from reasonscope.models import load_model

    with pytest.raises(ValueError, match="the hash covers the dtype"):  # the same checkpoint in bfloat16
        back.check_model(load_model(tiny_handle.source, dtype="bfloat16"))
    (tmp_path / "hm" / "scores.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="damaged"):
        HeadMap.open(tmp_path / "hm")


@pytest.mark.parametrize("method", ["gate-ig", "duo", "rlkv"])
def test_score_heads_runs_the_method_it_is_given(tiny_handle, task_traces, method, tmp_path):
    """``score_heads`` with a learned or attributed method writes that scorer's own scores, under the config's
    settings (tiny ones)."""
    from dataclasses import replace

    rl = RLKVConfig(steps=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8)
    cfg = HeadConfig(  # settings off their defaults, so one dropped on the way is seen
        method, sink=4, recent=8, batch_size=6, ig_steps=2, ig_loss="ce", duo_steps=3, duo_lr=0.1, duo_l1=1.0, rlkv=rl
    )
    solved = [replace(t, grade=True) for t in task_traces[:4]]  # RLKV trains on solved problems
    hm = score_heads(tiny_handle, solved, cfg, tmp_path / "hm")
    back = HeadMap.open(tmp_path / "hm")
    assert back.method == method and back.scores.shape == (2, 2) and torch.isfinite(back.scores).all()
    batches = trace_batches(tiny_handle, solved, cfg.policy, cfg.batch_size)
    if method == "gate-ig":
        want = gate_ig_scores(tiny_handle, batches, cfg.policy, cfg.ig_steps, cfg.ig_loss)
    elif method == "duo":
        want = duo_scores(tiny_handle, batches, cfg.policy, cfg.duo_steps, cfg.duo_lr, cfg.duo_l1)
    else:
        want = rlkv_scores(tiny_handle, solved, cfg.policy, rl)
    torch.testing.assert_close(back.scores, want.float(), rtol=1e-5, atol=1e-7)
    assert torch.equal(back.scores, hm.scores) and len(back.log) == {"gate-ig": 0, "duo": 3, "rlkv": 1}[method]


def test_bad_config_writes_nothing(tiny_handle, task_traces, tmp_path):
    with pytest.raises(ValueError, match="unknown head scoring method"):
        HeadConfig(method="magic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="covers the whole context"):
        score_heads(tiny_handle, task_traces, HeadConfig(sink=400, recent=64), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_organism_reads_operands_through_a_few_heads():
    """Thinking organism: greedy traces are reproduced at full cache, and windowing every head breaks some."""
    from conftest import ORGANISMS_READY

    if not ORGANISMS_READY:
        pytest.skip("organism weights not trained (reasonscope organism train --out reasonscope/organisms/weights)")
    from reasonscope.models import load_model
    from reasonscope.organisms import task
    from reasonscope.traces.generate import GenerationConfig, generate_traces

    h = load_model("organism:thinking")
    probs = task.problems(12, seed=7, levels=(3, 4))
    traces = generate_traces(
        h,
        [h.chat_prompt(p.question) for p in probs],
        GenerationConfig(max_new_tokens=300),
        golds=[str(p.answer) for p in probs],
        grader="organism",
    )
    policy = CompressionPolicy(sink=4, recent=12)
    batches = trace_batches(h, traces, policy)
    g = h.geometry
    masks = torch.stack(
        [
            torch.ones(g.n_layers, g.n_kv_heads, dtype=torch.bool),
            torch.zeros(g.n_layers, g.n_kv_heads, dtype=torch.bool),
        ]
    )
    acc = teacher_forced_accuracy(h, batches, masks, policy)
    assert float(acc[0]) == pytest.approx(sum(bool(t.grade) for t in traces) / len(traces))
    assert acc[1] < acc[0]
    reads = read_scores(h, traces)
    assert reads["value"][0].max() > 0.5  # some head puts most of its mass on the operand's definition
    assert reads["name"][0].max() > 0.5  # and some head on the next operand's name in the question's chain
    # the RLKV reward signal: greedy rollouts under the scaled window solve the solved problems at full gates
    # and fail some once every head is windowed (sampled rollouts loop, see the README)
    from reasonscope.generation import DecodeConfig
    from reasonscope.heads.evaluate import check_window, window_for
    from reasonscope.heads.rollout import gated_rollouts

    scaled = window_for([len(t.token_ids) - t.think_span[0] for t in traces if t.think_span is not None])
    check_window(scaled, [len(t.token_ids) - t.think_span[0] for t in traces if t.think_span is not None])
    solved = [t for t in traces if t.grade]
    decode = DecodeConfig(max_new_tokens=300, batch_size=64)
    rewards = []
    for gate in (1.0, 0.0):
        alpha = torch.full((g.n_layers, g.n_kv_heads), gate)
        rolls, _ = gated_rollouts(h, [t.prompt for t in solved], alpha, scaled, decode, [t.gold for t in solved])
        rewards.append(sum(bool(r.grade) for r in rolls) / len(rolls))
    assert rewards[0] == 1.0 and rewards[1] < 0.5, rewards


def test_token_kl_in_runs_of_positions_equals_one_piece(monkeypatch):
    """KL at a boolean mask or at listed positions, in runs within the logit budget (one position a run at one
    element): the values and the gradient of one computation over all selected positions."""
    import reasonscope.budget as budget

    g = torch.Generator().manual_seed(0)
    full, gated = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g, requires_grad=True)
    where = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 1, 1]], dtype=torch.bool)
    lp_full, lp = full[where].log_softmax(-1), gated[where].log_softmax(-1)
    want = (lp_full.exp() * (lp_full - lp)).sum(-1)
    (grad_want,) = torch.autograd.grad(want.sum(), gated)
    monkeypatch.setattr(budget, "LOGIT_BUDGET", 1)
    got = token_kl(full, gated, where)
    (grad_got,) = torch.autograd.grad(got.sum(), gated)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad_got, grad_want)
    torch.testing.assert_close(token_kl(full[0], gated[0], torch.tensor([1, 2, 4])), want[:3])


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_trace_loss_read_in_runs_has_the_value_and_gradient_of_one_piece(tiny_handle, batches, loss, monkeypatch):
    """The trace loss from hidden states a run of positions at a time (one position a run at a budget of one
    element): value and gradient w.r.t. the gates as computed from the whole logits in one piece."""
    import torch.nn.functional as F

    import reasonscope.budget as budget
    from reasonscope.heads.scorers import full_hidden, trace_loss

    b = batches[0]
    base_logits = gated_logits(tiny_handle, b, torch.ones(2, 2), POLICY).detach()
    alpha = torch.full((2, 2), 0.6, requires_grad=True)
    logits = gated_logits(tiny_handle, b, alpha, POLICY)
    if loss == "kl":
        want = token_kl(base_logits, logits, b.scored).mean()
    else:
        want = F.cross_entropy(logits[b.scored].float(), torch.roll(b.input_ids, -1, 1)[b.scored])
    (grad_want,) = torch.autograd.grad(want, alpha)
    monkeypatch.setattr(budget, "LOGIT_BUDGET", 1)
    alpha2 = alpha.detach().clone().requires_grad_(True)
    got = trace_loss(tiny_handle, b, alpha2, POLICY, loss, full_hidden(tiny_handle, b) if loss == "kl" else None)
    (grad_got,) = torch.autograd.grad(got, alpha2)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-6)
    assert grad_want.abs().sum() > 0


@pytest.mark.parametrize("epochs", [1, 2])
def test_rlkv_policy_gradient_read_in_runs_equals_one_piece(tiny_handle, batches, epochs, monkeypatch):
    """RLKV's clipped policy-gradient loss a run of positions at a time (one a run at a budget of one element): its
    value and gradient w.r.t. the gates as from the whole logits; ``old`` log-probs (PPO epochs > 1) likewise."""
    import torch.nn.functional as F

    import reasonscope.budget as budget
    from reasonscope.heads.rlkv import _token_logprobs, pg_loss

    b = batches[0]
    adv = torch.linspace(-1.0, 1.5, len(b.traces))
    alpha = torch.full((2, 2), 0.7, requires_grad=True)
    targets = torch.roll(b.input_ids, -1, 1)
    lp = F.log_softmax(gated_logits(tiny_handle, b, alpha, POLICY).float(), -1).gather(-1, targets[..., None])[..., 0]
    noise = 0.05 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(0))
    old = None if epochs == 1 else lp.detach() + noise
    ratio = (lp - (lp.detach() if old is None else old)).exp()
    a = adv[:, None]
    want = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))[b.scored].sum()
    (grad_want,) = torch.autograd.grad(want, alpha)
    monkeypatch.setattr(budget, "LOGIT_BUDGET", 1)
    alpha2 = alpha.detach().clone().requires_grad_(True)
    got = pg_loss(tiny_handle, b, alpha2, POLICY, adv, old, 0.2)
    (grad_got,) = torch.autograd.grad(got, alpha2)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-6)
    assert grad_want.abs().sum() > 0
    read = _token_logprobs(tiny_handle, b, alpha.detach(), POLICY)
    torch.testing.assert_close(read, lp.detach(), rtol=1e-5, atol=1e-5)


def test_rlkv_reads_log_probs_at_the_sampling_temperature(tiny_handle, batches):
    """Rollouts sampled at T are scored under softmax(logits / T): the on-policy ratio and gradient."""
    import torch.nn.functional as F

    from reasonscope.heads.rlkv import _token_logprobs, pg_loss

    b = batches[0]
    alpha = torch.full((2, 2), 0.7)
    targets = torch.roll(b.input_ids, -1, 1)
    logits = gated_logits(tiny_handle, b, alpha, POLICY).float()
    want = F.log_softmax(logits / 0.6, -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(_token_logprobs(tiny_handle, b, alpha, POLICY, 0.6), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_token_logprobs(tiny_handle, b, alpha, POLICY), want, atol=1e-3)
    adv = torch.ones(len(b.traces))
    got = pg_loss(tiny_handle, b, alpha.clone().requires_grad_(True), POLICY, adv, want, 0.2, 0.6)
    assert torch.isclose(got, -adv[0] * b.scored.sum().float(), rtol=1e-4)  # ratio 1 at the sampling policy
