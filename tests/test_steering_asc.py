"""ASC: the KL-bounded strength (closed form, erratum, estimates on a model) and the end-to-end run."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from reasonscope.models import load_model
from reasonscope.organisms import task
from reasonscope.organisms.evaluate import EVAL_SEED
from steering.asc import (
    SELECT_SEED,
    ASCConfig,
    Pair,
    _best,
    _cubic_root,
    _first_token,
    asc_gamma_max,
    asc_pairs,
    efficiency_pairs,
    estimate_a_l,
    kl_bound,
    kl_gamma,
    measured_kl,
    read_pairs,
    run_asc,
    selection_problems,
)
from steering.extract import extract_vector
from steering.questions import Question, organism_questions
from steering.vector import SteeringVector, VectorMeta

from conftest import organisms


def test_cubic_root_where_cardano_fails():
    for beta in (1e-12, 1e-6, 1e-3, 0.1, 4 / 27 - 1e-9, 1.0, 50.0, 1e6):
        x = _cubic_root(beta)
        assert x > 0 and abs(x**3 + x * x - beta) <= 1e-12 * max(1.0, beta)
        real = [r.real for r in np.roots([1, 1, 0, -beta]) if abs(r.imag) < 1e-9 and r.real > 0]
        assert x == pytest.approx(real[0], rel=1e-9)
    beta = 1e-3  # the paper's Cardano form: Δ = β²/4 − β/27 < 0, a square root of a negative number
    assert beta**2 / 4 - beta / 27 < 0


def test_gamma_max_keeps_the_bound_on_a_grid():
    grid = [10.0**k for k in range(-3, 5)]
    for a, lip, eps in itertools.product(grid, [10.0**k for k in range(-6, 5)], [1e-5, 1e-3, 1e-1]):
        g = asc_gamma_max(a, lip, eps)
        assert g >= 0 and kl_bound(a, lip, g) <= eps * (1 + 1e-9), (a, lip, eps)
    assert asc_gamma_max(2.0, 0.0, 1e-3) == pytest.approx(2 * math.sqrt(1e-3) / 2.0)  # L -> 0
    assert asc_gamma_max(0.0, 4.0, 1e-3) == pytest.approx((16e-3) ** 0.25 / 2.0)  # a = 0
    # beta = 4εL²/a⁴ past float range: its limits (L's term alone, or a's)
    assert asc_gamma_max(1.0, 1e200, 1e-3) == pytest.approx((16e-3) ** 0.25 / 1e100)
    assert asc_gamma_max(1e-200, 1.0, 1e-3) == pytest.approx((16e-3) ** 0.25)
    assert asc_gamma_max(1e200, 1.0, 1e-3) == pytest.approx(2 * math.sqrt(1e-3) / 1e200)
    with pytest.raises(ValueError, match="a = L = 0"):
        asc_gamma_max(0.0, 0.0)
    with pytest.raises(ValueError, match="epsilon"):
        asc_gamma_max(1.0, 1.0, 0.0)


def test_estimates_match_autograd_and_the_kl_stays_within_budget(tiny_model_dir):
    h = load_model(tiny_model_dir, attn_implementation="eager")  # forward-mode AD through eager attention
    texts = ["a=3, b=4, c=1. what is a + b - c?", "d=2. what is d?", "e=1, f=5. what is e + f?"]
    torch.manual_seed(0)
    v = torch.randn(h.geometry.d_model)
    est = estimate_a_l(h, texts, 0, v)
    unit = v / v.norm()
    enc = h.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def logits(t: torch.Tensor) -> torch.Tensor:
        def hook(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[:, -1] = x[:, -1] + t * unit.to(x)
            return x

        return h.run(enc["input_ids"], enc["attention_mask"], hooks={"blocks.0.hook_resid_post": hook})[:, -1]

    _, jv = torch.func.jvp(logits, (torch.zeros(()),), (torch.ones(()),))
    assert est["a"] == pytest.approx(float(jv.detach().norm(dim=-1).median()), rel=1e-2)
    vec = SteeringVector(v[None], VectorMeta(d_model=h.geometry.d_model, layers=(0,)))
    res = kl_gamma(h, vec, texts, 0, 1e-3)
    assert res["gamma"] == pytest.approx(res["gamma_unit"] / float(v.norm()))
    assert res["bound"] <= 1e-3 * (1 + 1e-9) and res["measured_kl"]["median"] <= 1e-3
    big = kl_gamma(h, vec, texts, 0, 1e-1)
    assert big["gamma"] > res["gamma"] and big["measured_kl"]["median"] > res["measured_kl"]["median"]

    w = torch.randn(2, h.geometry.d_model)  # two blocks perturbed together along one unit direction
    joint = estimate_a_l(h, texts, (0, 1), w)
    wu = w / w.norm()

    def both(t: torch.Tensor) -> torch.Tensor:
        def add(k: int):
            def hook(x: torch.Tensor) -> torch.Tensor:
                x = x.clone()
                x[:, -1] = x[:, -1] + t * wu[k].to(x)
                return x

            return hook

        hooks = {f"blocks.{k}.hook_resid_post": add(k) for k in (0, 1)}
        return h.run(enc["input_ids"], enc["attention_mask"], hooks=hooks)[:, -1]

    _, jw = torch.func.jvp(both, (torch.zeros(()),), (torch.ones(()),))
    assert joint["a"] == pytest.approx(float(jw.detach().norm(dim=-1).median()), rel=1e-2)
    vec2 = SteeringVector(w, VectorMeta(d_model=h.geometry.d_model, layers=(0, 1)))
    res2 = kl_gamma(h, vec2, texts, (0, 1), 1e-3)
    assert res2["vector_norm"] == pytest.approx(float(w.norm()))
    assert res2["bound"] <= 1e-3 * (1 + 1e-9) and res2["measured_kl"]["median"] <= 1e-3


def test_kl_bound_of_a_bfloat16_model_is_its_float32_bound_and_the_weights_come_back(tiny_model_dir):
    """bfloat16 rounding drowns a second difference at a 1% step: the bound runs the same weights in float32."""
    texts = ["a=3, b=4, c=1. what is a + b - c?", "d=2. what is d?", "e=1, f=5. what is e + f?"]
    low = load_model(tiny_model_dir, dtype="bfloat16")
    wide = load_model(tiny_model_dir, dtype="bfloat16")
    wide.model.float()  # the bfloat16 weights, held exactly in float32
    torch.manual_seed(0)
    vec = SteeringVector(torch.randn(1, low.geometry.d_model), VectorMeta(d_model=low.geometry.d_model, layers=(1,)))
    before = {n: (p.dtype, p.detach().clone()) for n, p in low.model.named_parameters()}
    got, want = kl_gamma(low, vec, texts, 1, 1e-3), kl_gamma(wide, vec, texts, 1, 1e-3)
    for k in ("a", "L", "gamma"):
        assert got[k] == pytest.approx(want[k], rel=1e-5), k
    # called on their own, the estimate and the measured KL run in float32 too
    direct = estimate_a_l(low, texts, 1, vec.direction(1))
    assert direct["L"] == pytest.approx(want["L"], rel=1e-5) and direct["a"] == pytest.approx(want["a"], rel=1e-5)
    delta = want["gamma"] * vec.direction(1)
    assert measured_kl(low, texts, 1, delta) == pytest.approx(measured_kl(wide, texts, 1, delta), rel=1e-4, abs=1e-9)
    after = dict(low.model.named_parameters())
    assert all(after[n].dtype == d and torch.equal(after[n].detach(), t) for n, (d, t) in before.items())
    seen = []

    def fails() -> None:
        with low.in_float32():
            seen.append(next(low.model.parameters()).dtype)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fails()
    assert seen == [torch.float32] and next(low.model.parameters()).dtype == torch.bfloat16


def test_kl_bound_passes_are_cut_to_the_logit_budget(tiny_handle, monkeypatch):
    """The KL bound reads its texts in length-sorted passes within the logit budget (one text a pass at one
    element): a, L, γ and the measured KL do not change."""
    import reasonscope.budget as budget

    texts = ["a=3, b=4, c=1. what is a + b - c?", "d=2. what is d?", "e=1, f=5. what is e + f?", "g=9."]
    torch.manual_seed(0)
    vec = SteeringVector(torch.randn(2, tiny_handle.geometry.d_model), VectorMeta(d_model=32, layers=(0, 1)))
    whole = kl_gamma(tiny_handle, vec, texts, (0, 1), 1e-3)
    monkeypatch.setattr(budget, "LOGIT_BUDGET", 1)
    calls: list[int] = []
    run = tiny_handle.run
    monkeypatch.setattr(tiny_handle, "run", lambda ids, *a, **k: calls.append(len(ids)) or run(ids, *a, **k))
    split = kl_gamma(tiny_handle, vec, texts, (0, 1), 1e-3)
    assert set(calls) == {1} and len(calls) == 6 * len(texts)  # norms, three logit reads, two KL reads
    for key in ("gamma", "a"):
        assert split[key] == pytest.approx(whole[key], rel=1e-4), key
    # L is a float32 second difference at a step of ~1e-3 here: a padded pass may round logits 1e-7 apart
    # (transformers 5.24), which moves L by ~2e-4 of itself
    assert split["L"] == pytest.approx(whole["L"], rel=2e-3)
    assert split["measured_kl"]["median"] == pytest.approx(whole["measured_kl"]["median"], rel=1e-2)  # float32 noise
    with pytest.raises(ValueError, match="empty text"):
        kl_gamma(tiny_handle, vec, ["a=1.", ""], (0, 1), 1e-3)


def test_best_sweep_gamma_must_shorten_within_the_accuracy_loss():
    base = {"gamma": 0.0, "accuracy": 0.80, "mean_think_tokens": 100.0}
    rows = [
        {"gamma": 0.1, "accuracy": 0.81, "mean_think_tokens": 104.0},  # longer: never best
        {"gamma": 0.2, "accuracy": 0.79, "mean_think_tokens": 70.0},
        {"gamma": 0.4, "accuracy": 0.78, "mean_think_tokens": 50.0},
        {"gamma": 0.8, "accuracy": 0.60, "mean_think_tokens": 10.0},  # too inaccurate
    ]
    assert _best(rows, base, 0.02)["gamma"] == 0.4
    assert _best(rows, base, 0.015)["gamma"] == 0.2
    assert _best(rows[:1], base, 0.02) is None


def test_config_is_validated():
    with pytest.raises(ValueError, match="epsilon"):
        ASCConfig(epsilon=0)
    with pytest.raises(ValueError, match="gamma_rule"):
        ASCConfig(gamma_rule="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sweep"):
        ASCConfig(sweep=(-1.0,))
    with pytest.raises(ValueError, match="needs at least one sweep"):
        ASCConfig(sweep=())
    with pytest.raises(ValueError, match="pairs"):
        ASCConfig(pairs="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k_samples"):
        ASCConfig(k_samples=1)
    with pytest.raises(ValueError, match="vector"):
        ASCConfig(vector="pca")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positions"):
        ASCConfig(positions="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="extract_at applies to the mean difference"):
        ASCConfig(vector="learned", extract_at="start")
    with pytest.raises(ValueError, match="steps"):
        ASCConfig(vector="learned", learn_steps=0)
    with pytest.raises(ValueError, match="micro_batch"):
        ASCConfig(vector="learned", learn_micro_batch=0)
    assert ASCConfig(learn_micro_batch=2, seed=3).learn_config().micro_batch == 2


def test_selection_split_is_disjoint_from_the_test_problems():
    test = task.problems(300, EVAL_SEED)
    select = selection_problems(200, test)
    assert len(select) == 200 and not {p.uid for p in select} & {p.uid for p in test}
    assert select == [p for p in task.problems(400, SELECT_SEED) if p.uid not in {q.uid for q in test}][:200]
    with pytest.raises(ValueError, match="n_select"):
        ASCConfig(n_select=0)
    with pytest.raises(ValueError, match="extract_at"):
        ASCConfig(extract_at="middle")  # type: ignore[arg-type]


def test_start_extraction_reads_the_first_cot_token(tiny_handle):
    tok = tiny_handle.tokenizer
    for text in (" first d2.", "let me see"):
        got = _first_token(tiny_handle, text)
        assert got == tok.decode(tok(text, add_special_tokens=False)["input_ids"][:1]) and text.startswith(got)


def test_read_pairs_takes_prompts_or_questions_and_names_the_bad_line(tmp_path):
    good = tmp_path / "pairs.jsonl"
    rows = [
        {"question": "what is 2+2?", "concise": "2+2=4.", "verbose": "let me add: 2+2=4. yes."},
        {"prompt": "<p>what is 3+1?<think>", "concise": "3+1=4.", "verbose": "three plus one: 4."},
    ]
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = read_pairs(good, lambda q: f"<u>{q}<think>")
    assert got == [
        Pair("<u>what is 2+2?<think>", "2+2=4.", "let me add: 2+2=4. yes."),
        Pair("<p>what is 3+1?<think>", "3+1=4.", "three plus one: 4."),
    ]
    cases = {
        '{"question": "q", "concise": "a"}\n': "pairs.jsonl:1: a pair needs",
        '{"question": "q", "concise": "a", "verbose": "b"}\nnot json\n': "pairs.jsonl:2: malformed JSON",
        '{"question": "q", "concise": "a", "verbose": "a"}\n': "pairs.jsonl:1: 'concise' equals 'verbose'",
        '{"question": "q", "concise": " ", "verbose": "b"}\n': "pairs.jsonl:1: a pair needs",
        "[1, 2]\n": "pairs.jsonl:1: expected a JSON object",
        "\n": "holds no pairs",
    }
    for text, message in cases.items():
        good.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_pairs(good, str)


def _pairs_and_questions(h) -> tuple[list[Pair], list[Question]]:
    pairs = [
        Pair(h.chat_prompt(f"what is {i}+1?"), f"{i}+1={i + 1}.", f"let me add one to {i}: {i}+1={i + 1}. yes.")
        for i in range(6)
    ]
    questions = [Question(h.chat_prompt(f"what is {i}+2?"), str(i + 2), f"q{i}") for i in range(9)]
    return pairs, questions


def test_asc_runs_on_given_pairs_and_questions(tmp_path, tiny_handle, monkeypatch):
    """Any model's ASC: the vector is the pairs' mean difference; the first n_select questions choose γ, the next
    n_eval test it, graded by cfg.grader."""
    import steering.questions as questions_module

    h = tiny_handle
    pairs, questions = _pairs_and_questions(h)
    calls: list[tuple[list[str], str | None]] = []
    real = questions_module.generate_traces

    def spy(handle, prompts, cfg, **kw):
        calls.append((list(prompts), kw["grader"]))
        return real(handle, prompts, cfg, **kw)

    monkeypatch.setattr(questions_module, "generate_traces", spy)
    cfg = ASCConfig(
        layers=(0, 1), n_select=3, n_eval=4, n_calibration=4, sweep=(0.5,), max_new_tokens=6, grader="gsm8k"
    )
    report = run_asc(h, cfg, tmp_path / "asc", pairs=pairs, questions=questions)
    assert report["split"] == {"select": {"n": 3, "rows": [0, 3]}, "test": {"n": 4, "rows": [3, 7]}}
    select, test = [q.prompt for q in questions[:3]], [q.prompt for q in questions[3:7]]
    seen = [prompts for prompts, _ in calls]  # selection: γ 0, then the sweep at each layer; test: γ 0, KL, best
    assert seen[:3] == [select] * 3 and seen[3:] == [test] * (len(seen) - 3) and len(seen) in (5, 6)
    assert {grader for _, grader in calls} == {"gsm8k"}
    assert report["baseline"]["n"] == 4 and "accuracy_by_difficulty" not in report["baseline"]
    vec = SteeringVector.open(tmp_path / "asc")
    texts_c, texts_v = [p.prompt + p.concise for p in pairs], [p.prompt + p.verbose for p in pairs]
    want = extract_vector(h, texts_c, texts_v, [0, 1], "last", "mean_diff", "last", {})
    layer = report["layers"][0]
    torch.testing.assert_close(vec.direction(layer), want.direction(layer))
    assert vec.meta.recipe["n_pairs_used"] == 6 and vec.meta.recipe["pairs_given"]
    assert "rows [0, 3]" in vec.meta.gamma_detail["selected_on"]


def test_asc_refuses_too_few_questions_and_an_unusable_grader(tiny_handle):
    h = tiny_handle
    pairs, questions = _pairs_and_questions(h)
    cfg = ASCConfig(layers=(0,), n_select=5, n_eval=5, sweep=(0.5,), max_new_tokens=4)
    with pytest.raises(ValueError, match="pass at least 10"):
        run_asc(h, cfg, pairs=pairs, questions=questions)
    with pytest.raises(ValueError, match="grader 'gsm8k' grades given questions"):
        run_asc(h, ASCConfig(layer=0, grader="gsm8k"), pairs=pairs)
    with pytest.raises(ValueError, match="efficiency pairs sample questions after the first 9"):
        run_asc(h, ASCConfig(layer=0, pairs="efficiency", n_select=4, n_eval=5), questions=questions)
    with pytest.raises(ValueError, match="no pairs given"):
        run_asc(h, ASCConfig(layer=0, n_select=3, n_eval=4), pairs=[], questions=questions)
    with pytest.raises(ValueError, match="grader"):
        ASCConfig(grader="exact")


def test_asc_on_a_model_of_another_format_needs_its_questions_and_grader(r1_tiny_dir):
    """A model without the organisms' chat format gets no organism questions, and its questions no organism grader."""
    from reasonscope.models import load_model

    h = load_model(r1_tiny_dir)
    questions = [Question(h.chat_prompt(f"what is {i}+1?", thinking=True), str(i + 1)) for i in range(10)]
    with pytest.raises(ValueError, match="does not speak the organism task's format: pass questions="):
        run_asc(h, ASCConfig(layer=0))
    with pytest.raises(ValueError, match=r"graded as organism answers: pass ASCConfig\(grader='gsm8k'\)"):
        run_asc(h, ASCConfig(layer=0, n_select=3, n_eval=4), pairs=[], questions=questions)


