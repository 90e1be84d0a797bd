"""Hybrid base/thinking steering: behaviours, SAE taxonomy, selector, vectors, hybrid decoding, the artifact, CLI."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from reasonscope.artifacts import ArtifactError
from reasonscope.generation import DecodeConfig, generate
from reasonscope.models import load_model
from reasonscope.organisms import task
from steering.behaviours import (
    TinySAE,
    agreement,
    ends_sentence,
    fit_sae,
    normalise_rows,
    organism_labels,
    sentence_spans,
)
from steering.hybrid import (
    HybridConfig,
    HybridRun,
    Rollout,
    Steerer,
    discover_behaviours,
    final_answer,
    hybrid_generate,
    mean_diff_vectors,
    optimise_vectors,
    rollouts,
    run_hybrid,
    sentence_table,
    train_selector,
)

from conftest import organisms, save_tiny_model

TINY = dict(sae_layer=1, steer_layer=0, n_latents=3, topk=1, n_train=6, train_steps=3, max_new_tokens=24, batch_size=4)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """A second tiny Qwen2 with the same tokenizer and other weights (a base that disagrees with the thinker)."""
    from reasonscope.organisms.tokenizer import build_tokenizer

    return save_tiny_model(build_tokenizer(), tmp_path_factory.mktemp("tiny-other") / "tiny-qwen2-b", 1, block_std=0.3)


@pytest.fixture(scope="module")
def pair(tiny_model_dir, other_model_dir):
    return load_model(other_model_dir), load_model(tiny_model_dir)  # (base, thinking)


def synthetic_rollouts(handle, n: int, seed: int = 0) -> list[Rollout]:
    """The organisms' own thinking texts as rollouts (no generation), with sentences and known types."""
    tok = handle.tokenizer
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = task.sample_problem(rng, 1 + i % 3)
        th = task.think(p, rng, "verbose" if i % 2 else "concise", slip_rate=0.3)
        prompt = tok(handle.chat_prompt(p.question), add_special_tokens=False)["input_ids"]
        gen = tok(f"{th.text}</think>{p.answer}<|end|>", add_special_tokens=False)["input_ids"]
        texts = [tok.decode([t]) for t in gen]
        spans = sentence_spans(texts)
        out.append(Rollout(prompt, gen, spans, organism_labels(["".join(texts[a:b]) for a, b in spans])))
    return out


# ---------------------------------------------------------------------------- behaviours


def test_sentences_and_known_types():
    texts = ["first", " a", "3", ".", " c", "7", ";", " 3", "+", "7", "=", "9", ".", " wait", ",", " is", " wrong", "."]
    texts += [" so", ":", "3", "+", "7", "=", "0", ".", "</think>", "0", "<|end|>"]
    spans = sentence_spans(texts)
    sents = ["".join(texts[a:b]) for a, b in spans]
    assert sents == ["first a3.", " c7; 3+7=9.", " wait, is wrong.", " so:3+7=0.", "</think>0<|end|>"]
    assert organism_labels(sents) == ["start", "compute", "slip", "correct", "answer"]
    verbose = [
        "let me work this out step by step.",
        "first, a3.",
        "next we add c, and c1; so:3+1=4.",
        "so the answer is:4.",
        "hmm, let me check that again to be sure.",
        "a3.",
        "c1; 3+1=4.",
        "yes, the answer is:4.",
    ]
    assert organism_labels(verbose) == [
        "start",
        "start",
        "compute",
        "conclude",
        "recheck",
        "recheck",
        "recheck",
        "conclude",
    ]
    assert ends_sentence("7.") and ends_sentence(". ") and not ends_sentence(" c")
    assert sentence_spans([]) == [] and sentence_spans([" ", " "]) == []


def test_sae_recovers_separable_clusters_and_agreement_scores():
    torch.manual_seed(0)
    centres = torch.randn(4, 16) * 3
    truth = [i % 4 for i in range(400)]
    x = centres[truth] + 0.1 * torch.randn(400, 16)
    rows = normalise_rows(x, x.mean(0))
    sae, report = fit_sae(rows, n_latents=4, k=1, seed=0, max_epochs=200)
    assert report["val_fvu"] < 0.5 and report["n_latents"] == 4
    agree = agreement(sae.labels(rows).tolist(), [str(t) for t in truth])
    assert agree["purity"] >= 0.9 and agree["ari"] > 0.7
    same = agreement(["a", "a", "b"], ["x", "x", "y"])
    assert same["purity"] == 1.0 and same["ari"] == 1.0 and same["majority"] == {"a": "x", "b": "y"}
    with pytest.raises(ValueError, match="equally long"):
        agreement([1], ["x", "y"])
    with pytest.raises(ValueError, match="n_latents"):
        TinySAE(8, 1, 1)
    with pytest.raises(ValueError, match="NaN"):
        fit_sae(torch.full((4, 3), float("nan")), 2)


