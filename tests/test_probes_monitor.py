"""Online monitor on the generation engine: tiny random model (fast) and the thinking organism end to end (slow)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from test_probes import synthetic

from probes import monitor
from probes.fit import ProbeConfig, fit_probes
from probes.labels import LabelConfig, label_traces
from probes.monitor import (
    MonitorConfig,
    Outcome,
    choose,
    point_key,
    record,
    replay,
    run_monitor,
    summarize,
    sweep,
    token_sets,
)
from reasonscope.capture import CaptureConfig, capture
from reasonscope.traces import split_sentences

from conftest import organisms


@pytest.fixture(scope="module")
def tiny_probes(tiny_handle, task_traces, tmp_path_factory):
    return _fit(tiny_handle, task_traces, tmp_path_factory.mktemp("probes"))


@pytest.fixture(scope="module")
def varied(tiny_model_dir, task_traces, tmp_path_factory):
    """A tiny model whose greedy text varies (the fixture's repeats one token), with probes fitted on it."""
    from conftest import varied_model

    h = varied_model(tiny_model_dir)
    return h, _fit(h, task_traces, tmp_path_factory.mktemp("varied"))


def _fit(handle, task_traces, d):
    table = label_traces(task_traces, LabelConfig(matcher="organism"), d / "labels", tokenizer=handle.tokenizer)
    store = capture(handle, task_traces, CaptureConfig(hooks="hook_resid_post", positions="segment_ends"), d / "store")
    # block 1 alone: this random model's block-0 probe saturates (its scores are 0 or 1: nothing to compare)
    cfg = ProbeConfig(
        target="after_first_correct",
        hooks="blocks.1.hook_resid_post",
        epochs=2,
        bootstrap=0,
        test_fraction=0.25,
        val_fraction=0.25,
    )
    return fit_probes(store, table, cfg, d / "p")


def _prompts(handle, n=6):
    from reasonscope.organisms import task

    ps = task.problems(n, seed=3)
    return [handle.chat_prompt(p.question) for p in ps], [str(p.answer) for p in ps]


def _free(handle, prompts, n, temperature=0.0, seed=0):
    from reasonscope.generation import DecodeConfig, generate

    ids = [handle.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    cfg = DecodeConfig(max_new_tokens=n, batch_size=4, temperature=temperature, seed=seed)
    return [c.token_ids for c in generate(handle, ids, cfg)]


def _boundary(handle, ids, start: int = 2) -> str:
    """A random model writes no sentence ends: a boundary character this run writes, the last one of a token (from
    index ``start`` on) that a token opening with whitespace follows."""
    tok = handle.tokenizer
    for i in range(start, len(ids) - 1):
        text = tok.decode([ids[i]]).rstrip(" ")
        if text and tok.decode([ids[i + 1]])[:1].isspace():
            return text[-1]
    raise AssertionError("the run writes no token that whitespace follows")


def test_token_sets_read_a_period_as_an_end_only_before_whitespace(r1_tiny_dir):
    """``.`` ends a segment before whitespace, as split_sentences reads it: not in ``1.5``; a token that carries its
    own newline ends one by itself."""
    from reasonscope.models import load_model

    h = load_model(r1_tiny_dir)
    tok = h.tokenizer
    boundary, opens, _ = token_sets(h)
    text = "x = 1.5, so 5! = 120. Next.\nDone"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ends = [
        i for i in range(len(ids) - 1) if int(boundary[ids[i]]) == 2 or (boundary[ids[i]] == 1 and opens[ids[i + 1]])
    ]
    want = ["x = 1.5, so 5!", "x = 1.5, so 5! = 120.", "x = 1.5, so 5! = 120. Next.\n"]
    assert [tok.decode(ids[: i + 1]) for i in ends] == want
    assert [text[:b] for _, b in split_sentences(text, 0)][:2] == want[:2]  # the offline segmentation agrees


def test_probe_policy_exits_at_boundaries(tiny_handle, tiny_probes):
    prompts, golds = _prompts(tiny_handle)
    free = _free(tiny_handle, prompts, 24, temperature=1.0, seed=5)
    base = MonitorConfig(
        max_new_tokens=24,
        batch_size=4,
        boundaries=(_boundary(tiny_handle, free[0]),),
        min_think=3,
        temperature=1.0,
        seed=5,
    )
    boundary, opens, _ = token_sets(tiny_handle, base.boundaries)

    def ends(ids: list[int], i: int) -> bool:  # token i ends a segment, given the token after it
        return int(boundary[ids[i]]) == 2 or (int(boundary[ids[i]]) == 1 and bool(opens[ids[i + 1]]))

    ref = run_monitor(tiny_handle, prompts, golds, base)
    assert [o.think_tokens for o in ref] == [len(c) for c in free]  # never closes </think> on its own
    never = run_monitor(tiny_handle, prompts, golds, replace(base, policy="probe", threshold=2.0), tiny_probes)
    assert [o.think_tokens for o in never] == [o.think_tokens for o in ref] and not any(o.exited for o in never)
    always = run_monitor(tiny_handle, prompts, golds, replace(base, policy="probe", threshold=0.0), tiny_probes)
    assert always[0].exited
    for o, ids in zip(always, free):
        # the first boundary token at index >= min_think - 1 is followed by a forced </think>
        first = next((i for i in range(base.min_think - 1, len(ids) - 1) if ends(ids, i)), None)
        assert o.exited == (first is not None)
        if first is not None:
            assert o.think_tokens == first + 1
    two = run_monitor(
        tiny_handle, prompts, golds, replace(base, policy="probe", threshold=0.0, consecutive=2), tiny_probes
    )
    for o, ids in zip(two, free):
        hits = [i for i in range(base.min_think - 1, len(ids) - 1) if ends(ids, i)]
        assert o.exited == (len(hits) >= 2)
        if len(hits) >= 2:
            assert o.think_tokens == hits[1] + 1


def test_deviation_policy_and_sweep(tiny_handle):
    prompts, golds = _prompts(tiny_handle, 4)
    free = _free(tiny_handle, prompts, 20, temperature=1.0, seed=5)
    boundaries = (_boundary(tiny_handle, free[0], 3),)
    base = MonitorConfig(max_new_tokens=20, batch_size=4, window=2, boundaries=boundaries, temperature=1.0, seed=5)
    res = sweep(tiny_handle, prompts, golds, {"deviation": [1e9, 0.0]}, base)
    assert set(res) == {"none", "deviation@1e+09", "deviation@0"}
    assert res["deviation@1e+09"] == res["none"] and res["none"]["saved_fraction"] == 0.0
    assert res["deviation@0"]["exited"] > 0 and res["deviation@0"]["saved_fraction"] > 0
    assert set(res["none"]) >= {"accuracy", "think_tokens", "saved_fraction"}


def test_online_deviation_index_equals_the_offline_one(tiny_handle):
    """The index the monitor reads at a boundary = :func:`probes.entropy.deviation_index` of the finished sequence
    (entropies from the first thinking token's prediction on) at that token."""
    import torch

    from probes.entropy import deviation_index, entropy

    prompts, golds = _prompts(tiny_handle, 3)
    free = _free(tiny_handle, prompts, 16, temperature=1.0, seed=5)
    boundaries = (_boundary(tiny_handle, free[0], 3),)
    cfg = MonitorConfig(max_new_tokens=16, batch_size=4, window=3, boundaries=boundaries, temperature=1.0, seed=5)
    rec = record(tiny_handle, prompts, golds, cfg)
    assert any(rec.events["deviation"])
    for q, events in enumerate(rec.events["deviation"]):
        ids = rec.prompts[q] + rec.tokens[q]
        with torch.no_grad():
            h = entropy(tiny_handle.run(torch.tensor([ids]))[0])
        start = len(rec.prompts[q])  # the first thinking token
        offline = deviation_index(h, start, cfg.window)
        for step, value in events:
            assert value == pytest.approx(float(offline[start + step - 1]), rel=1e-4)


def test_online_probe_score_equals_the_offline_one(tiny_handle, tiny_probes):
    """The probe score the monitor reads at a boundary = the fitted probe on the finished sequence's activation at
    that token (its best hook, ``run_with_cache``), and the scores vary (a constant reading would pass the rest)."""
    import torch

    prompts, golds = _prompts(tiny_handle, 3)
    free = _free(tiny_handle, prompts, 16, temperature=1.0, seed=5)
    boundaries = (_boundary(tiny_handle, free[0]),)
    cfg = MonitorConfig(max_new_tokens=16, batch_size=4, boundaries=boundaries, temperature=1.0, seed=5)
    rec = record(tiny_handle, prompts, golds, cfg, tiny_probes)
    values = [v for events in rec.events["probe"] for _, v in events]
    assert len(values) >= 3 and max(values) > 2 * min(values) > 0  # scores vary (this tiny probe's are small)
    hook = tiny_probes.best_hook
    for q, events in enumerate(rec.events["probe"]):
        ids = rec.prompts[q] + rec.tokens[q]
        with torch.no_grad():
            acts = tiny_handle.run_with_cache(torch.tensor([ids]), None, hook)[hook][0].float()
        start = len(rec.prompts[q])
        for step, value in events:
            assert value == pytest.approx(float(tiny_probes.predict(acts[start + step - 1])), rel=1e-3, abs=0)


@pytest.mark.parametrize(("temperature", "grader"), [(0.0, "organism"), (1.0, "organism"), (1.0, "gsm8k")])
def test_replay_equals_live_runs(tiny_handle, tiny_probes, varied, monkeypatch, temperature, grader):
    """Every policy@threshold replayed from one recorded reference run = the live run of that policy; for a math
    grader a forced exit writes the boxed answer lead and DEER's trial reads inside the thinking."""
    handle, probes = (tiny_handle, tiny_probes) if temperature else varied  # greedy needs text that varies
    prompts, golds = _prompts(handle)
    free = _free(handle, prompts, 24, temperature, seed=5)
    boundary = _boundary(handle, free[0])
    cue = handle.tokenizer.decode([free[1][4]]).strip().strip(",.").lower()
    monkeypatch.setattr(monitor, "CUE_WORDS", (cue,))  # the random model writes no "wait": make one of its tokens a cue
    base = MonitorConfig(
        max_new_tokens=24,
        batch_size=4,
        window=2,
        boundaries=(boundary,),
        min_think=2,
        temperature=temperature,
        seed=5,
        grader=grader,
    )
    rec = record(handle, prompts, golds, base, probes)
    assert any(rec.events["probe"]) and any(rec.events["deviation"]) and any(rec.events["deer"])
    thresholds = {"probe": [0.0, 0.5, 2.0], "deviation": [0.0, 1.0, 1e9], "deer": [-1.0, 0.5, 2.0]}
    got = replay(handle, rec, thresholds)
    assert set(got) == {f"{p}@{v:g}" for p, vs in thresholds.items() for v in vs}
    assert any(o.exited for o in got["probe@0"]) and not any(o.exited for o in got["probe@2"])
    for key, outcomes in got.items():
        policy, t = key.split("@")
        cfg = replace(base, policy=policy, threshold=float(t))
        assert outcomes == run_monitor(handle, prompts, golds, cfg, probes), key
    never, first = (sum(o.trial_tokens for o in got[k]) for k in ("deer@2", "deer@-1"))
    assert never >= first > 0  # trials cost tokens: every cue's when it never exits, up to the first when it does
    assert all(o.trial_tokens == 0 for k in got if not k.startswith("deer") for o in got[k])
    lead = "**Final Answer**" if grader == "gsm8k" else ""
    room = base.max_new_tokens - 1 - len(handle.tokenizer(lead)["input_ids"])  # "</think>" and the lead's words fit
    fits = [o for o in got["probe@0"] if o.exited and o.think_tokens <= room]
    assert fits and all(o.answer.startswith(lead) for o in fits)
    two = replace(base, consecutive=2)
    rec2 = record(handle, prompts, golds, two, probes)
    live = run_monitor(handle, prompts, golds, replace(two, policy="probe", threshold=0.0), probes)
    assert replay(handle, rec2, {"probe": [0.0]})["probe@0"] == live


def test_point_keys_are_exact():
    assert [point_key("probe", t) for t in (0.9, 0, 1e9, 0.5)] == ["probe@0.9", "probe@0", "probe@1e+09", "probe@0.5"]
    near = (0.1234561, 0.1234564)  # equal to six digits: two points, each key reading back as its threshold
    keys = [point_key("deer", t) for t in near]
    assert len(set(keys)) == 2 and [float(k.split("@")[1]) for k in keys] == list(near)


def test_choose_threshold_within_loss():
    pts = {
        "none": {"accuracy": 0.80, "saved_fraction": 0.0},
        "probe@0.5": {"accuracy": 0.70, "saved_fraction": 0.6},
        "probe@0.9": {"accuracy": 0.795, "saved_fraction": 0.3},
        "probe@0.95": {"accuracy": 0.80, "saved_fraction": 0.2},
        "deer@0.9": {"accuracy": 0.5, "saved_fraction": 0.5},
    }
    best = choose(pts, max_loss=0.01)
    assert set(best) == {"probe"} and best["probe"]["threshold"] == 0.9
    assert choose(pts, max_loss=0.0)["probe"]["threshold"] == 0.95


def test_choose_keeps_a_margin_of_standard_errors_on_the_loss():
    """0.9 loses 0.5 points ± 0.6 (one-sided 95% bound 1.5 > 1): only the point estimate keeps it."""
    pts = {
        "none": {"accuracy": 0.80, "saved_fraction": 0.0, "loss_se": 0.0},
        "probe@0.9": {"accuracy": 0.795, "saved_fraction": 0.4, "loss_se": 0.006},
        "probe@0.95": {"accuracy": 0.80, "saved_fraction": 0.2, "loss_se": 0.003},
    }
    assert choose(pts, max_loss=0.01)["probe"]["threshold"] == 0.95
    assert choose(pts, max_loss=0.01, z=0.0)["probe"]["threshold"] == 0.9
    with pytest.raises(ValueError, match="z must be >= 0"):
        choose(pts, z=-1.0)


def test_cli_margin_default_is_the_monitor_s():
    """`probe monitor --loss-z` spells LOSS_Z out (the CLI imports torch only when a command runs): no drift."""
    import inspect

    from probes.cli import monitor_cmd

    assert inspect.signature(monitor_cmd).parameters["loss_z"].default.default == monitor.LOSS_Z


def test_summary_loss_se_is_the_paired_standard_error():
    ref = [Outcome(think_tokens=10, exited=False, answer="", correct=c) for c in (True, True, False, True)]
    out = [Outcome(think_tokens=5, exited=True, answer="", correct=c) for c in (False, True, True, True)]
    # paired drops 1, 0, -1, 0: mean 0, sample variance 2/3
    r = summarize(out, ref)
    assert r["accuracy"] == 0.75 and r["saved_fraction"] == 0.5
    assert r["loss_se"] == pytest.approx(math.sqrt((2 / 3) / 4))
    assert summarize(ref, ref)["loss_se"] == 0.0


def test_monitor_refuses_probes_of_another_model(tiny_handle, tmp_path):
    store, table = synthetic(tmp_path, n_problems=12)
    ps = fit_probes(store, table, ProbeConfig(epochs=1, bootstrap=0), tmp_path / "p")
    prompts, golds = _prompts(tiny_handle, 2)
    with pytest.raises(ValueError, match="width"):
        run_monitor(tiny_handle, prompts, golds, MonitorConfig(policy="probe"), ps)
    with pytest.raises(ValueError, match="needs fitted probes"):
        run_monitor(tiny_handle, prompts, golds, MonitorConfig(policy="probe"))
    with pytest.raises(ValueError, match="policy"):
        MonitorConfig(policy="sometimes")  # type: ignore[arg-type]


@organisms
def test_organism_end_to_end(tmp_path):
    """Sampled traces -> labels (forced answers) -> capture -> probes -> monitor, on the thinking organism."""
    from reasonscope.models import load_model
    from reasonscope.organisms import task
    from reasonscope.organisms.evaluate import EvalConfig, organism_traces

    h = load_model("organism:thinking")
    traces = organism_traces(h, task.problems(160, seed=123), 1.0, EvalConfig(batch_size=64), seed=7)
    traces = [t for t in traces if t.think_span and t.thinking.strip()]
    cfg = LabelConfig(matcher="organism", forced=True, forced_max_new_tokens=3, entropy=True)
    table = label_traces(traces, cfg, tmp_path / "labels", handle=h)
    summary = table.summary()
    assert summary["first_correct_share"]["n"] > 0.4 * len(traces)
    assert {"safe_exit", "stable"} <= set(summary["targets"])
    store = capture(h, traces, CaptureConfig(hooks="hook_resid_post", positions="segment_ends"), tmp_path / "store")
    fit = ProbeConfig(target="correct", lr=3e-3, batch_size=256, bootstrap=50)
    ps = fit_probes(store, table, fit, tmp_path / "p")
    best = ps.report["best"]
    assert best["auroc"] > 0.75 and best["auroc"] > ps.report["baselines"]["bag_of_words"]["auroc"]
    assert {"position", "bag_of_words", "entropy", "surprise", "question"} == set(ps.report["baselines"])
    # the question alone scores every chunk of a problem alike: it ranks problems, not chunks within one
    assert ps.report["baselines"]["question"]["auroc_within_problem"] == pytest.approx(0.5)
    over = fit_probes(store, table, replace(fit, target="after_first_correct"), tmp_path / "o")
    assert over.report["best"]["auroc_within_problem"] > 0.9 and over.report["best"]["selectivity"] > 0
    ev = task.problems(40, seed=999)
    prompts, golds = [h.chat_prompt(p.question) for p in ev], [str(p.answer) for p in ev]
    mcfg = MonitorConfig(batch_size=40, temperature=1.0)  # sampled: greedy thinking is concise, nothing to cut
    res = sweep(h, prompts, golds, {"probe": [0.5, 1.5], "deer": [0.9]}, mcfg, over)
    assert res["probe@1.5"] == res["none"]
    assert res["probe@0.5"]["saved_fraction"] > 0 and res["probe@0.5"]["exited"] > 0