@organisms
def test_asc_end_to_end_on_the_thinking_organism(tmp_path):
    h = load_model("organism:thinking")
    cfg = ASCConfig(
        layers=(1, 2),
        n_pairs=16,
        n_calibration=16,
        sweep=(0.5, 8.0),
        n_eval=10,
        n_select=12,
        max_new_tokens=160,
        batch_size=16,
    )
    report = run_asc(h, cfg, tmp_path / "asc")
    assert {"gamma", "gamma_rule", "baseline", "steered", "length_reduction", "sweep", "kl_bound"} <= set(report)
    assert {"accuracy", "mean_think_tokens"} <= set(report["baseline"]) & set(report["steered"])
    assert [(r["layer"], r["gamma"]) for r in report["sweep"]] == [(1, 0.5), (1, 8.0), (2, 0.5), (2, 8.0)]
    assert report["split"]["test"] == {"n": 10, "seed": EVAL_SEED} and report["split"]["select"]["seed"] == SELECT_SEED
    assert report["kl_bound"]["bound"] <= cfg.epsilon * (1 + 1e-9)
    strong = [r for r in report["sweep"] if r["gamma"] == 8.0]
    assert all(r["accuracy"] < report["select_baseline"]["accuracy"] for r in strong)  # far too strong: derails
    vec = SteeringVector.open(tmp_path / "asc")
    assert vec.meta.gamma == report["gamma"] and vec.meta.positions == "last" and vec.layers == (report["layer"],)
    assert vec.meta.gamma_detail["epsilon"] == cfg.epsilon and "selected_on" in vec.meta.gamma_detail