def test_final_answer_formats():
    assert final_answer("first a3. c4; 3+4=7.</think>7<|end|>") == 7
    assert final_answer("so the answer is:5. yes, the answer is:6.") == 6
    assert final_answer("first a3. answer:4<|end|>") == 4
    assert final_answer("8<|end|>") == 8
    assert final_answer("first a") is None and final_answer("x</think><|end|>") is None
    assert final_answer("first a3.</think> + g9. m + h7<|end|>") is None  # digits of names are no answer
    assert final_answer("first a3.</think> + g9. so 7<|end|>") == 7
    from reasonscope.traces.grading import extract_organism

    assert extract_organism("a3.</think> + g9.") is None and extract_organism("a3.</think>4<|end|>") == "4"


def test_config_validation():
    HybridConfig()
    for bad, match in (
        (dict(n_latents=1), "n_latents"),
        (dict(topk=9), "topk"),
        (dict(labels="gold"), "labels"),
        (dict(vectors="pca"), "vectors"),
        (dict(selector="oracle"), "selector"),
        (dict(labels="annotated", selector="sae"), "selector 'sae'"),
        (dict(coefficients=()), "coefficients"),
        (dict(coefficients=(1.0, float("nan"))), "coefficients"),
        (dict(steer_layer=-1), "layers"),
        (dict(n_train=1), "n_train"),
        (dict(temperature=-1.0), "temperature"),
    ):
        with pytest.raises(ValueError, match=match):
            HybridConfig(**bad)
    assert HybridConfig(coefficients=[1, 2]).coefficients == (1.0, 2.0)


def test_models_must_share_tokens_and_have_the_layers(pair):
    base, thinking = pair
    HybridConfig(**TINY).check_models(base, thinking)
    with pytest.raises(ValueError, match="steer_layer 5"):
        HybridConfig(**{**TINY, "steer_layer": 5}).check_models(base, thinking)
    with pytest.raises(ValueError, match="sae_layer 2"):
        HybridConfig(**{**TINY, "sae_layer": 2}).check_models(base, thinking)


# ---------------------------------------------------------------------------- pieces on tiny models


def test_table_taxonomy_selector_and_vectors(pair):
    base, thinking = pair
    cfg = HybridConfig(**TINY)
    rolls = synthetic_rollouts(thinking, 8)
    table = sentence_table(thinking, rolls, cfg.sae_layer)
    n_sent = sum(len(r.spans) for r in rolls)
    assert table.acts.shape == (n_sent, 32) and table.pre.shape == (n_sent, 32) and len(table.truth) == n_sent
    assert [len(a) for a in table.think_argmax] == [len(r.gen_ids) for r in rolls]
    tax = discover_behaviours(table, cfg)
    assert len(tax.names) == 3 and set(tax.report["agreement"]) >= {"purity", "ari", "nmi"}
    labels = tax.labels(table.acts)
    probe, rep = train_selector(table.pre, labels, table.centre, 3, steps=20)
    assert probe.shape == (33, 3) and 0 <= rep["held_out_accuracy"] <= 1
    tok_labels = [[-1] * len(r.gen_ids) for r in rolls]
    for (i, k), lab in zip(table.owner, labels.tolist()):
        a, b = rolls[i].spans[k]
        tok_labels[i][a:b] = [lab] * (b - a)
    vecs, bias, rep = optimise_vectors(
        base,
        rolls,
        tok_labels,
        table.think_argmax,
        3,
        HybridConfig(**{**TINY, "train_steps": 8, "lr": 0.05}),
    )
    assert vecs.shape == (3, 32) and bias.shape == (32,) and rep["disagreement_positions"] > 0
    assert rep["loss_best"] < rep["loss_first"]
    one = HybridConfig(**{**TINY, "train_steps": 1, "lr": 0.05})  # one loss, measured before the step
    _, b1, rep1 = optimise_vectors(base, rolls, tok_labels, table.think_argmax, 3, one)
    assert rep1["loss_best"] == rep1["loss_first"] and float(b1.abs().sum()) == 0  # the initial parameters
    own = [r.prompt_ids + [5, 6] for r in rolls]
    md, zero, rep = mean_diff_vectors(base, rolls, tok_labels, own, [len(r.prompt_ids) for r in rolls], 3, cfg)
    assert md.shape == (3, 32) and float(zero.abs().sum()) == 0 and rep["n_source_tokens"] == 3 * len(rolls)
    with pytest.raises(ValueError, match="one label list"):
        optimise_vectors(base, rolls, tok_labels[:1], table.think_argmax, 3, cfg)


def test_reads_and_vector_learning_are_cut_to_the_logit_budget(pair, monkeypatch):
    """One rollout a pass (a logit budget of one element): the thinking model's greedy tokens and activations, and
    the optimised vectors (gradients accumulated pass by pass), are those of whole batches."""
    import reasonscope.budget as budget

    base, thinking = pair
    cfg = HybridConfig(**{**TINY, "train_steps": 6, "lr": 0.05})
    rolls = synthetic_rollouts(thinking, 8)

    def learn() -> tuple[Any, ...]:
        table = sentence_table(thinking, rolls, cfg.sae_layer)
        labels = torch.arange(len(table.owner)) % 3
        tok_labels = [[-1] * len(r.gen_ids) for r in rolls]
        for (i, k), lab in zip(table.owner, labels.tolist()):
            a, b = rolls[i].spans[k]
            tok_labels[i][a:b] = [lab] * (b - a)
        return table, optimise_vectors(base, rolls, tok_labels, table.think_argmax, 3, cfg)

    ref_table, (ref_v, ref_b, ref_rep) = learn()
    monkeypatch.setattr(budget, "LOGIT_BUDGET", 1)
    table, (v, b, rep) = learn()
    torch.testing.assert_close(table.acts, ref_table.acts)
    assert all(torch.equal(x, y) for x, y in zip(table.think_argmax, ref_table.think_argmax))
    torch.testing.assert_close(v, ref_v, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b, ref_b, atol=1e-5, rtol=1e-4)
    assert rep["loss_first"] == pytest.approx(ref_rep["loss_first"], rel=1e-4)