@organisms
def test_learned_asc_at_the_prompt_flips_the_style_on_the_thinking_organism(tmp_path):
    """The organism picks its style at the first thinking token ("first" concise, "let" verbose, ~50/50 at T=1);
    a vector learned over blocks 0-3 at the prompt's last token makes that choice concise."""
    h = load_model("organism:thinking")
    cfg = ASCConfig(
        vector="learned",
        positions="prompt",
        layers=(0, 1, 2, 3),
        learn_steps=40,
        n_pairs=48,
        n_calibration=16,
        sweep=(1.0,),
        n_eval=40,
        n_select=40,
        max_new_tokens=400,
        batch_size=40,
    )
    report = run_asc(h, cfg, tmp_path / "asc")
    assert report["layers"] == [0, 1, 2, 3] and report["layer"] is None and report["positions"] == "prompt"
    assert [(r["layers"], r["gamma"]) for r in report["sweep"]] == [([0, 1, 2, 3], 1.0)]
    assert report["learned"]["final_p_target"] > 0.8 and report["kl_bound"]["bound"] <= cfg.epsilon * (1 + 1e-9)
    base, at_one = report["select_baseline"], report["sweep"][0]
    assert at_one["mean_think_tokens"] < 0.8 * base["mean_think_tokens"]  # concise instead of ~half verbose
    assert at_one["accuracy"] >= base["accuracy"] - 0.1
    vec = SteeringVector.open(tmp_path / "asc")
    assert vec.layers == (0, 1, 2, 3) and vec.meta.positions == "prompt" and vec.meta.recipe["method"] == "learned"


@organisms
def test_efficiency_pairs_are_shortest_and_longest_correct():
    h = load_model("organism:thinking")
    cfg = ASCConfig(pairs="efficiency", k_samples=4, max_new_tokens=200, batch_size=32)
    pairs = efficiency_pairs(h, organism_questions(h, task.problems(8, 0, levels=(2, 3))), cfg)
    assert pairs
    tok = h.tokenizer
    assert all(len(tok(p.concise)["input_ids"]) < len(tok(p.verbose)["input_ids"]) for p in pairs)


@organisms
def test_organism_pairs_and_questions_given_explicitly_give_the_default_run(tmp_path):
    """run_asc's defaults are the organism task's pairs and splits: passing them in changes only the split's
    description."""
    h = load_model("organism:thinking")
    cfg = ASCConfig(layer=2, n_pairs=8, n_calibration=8, sweep=(0.5,), n_eval=8, n_select=8, max_new_tokens=160)
    default = run_asc(h, cfg)
    test = task.problems(8, EVAL_SEED)
    questions = organism_questions(h, selection_problems(8, test) + test)
    given = run_asc(h, cfg, pairs=asc_pairs(h, task.problems(8, 0)), questions=questions)
    assert default.pop("split") != given.pop("split")
    assert default == given