def test_steered_cross_entropy_unembeds_only_its_positions(pair, monkeypatch):
    """The optimised vectors' loss reads the hidden states and unembeds the examples' positions alone, one a run at
    a logit budget of one element: the value and gradient of the cross-entropy taken from the whole pass's logits."""
    import torch.nn.functional as F

    import reasonscope.budget as budget
    from steering.hybrid import _steered_ce

    monkeypatch.setattr(budget, "LOGIT_BUDGET", 1)

    base, _ = pair
    seqs = [list(range(5, 17)), list(range(7, 15))]
    examples = [
        (torch.tensor([3, 8]), torch.tensor([0, 2]), torch.tensor([9, 4])),
        (torch.tensor([5]), torch.tensor([1]), torch.tensor([11])),
    ]
    g = torch.Generator().manual_seed(0)
    vecs = (torch.randn(3, 32, generator=g) * 2).requires_grad_(True)
    bias = torch.randn(32, generator=g).requires_grad_(True)
    got = _steered_ce(base, seqs, examples, vecs, bias, 0)
    grads = torch.autograd.grad(got, (vecs, bias))
    ids, mask = base.left_padded(seqs)
    pad = [(mask[b] == 0).sum().item() for b in range(2)]
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([3 + pad[0], 8 + pad[0], 5 + pad[1]])
    delta = bias[None] + vecs[torch.tensor([0, 2, 1])]

    def add(x):
        y = x.clone()
        y[rows, cols] += delta
        return y

    logits = base.run(ids, mask, hooks={"blocks.0.hook_resid_post": add})
    want = F.cross_entropy(logits[rows, cols].float(), torch.tensor([9, 4, 11]), reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(want, (vecs, bias))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum() > 0


def steerer(d: int = 32, k: int = 3, layer: int = 0) -> Steerer:
    torch.manual_seed(0)
    return Steerer(
        torch.randn(k, d),
        torch.randn(d),
        tuple(f"b{i}" for i in range(k)),
        layer,
        1,
        torch.zeros(d),
        probe=torch.randn(d + 1, k),
    )


def test_steerer_checks_and_random_control_keeps_norms():
    st = steerer()
    rnd = st.randomised(3)
    pushes = st.vectors + st.bias  # what each behaviour adds: the control's pushes have the same norms
    assert torch.allclose((rnd.vectors + rnd.bias).norm(dim=-1), pushes.norm(dim=-1), atol=1e-5)
    assert float(rnd.bias.abs().sum()) == 0 and not torch.allclose(rnd.vectors, pushes)
    assert st.pick(torch.randn(5, 32)).shape == (5,)
    with pytest.raises(ValueError, match="names"):
        Steerer(torch.zeros(3, 32), torch.zeros(32), ("a",), 0, 1, torch.zeros(32), probe=torch.zeros(33, 3))
    with pytest.raises(ValueError, match="NaN"):
        Steerer(torch.full((1, 4), float("nan")), torch.zeros(4), ("a",), 0, 1, torch.zeros(4), probe=torch.zeros(5, 1))
    with pytest.raises(ValueError, match="probe or an SAE"):
        Steerer(torch.zeros(1, 4), torch.zeros(4), ("a",), 0, 1, torch.zeros(4))


def prompts_of(handle, n: int) -> list[list[int]]:
    tok = handle.tokenizer
    return [tok(handle.chat_prompt(p.question), add_special_tokens=False)["input_ids"] for p in task.problems(n, 7)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_same_model_never_steers_and_matches_generate(tiny_handle, temperature):
    """Base = thinking: the greedy tokens always agree, so hybrid decoding is plain decoding (same sampled stream)."""
    cfg = HybridConfig(**{**TINY, "temperature": temperature, "max_new_tokens": 12})
    prompts = prompts_of(tiny_handle, 5)
    out = hybrid_generate(tiny_handle, tiny_handle, prompts, steerer(), cfg)
    ref = generate(tiny_handle, prompts, DecodeConfig(max_new_tokens=12, temperature=temperature, seed=cfg.seed))
    assert [o.token_ids for o in out] == [c.token_ids for c in ref]
    assert all(b is None for o in out for b in o.behaviours)


def test_hybrid_stops_where_the_base_model_stops(tiny_handle, monkeypatch):
    """The base's generation_config EOS ends a hybrid generation, as it ends the base baseline's."""
    cfg = HybridConfig(**{**TINY, "temperature": 0.0, "max_new_tokens": 12})
    prompts = prompts_of(tiny_handle, 1)
    first = hybrid_generate(tiny_handle, tiny_handle, prompts, steerer(), cfg)[0].token_ids[0]
    gen_cfg = tiny_handle.model.generation_config
    monkeypatch.setattr(gen_cfg, "eos_token_id", [tiny_handle.tokenizer.eos_token_id, first])
    out = hybrid_generate(tiny_handle, tiny_handle, prompts, steerer(), cfg)[0]
    ref = generate(tiny_handle, prompts, DecodeConfig(max_new_tokens=12, temperature=0.0))[0]
    assert out.token_ids == ref.token_ids == [first] and out.finished


def test_disagreeing_pair_steers_and_batching_does_not_matter(pair):
    base, thinking = pair
    cfg = HybridConfig(**{**TINY, "max_new_tokens": 10, "temperature": 1.0})
    prompts = prompts_of(base, 5)
    st = steerer()
    together = hybrid_generate(base, thinking, prompts, st, cfg)
    alone = [hybrid_generate(base, thinking, [p], st, cfg, request_offset=i)[0] for i, p in enumerate(prompts)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.behaviours for o in together] == [o.behaviours for o in alone]
    steered = [b for o in together for b in o.behaviours if b is not None]
    assert steered and set(steered) <= set(st.names)
    assert all(len(o.token_ids) == len(o.behaviours) for o in together)
    rb = hybrid_generate(base, thinking, prompts, st, cfg, "random_behaviour")
    assert [len(o.token_ids) for o in rb] and all(len(o.token_ids) == len(o.behaviours) for o in rb)
    with pytest.raises(ValueError, match="mode"):
        hybrid_generate(base, thinking, prompts, st, cfg, "oracle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty prompt"):
        hybrid_generate(base, thinking, [[]], st, cfg)


def test_pushes_are_measured_against_the_residual(pair):
    """Each steered token records ‖c·(bias + V[b])‖ / ‖h‖; at a request's first steered token h is the plain base's
    block output at that position (nothing earlier was steered), so the ratio can be recomputed."""
    base, thinking = pair
    c = 0.5
    cfg = HybridConfig(**{**TINY, "max_new_tokens": 10, "coefficients": (c,)})
    prompts = prompts_of(base, 3)
    st = steerer()
    out = hybrid_generate(base, thinking, prompts, st, cfg)
    checked = 0
    for p, o in zip(prompts, out):
        steered = [t for t, b in enumerate(o.behaviours) if b is not None]
        assert len(o.pushes) == len(steered) and all(v > 0 for v in o.pushes)
        if not steered:
            continue
        t, name = steered[0], o.behaviours[steered[0]]
        seen = {}
        ids = torch.tensor([p + o.token_ids[:t]])
        with torch.no_grad():
            base.run(ids, hooks={"blocks.0.hook_resid_post": lambda x, seen=seen: seen.update(h=x[0, -1])})
        push = c * (st.bias + st.vectors[st.names.index(name)]).norm() / seen["h"].norm()
        assert o.pushes[0] == pytest.approx(float(push), rel=1e-4)
        checked += 1
    assert checked


def test_rollouts_have_sentences(tiny_handle):
    cfg = HybridConfig(**{**TINY, "max_new_tokens": 16})
    rolls = rollouts(tiny_handle, [tiny_handle.chat_prompt("given a3. what is a?")] * 2, 1.0, 0, cfg)
    assert len(rolls) == 2 and all(len(r.gen_ids) <= 16 for r in rolls)
    assert all(len(r.truth) == len(r.spans) for r in rolls)


# ---------------------------------------------------------------------------- the run, the artifact, the CLI


@pytest.mark.parametrize(
    "vectors,labels,selector",
    [("optimised", "sae", "probe"), ("mean_diff", "annotated", "probe"), ("optimised", "sae", "sae")],
)
def test_run_writes_an_artifact_that_opens(tmp_path, pair, vectors, labels, selector):
    base, thinking = pair
    cfg = HybridConfig(**{**TINY, "vectors": vectors, "labels": labels, "selector": selector})
    problems = task.problems(4, 11)
    run = run_hybrid(base, thinking, problems, cfg, tmp_path / "run")
    s = run.summary
    for key in ("base_accuracy", "thinking_accuracy", "hybrid_accuracy", "gap_recovered", "steered_token_fraction"):
        assert key in s
    assert set(s["controls"]) == {"random_behaviour", "random_vectors"}
    assert all("median_push_to_residual" in r for r in s["runs"].values())
    back = HybridRun.open(tmp_path / "run")
    assert back.summary == json.loads(json.dumps(s)) and len(back.records) == 4
    r = back.records[0]
    assert r["question"] == problems[0].question and len(r["tokens"]) == len(r["behaviours"])
    assert isinstance(r["correct"], bool)
    assert back.config["vectors"] == vectors
    assert torch.equal(back.steerer.vectors, run.steerer.vectors)
    vecs = back.vectors()
    assert set(vecs) == set(back.steerer.names)
    v = next(iter(vecs.values()))
    v.check_model(base)
    assert v.meta.gamma == min(cfg.coefficients) and v.meta.gamma_detail["coefficients"] == list(cfg.coefficients)
    assert v.meta.recipe["model_type"] == base.model.config.model_type
    with pytest.raises(FileExistsError):
        run.save(tmp_path / "run")


def test_open_refuses_other_directories(tmp_path):
    with pytest.raises(ArtifactError):
        HybridRun.open(tmp_path)


def test_cli_validates_before_loading(tmp_path, tiny_model_dir):
    from reasonscope.cli import app

    runner = CliRunner()
    args = ["steer", "hybrid", "--base", str(tiny_model_dir), "--thinking", str(tiny_model_dir)]
    for extra, fragment in (
        (["--labels", "gold"], "--labels"),
        (["--steer-layer", "7"], "--steer-layer 7"),
        (["--coefficients", "x"], "--coefficients"),
        (["--labels", "annotated", "--selector", "sae"], "selector 'sae'"),
    ):
        r = runner.invoke(app, [*args, "--out", str(tmp_path / "o"), *extra])
        assert r.exit_code == 2, r.output
        assert fragment in r.output and not (tmp_path / "o").exists()
    (tmp_path / "exists").mkdir()
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "exists")])
    assert r.exit_code == 2 and "already exists" in r.output


def test_cli_json(tmp_path, tiny_model_dir, other_model_dir):
    from reasonscope.cli import app

    r = CliRunner().invoke(
        app,
        [
            "steer",
            "hybrid",
            "--base",
            str(other_model_dir),
            "--thinking",
            str(tiny_model_dir),
            "--out",
            str(tmp_path / "o"),
            "--sae-layer",
            "1",
            "--steer-layer",
            "0",
            "--n-latents",
            "3",
            "--n-train",
            "4",
            "--train-steps",
            "2",
            "--n-eval",
            "3",
            "--max-new-tokens",
            "12",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert {
        "base_accuracy",
        "thinking_accuracy",
        "hybrid_accuracy",
        "gap_recovered",
        "steered_token_fraction",
        "controls",
    } <= set(s)
    assert HybridRun.open(tmp_path / "o").summary["n_problems"] == 3


def test_hybrid_on_a_dataset_with_r1_format_models(tmp_path, r1_tiny_dir, r1_other_dir):
    """Real-model hybrid steering: the first --n-eval GSM8K rows are evaluated under the GSM8K grader, the next
    --n-train rows give the thinking model's rollouts; latents have no known types to be named by."""
    from reasonscope.cli import app
    from reasonscope.traces import load_hf_dataset

    from conftest import shared_data

    gsm8k = shared_data("gsm8k/test.jsonl")
    args = ["steer", "hybrid", "--base", str(r1_other_dir), "--thinking", str(r1_tiny_dir), "--sae-layer", "1"]
    args += ["--dataset", f"gsm8k:{gsm8k}", "--n-eval", "2", "--n-train", "4", "--train-steps", "2", "--n-latents", "3"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o"), "--max-new-tokens", "12", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["n_problems"] == 2 and s["taxonomy_agreement"] is None and "gsm8k" in s["format"]
    run = HybridRun.open(tmp_path / "o")
    rows = load_hf_dataset(gsm8k)[:2]
    assert [(x["question"], x["gold"]) for x in run.records] == [(t.prompt, t.gold) for t in rows]
    assert all(name.isdigit() for name in run.taxonomy["names"])
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o2"), "--labels", "annotated"])
    assert bad.exit_code == 2 and "labels 'annotated'" in bad.output


def test_dataset_grading_and_its_refusals(pair):
    from steering.hybrid import _grade

    assert _grade("so 16-3-4=9 and 9*2=18.</think>The answer is $\\boxed{18}$.", True, "18", "gsm8k")
    assert not _grade("</think>\\boxed{18}", False, "18", "gsm8k")  # unfinished: no answer
    assert not _grade("</think>\\boxed{17}", True, "18", "gsm8k")
    assert _grade("first a3.</think>7<|end|>", True, "7", "organism")
    base, thinking = pair
    with pytest.raises(ValueError, match="pass questions and train_questions"):
        run_hybrid(base, thinking, None, HybridConfig(sae_layer=1, grader="gsm8k"))
    with pytest.raises(ValueError, match="no questions"):
        run_hybrid(base, thinking, [], HybridConfig(sae_layer=1))
    with pytest.raises(ValueError, match="not both"):
        run_hybrid(base, thinking, task.problems(2, 0), HybridConfig(sae_layer=1), questions=[])
    with pytest.raises(ValueError, match="grader"):
        HybridConfig(grader="exact")


@organisms
def test_organisms_end_to_end_small(tmp_path):
    """On the organisms the hybrid recovers most of the gap and both controls far less (60 problems, seeded)."""
    base, thinking = load_model("organism:base"), load_model("organism:thinking")
    cfg = HybridConfig(n_train=48, train_steps=40, n_eval=60, max_new_tokens=448)
    run = run_hybrid(base, thinking, None, cfg, tmp_path / "run")
    s = run.summary
    assert s["thinking_accuracy"] > s["base_accuracy"]
    assert s["gap_recovered"] >= 0.5 and 0 < s["steered_token_fraction"] <= 0.2
    for name, control in s["controls"].items():
        assert control["gap_recovered"] <= s["gap_recovered"] - 0.3, (name, control, s["gap_recovered"])
    assert s["runs"]["hybrid"]["median_push_to_residual"] < 1
    assert s["taxonomy_agreement"]["purity"] > 0.5
    assert len(HybridRun.open(tmp_path / "run").records) == 60


def test_agreement_scores_match_their_definitions():
    from steering.behaviours import agreement

    same = agreement([0, 0, 1, 2], ["x", "x", "y", "z"])
    assert same["ari"] == same["nmi"] == same["purity"] == 1.0
    # values from the ARI (Hubert-Arabie) and arithmetic-NMI formulas, as scikit-learn computes them
    g = agreement(["0", "0", "1", "1", "2", "2"], ["a", "a", "b", "b", "b", "c"])
    assert g["ari"] == pytest.approx(0.4444, abs=1e-4) and g["nmi"] == pytest.approx(0.7397, abs=1e-4)
    assert agreement([0, 0, 0], ["a", "a", "a"])["nmi"] == 1.0
