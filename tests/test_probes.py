"""Probes: chunking, labels, metrics, fitting on synthetic stores with known answers, the ProbeSet artifact."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from probes import metrics
from probes.answers import extract_intermediate
from probes.chunks import chunk_thinking
from probes.data import VAL, join_labels
from probes.entropy import deviation_index
from probes.fit import ProbeConfig, fit_probes
from probes.labels import LabelConfig, LabelTable, build_labels, label_traces
from probes.probeset import ProbeSet
from reasonscope.artifacts import ArtifactError
from reasonscope.store import ActivationStore, StoreManifest, StoreWriter
from reasonscope.traces import Trace, load_thought_anchors

from conftest import organisms, shared_data

# ---------------------------------------------------------------------------- chunks and answers


def test_paragraph_chunks_start_at_markers():
    text = "First, 2+2=4.\n\nSo x is 4.\n\nWait, let me verify.\n\nYes 4.\n\nAlternatively, x = 5."
    chunks = chunk_thinking(text)
    assert [c.text for c in chunks] == [
        "First, 2+2=4.\n\nSo x is 4.",
        "Wait, let me verify.\n\nYes 4.",
        "Alternatively, x = 5.",
    ]
    assert [c.marker for c in chunks] == [None, "wait", "alternatively"]
    assert all(text[c.char_start : c.char_end] == c.text for c in chunks)


def test_organism_steps_and_answers():
    text = "first a3. c1; 3+1=5. wait, 3+1=5 is wrong. so:3+1=4. so the answer is:4. hmm, let me check."
    chunks = chunk_thinking(text)
    answers = [extract_intermediate(c.text, "organism") for c in chunks]
    assert answers == [None, "5", None, "4", "4", None]
    assert extract_intermediate("so we get \\frac{1}{2}.", "math") == "\\frac{1}{2}"
    assert extract_intermediate("Let me check this.", "math") is None
    # a decimal point is no sentence end (no integer part read off "5.8"); \\( \\), fractions and units read
    for text, want in [
        ("Therefore, the answer is 5.8 cm.", "5.8"),  # a unit word or % may end the value
        ("So the rate is 6.17%.", "6.17"),
        ("So, p(5) = -5/12", "-5/12"),
        ("so x = 12.5.\n", "12.5"),
        ("= 8!.", None),
        ("the answer is \\( \\frac{1}{4027} \\).", "\\frac{1}{4027}"),
        ("x = -\\frac{1}{4027}.", "-\\frac{1}{4027}"),
    ]:
        assert extract_intermediate(text, "math") == want, text


# ---------------------------------------------------------------------------- labels


def _trace(thinking: str, gold: str | None = "4", tid: str = "a", source: str = "organism") -> Trace:
    return Trace(id=tid, prompt="q <think>", thinking=thinking, answer=gold or "", gold=gold, source=source)


def test_text_labels_known_answers():
    t = _trace("first a3. c1; 3+1=5. so:3+1=4. d2; 4-2=2. yes, the answer is:4.")
    table = build_labels([t], LabelConfig())
    nan = math.nan
    got = {k: [None if math.isnan(x) else x for x in v] for k, v in table.targets.items()}
    assert got["correct"] == [None, 0.0, 1.0, 0.0, 1.0]
    assert got["after_first_correct"] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert got["deviated"] == [None, 0.0, 0.0, 1.0, 0.0]
    assert table.position == [-1] * 5 and nan != nan
    s = table.summary()
    assert s["n_traces"] == 1 and s["n_chunks"] == 5
    share = table.traces["a"]["first_correct_share"]
    assert share == pytest.approx((t.thinking.index("3+1=4.") + 6) / len(t.thinking))
    assert s["first_correct_share"] == {
        "n": 1,
        "median": round(share, 4),
        "p25": round(share, 4),
        "p75": round(share, 4),
    }
    assert 0 <= table.traces["a"]["sbt_score"] <= 1


def test_first_correct_share_and_sbt_read_paragraphs_not_chunks():
    # ten paragraphs, no transition marker: one paragraph chunk; the answer stated in paragraph 1 or 8
    def thinking(at: int) -> str:
        return "\n\n".join("So x = 4." if k == at else f"Step {k} adds the terms up." for k in range(10))

    early, late = (_trace(thinking(k), tid=str(k), source="math") for k in (1, 8))
    table = build_labels([early, late], LabelConfig())
    assert table.summary()["n_chunks"] == 2
    for t, k in ((early, 1), (late, 8)):
        got = table.traces[t.id]
        end = t.thinking.index("So x = 4.") + len("So x = 4.")
        assert got["first_correct_share"] == pytest.approx(end / len(t.thinking))
        assert got["sbt_score"] == pytest.approx(0.9 * (1 - (k + 1) / 10))  # no SBT keyword: kappa = 0


def test_traces_without_gold_get_the_labels_that_need_none():
    t = _trace("first a3. c1; 3+1=4. yes, the answer is:4.", gold=None)
    table = build_labels([t], LabelConfig())
    assert all(math.isnan(x) for k in ("correct", "after_first_correct", "deviated") for x in table.targets[k])
    s = table.summary()
    assert s["n_chunks"] == 3 and s["first_correct_share"]["n"] == 0 and s["targets"]["correct"]["n"] == 0


def test_a_trace_with_empty_thinking_is_left_out_with_a_warning():
    full = _trace("first a3. c1; 3+1=4. yes, the answer is:4.")
    empty = _trace("\n", tid="empty")
    with pytest.warns(UserWarning, match=r"1 traces with empty thinking are left out \(e.g. \['empty'\]\)"):
        table = build_labels([full, empty], LabelConfig())
    assert set(table.trace_id) == {full.id}


def test_labels_bad_input_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="no trace has any thinking"):
        label_traces([_trace("")], LabelConfig(), tmp_path / "l")
    with pytest.raises(ValueError, match="need a model"):
        label_traces([_trace("a=4.")], LabelConfig(forced=True), tmp_path / "l")
    with pytest.raises(ValueError, match="matcher"):
        LabelConfig(matcher="regex")  # type: ignore[arg-type]
    assert not (tmp_path / "l").exists()


def test_labels_of_other_traces_under_the_same_ids_are_refused(tiny_handle, task_traces, tmp_path):
    """Labels record the token at each chunk end; joining them to a store that holds another token there (traces
    regenerated under the same ids) is refused."""
    from probes.data import join_labels
    from reasonscope.capture import CaptureConfig, capture

    store = capture(
        tiny_handle, task_traces, CaptureConfig(hooks="hook_resid_post", positions="segment_ends"), tmp_path / "s"
    )
    table = build_labels(task_traces, LabelConfig(matcher="organism"), tokenizer=tiny_handle.tokenizer)
    assert len(table.token_id) == len(table)
    assert len(join_labels(store, table, "after_first_correct", 0.25, 0.25, 0).y) == len(table)
    other = LabelTable(**{**table.__dict__, "token_id": [t + 1 for t in table.token_id]})
    with pytest.raises(ValueError, match="disagree on the token"):
        join_labels(store, other, "after_first_correct", 0.25, 0.25, 0)


def test_labelled_chunks_a_capture_left_out_are_named(tiny_handle, task_traces, tmp_path):
    """A store captured at coarser segment ends than the labels' chunks (traces segmented with min_chars > 0) drops
    chunks: the join warns with the count, an example and the fix instead of dropping them silently."""
    import dataclasses
    import warnings

    from probes.data import join_labels
    from reasonscope.capture import CaptureConfig, capture

    table = build_labels(task_traces, LabelConfig(matcher="organism"), tokenizer=tiny_handle.tokenizer)
    merged = [dataclasses.replace(t, segments=t.segments[1:]) for t in task_traces]  # each first step merged away
    store = capture(
        tiny_handle, merged, CaptureConfig(hooks="hook_resid_post", positions="segment_ends"), tmp_path / "s"
    )
    with pytest.warns(UserWarning, match=rf"{len(task_traces)} of {len(table)} labelled chunks .* min_chars=0"):
        data = join_labels(store, table, "after_first_correct", 0.25, 0.25, 0)
    assert len(data.y) == len(table) - len(task_traces)
    full = capture(
        tiny_handle, task_traces, CaptureConfig(hooks="hook_resid_post", positions="segment_ends"), tmp_path / "f"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every chunk found: no warning
        join_labels(full, table, "after_first_correct", 0.25, 0.25, 0)


def test_labels_token_positions_match_segment_ends(tiny_handle, task_traces, tmp_path):
    table = label_traces(task_traces, LabelConfig(matcher="organism"), tmp_path / "l", tokenizer=tiny_handle.tokenizer)
    for t in task_traces:
        pos = [p for tid, p in zip(table.trace_id, table.position) if tid == t.id]
        assert pos == [s.end - 1 for s in t.segments]
    again = LabelTable.open(tmp_path / "l")
    assert again.position == table.position and again.summary() == table.summary()
    # every trace's final step is correct (the task traces are slip-corrected)
    assert all(s["first_correct_chunk"] is not None for s in table.traces.values())


def test_model_labels_forced_and_entropy(tiny_handle, task_traces):
    traces = task_traces[:3]
    cfg = LabelConfig(matcher="organism", forced=True, entropy=True, window=4, forced_max_new_tokens=3)
    table = build_labels(traces, cfg, handle=tiny_handle)
    n = len(table)
    for k in ("safe_exit", "no_loss_exit", "rpdi", "rpdi_transition", "deviation", "entropy"):
        assert len(table.targets[k]) == n
    assert set(table.targets["safe_exit"]) <= {0.0, 1.0}
    # an exit costs nothing where the forced answer is correct
    assert all(nl >= s for s, nl in zip(table.targets["safe_exit"], table.targets["no_loss_exit"]))
    assert all(not math.isnan(x) for x in table.targets["entropy"])
    dev = [x for x in table.targets["deviation"] if not math.isnan(x)]
    assert dev and set(dev) <= {0.0, 1.0}
    # surprise: the largest -log p of a token written in the thinking up to the chunk end
    t, end = traces[0], table.position[1]
    with torch.no_grad():
        lp = tiny_handle.run(torch.tensor([t.token_ids]))[0].float().log_softmax(-1)
    start = t.think_span[0]
    written = torch.tensor(t.token_ids[start : end + 1])
    expect = float((-lp[start - 1 : end].gather(-1, written[:, None])).max())
    assert table.trace_id[1] == t.id and table.targets["surprise"][1] == pytest.approx(expect, rel=1e-5)


@organisms
def test_forced_answers_share_each_trace_s_prefix():
    """Forced answers read each trace once (shared prefixes) and equal one greedy generation per cut."""
    from probes.forced import exit_ids, forced_answers
    from reasonscope.generation import DecodeConfig, generate
    from reasonscope.models import load_model
    from reasonscope.organisms import task
    from reasonscope.traces.generate import generate_traces

    h = load_model("organism:thinking")
    traces = generate_traces(h, [h.chat_prompt(p.question) for p in task.problems(4, seed=5)])
    cuts = [list(range(t.think_span[0], t.think_span[1], 7)) for t in traces]
    got = forced_answers(h, traces, cuts, ["organism"] * len(traces), max_new_tokens=4)
    prompts = [list(t.token_ids[: p + 1]) + exit_ids(h) for t, pos in zip(traces, cuts) for p in pos]
    plain = generate(h, prompts, DecodeConfig(max_new_tokens=4))
    from reasonscope.traces import GRADERS

    want = [GRADERS["organism"].extract(h.tokenizer.decode(c.token_ids, skip_special_tokens=True)) for c in plain]
    assert [a for per in got for a, _ in per] == want and len(want) > 20


def test_entropies_do_not_depend_on_the_logit_budget(tiny_handle, task_traces, monkeypatch):
    """Passes and their logits are cut to the logit budget (at one element: one trace a pass, one position a chunk);
    each trace's entropies are its own."""
    import reasonscope.budget as budget
    from probes.entropy import entropy, token_entropies

    whole = token_entropies(tiny_handle, task_traces[:5])
    monkeypatch.setattr(budget, "LOGIT_BUDGET", 1)
    calls: list[int] = []
    widths: list[int] = []
    chunks = tiny_handle.run_chunks

    def spy(ids, *a, **k):
        calls.append(len(ids))
        for cols, logits in chunks(ids, *a, **k):
            widths.append(logits.shape[1])
            yield cols, logits

    monkeypatch.setattr(tiny_handle, "run_chunks", spy)
    split = token_entropies(tiny_handle, task_traces[:5])
    assert calls == [1] * 5 and set(widths) == {1}  # one trace a pass, one position a chunk
    for got, ref, t in zip(split, whole, task_traces):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        alone = entropy(tiny_handle.run(torch.tensor([t.token_ids]))[0]).cpu()
        torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-5)


def test_deviation_index_known_answer():
    h = torch.tensor([9.0, 1, 1, 1, 1, 3, 3])  # position 0 is before the thinking
    r = deviation_index(h, start=1, window=2)
    assert torch.isnan(r[:2]).all()
    assert r[2].item() == pytest.approx(1.0)
    assert r[5].item() == pytest.approx(2.0 / (7 / 5))
    assert r[6].item() == pytest.approx(3.0 / (10 / 6))


def test_text_labels_on_real_traces():
    traces = load_thought_anchors(shared_data("reasoning_traces/thought_anchors_math"))
    table = build_labels(traces, LabelConfig())
    assert set(table.trace_id) == {t.id for t in traces}
    s = table.summary()
    fcs = s["first_correct_share"]
    assert s["n_traces"] == len(traces) and fcs["n"] > 0 and 0 < fcs["p25"] <= fcs["median"] <= fcs["p75"] <= 1


def test_forced_exits_of_math_traces_lead_into_the_box(r1_tiny_dir, monkeypatch):
    """A math trace's forced exit appends ``</think>`` and the boxed-answer lead, decodes 32 tokens and grades the
    lead with what follows; gold-less traces get no safe_exit label; unreadable answers are counted."""
    import probes.forced as forced
    from reasonscope.generation import Completion
    from reasonscope.models import load_model
    from reasonscope.traces.segment import segment_trace

    h = load_model(r1_tiny_dir)
    traces = load_thought_anchors(shared_data("reasoning_traces/thought_anchors_math"))
    traces = [segment_trace(t, h.tokenizer) for t in sorted(traces, key=lambda t: len(t.thinking))[:2]]
    traces[1] = dataclasses.replace(traces[1], gold=None)
    lead = forced.exit_ids(h, forced.answer_prompt("math").suffix)
    seen = []

    def spy(handle, prompts, cfg, **kw):
        seen.append((prompts, cfg.max_new_tokens))
        answer = h.tokenizer(str(traces[0].gold) + "}", add_special_tokens=False)["input_ids"]
        return [Completion(p, answer if i % 2 == 0 else [], "eos") for i, p in enumerate(prompts)]

    monkeypatch.setattr(forced, "generate", spy)
    table = build_labels(traces, LabelConfig(forced=True), handle=h)
    prompts, budget = seen[0]
    assert budget == 32 and all(p[-len(lead) :] == lead for p in prompts)
    mine = [i for i, t in enumerate(table.trace_id) if t == traces[0].id]
    assert [table.targets["safe_exit"][i] for i in mine] == [float(k % 2 == 0) for k in range(len(mine))]
    others = [x for t, x in zip(table.trace_id, table.targets["safe_exit"]) if t == traces[1].id]
    assert others and all(math.isnan(x) for x in others)
    assert table.summary()["forced_unanswered_share"] == pytest.approx(len(prompts) // 2 / len(prompts), abs=0.01)


def test_model_labels_on_real_traces_without_token_ids(r1_tiny_dir):
    """Forced answers and entropies on thought-anchors traces (texts only): tokenized as their positions were."""
    from reasonscope.models import load_model
    from reasonscope.traces.segment import segment_trace, token_offsets

    h = load_model(r1_tiny_dir)
    traces = load_thought_anchors(shared_data("reasoning_traces/thought_anchors_math"))
    traces = sorted((t for t in traces if len(chunk_thinking(t.thinking)) >= 4), key=lambda t: len(t.thinking))[:2]
    assert not any(t.token_ids for t in traces)
    cfg = LabelConfig(forced=True, entropy=True, forced_max_new_tokens=2)
    table = build_labels(traces, cfg, handle=h)
    again = build_labels([segment_trace(t, h.tokenizer) for t in traces], cfg, handle=h)
    assert table.targets["safe_exit"] == again.targets["safe_exit"] and len(table) >= 8
    assert table.targets["entropy"] == pytest.approx(again.targets["entropy"])
    assert max(table.position) < max(len(token_offsets(t, h.tokenizer)[0]) for t in traces)


# ---------------------------------------------------------------------------- metrics


def test_question_baseline_gives_every_chunk_of_a_trace_its_question_s_features():
    from probes.baselines import bag_of_words, baseline_features

    traces = [_trace("2+2=4. so 4.", tid="a"), _trace("2+2=5. so 4.", tid="b")]
    traces[1] = dataclasses.replace(traces[1], prompt="what is 2+2? think hard")
    table = build_labels(traces, LabelConfig(matcher="organism"))
    rows = list(range(len(table)))
    x = baseline_features(table, rows)["question"]
    for i in rows:
        assert torch.equal(x[i], bag_of_words(traces[table.trace_id[i] == "b"].prompt))
    del table.traces["a"]["question"]  # labels written before questions were recorded: no such baseline
    assert "question" not in baseline_features(table, rows)


def test_metrics_known_values():
    y = torch.tensor([0, 0, 1, 1])
    assert metrics.auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), y) == pytest.approx(0.75)
    assert metrics.auroc(torch.tensor([0.5, 0.5, 0.5, 0.5]), y) == pytest.approx(0.5)
    assert math.isnan(metrics.auroc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))
    p = torch.tensor([0.0, 0.2, 1.0, 1.0])
    assert metrics.ece(p, y) == pytest.approx((1 / 4) * 0.0 + (1 / 4) * 0.2 + (2 / 4) * 0.0)
    assert metrics.brier(p, y) == pytest.approx((0 + 0.04 + 0 + 0) / 4)
    g = torch.tensor([0, 0, 1, 1])
    assert math.isnan(metrics.auroc_within(p, y, g))  # no problem holds both classes
    lo, hi = metrics.bootstrap_auroc(torch.tensor([0.1, 0.9] * 10), torch.tensor([0, 1] * 10), torch.arange(20) // 2)
    assert lo == hi == 1.0
    # average precision: ranks 0.8 (pos), 0.4 (neg), 0.35 (pos): (1/2)·1 + (1/2)·(2/3)
    assert metrics.auprc(torch.tensor([0.1, 0.4, 0.35, 0.8]), y) == pytest.approx(0.5 + 1 / 3)
    assert metrics.auprc(torch.tensor([0.5, 0.5, 0.5, 0.5]), y) == pytest.approx(0.5)  # one threshold: the base rate
    assert math.isnan(metrics.auprc(torch.tensor([0.1, 0.2]), torch.tensor([0, 0])))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # against the definition, one threshold per distinct score (ties made likely)
        q = torch.randint(0, 5, (30,), generator=gen).double() / 4
        t = torch.randint(0, 2, (30,), generator=gen)
        if not t.any():
            continue
        want = 0.0
        for c in sorted(set(q.tolist()), reverse=True):
            above = q >= c
            want += (float(t[q == c].sum()) / float(t.sum())) * float(t[above].sum()) / float(above.sum())
        assert metrics.auprc(q, t) == pytest.approx(want)


def test_platt_scaling_recovers_a_known_calibration():
    g = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(40_000, generator=g)
    y = (torch.rand(40_000, generator=g) < torch.sigmoid(2 * z - 1)).float()
    a, b = metrics.platt(z, y)
    assert a == pytest.approx(2.0, abs=0.08) and b == pytest.approx(-1.0, abs=0.06)
    skewed = torch.sigmoid(z)  # a probe whose class weights ignore that y=1 is rarer and sharper than it says
    fixed = torch.sigmoid(a * z + b)
    assert metrics.ece(fixed, y) < 0.02 < metrics.ece(skewed, y)
    assert metrics.auroc(fixed, y) == pytest.approx(metrics.auroc(skewed, y))
    assert metrics.platt(z[:5], torch.ones(5)) == (1.0, 0.0)
    assert metrics.platt(-z, y) == (1.0, 0.0)  # ranked backwards on validation: not flipped, left as it is


# ---------------------------------------------------------------------------- fitting


HOOKS = [f"blocks.{i}.hook_resid_post" for i in range(3)]


def synthetic(
    tmp_path, n_problems: int = 60, chunks: int = 8, d: int = 16, seed: int = 0, label: float = 2.0, spread: float = 0.3
):
    """Layer 0: noise; layer 1: the label along one direction (``label`` apart); layer 2: only the problem's
    difficulty, its chance of a positive label (uniform in 0.5 ± ``spread``)."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    ids = [f"p{i}" for i in range(n_problems)]
    m = StoreManifest(
        weight_hash="sha256:abc",
        hooks=dict.fromkeys(HOOKS, d),
        positions="segment_ends",
        dtype="float32",
        trace_ids=ids,
        shard_size=16,
    )
    w = StoreWriter.create(tmp_path / "store", m)
    table = LabelTable([], [], [], [], [], [], {"correct": []})
    direction = torch.randn(d, generator=g)
    for s in range(w.n_shards):
        lo, hi = s * 16, min((s + 1) * 16, n_problems)
        acts: dict[str, list[torch.Tensor]] = {h: [] for h in HOOKS}
        rows: dict[str, list[int]] = {"trace": [], "position": [], "token_id": [], "segment": []}
        for t in range(lo, hi):
            diff = rng.uniform(0.5 - spread, 0.5 + spread)
            y = torch.tensor([float(rng.random() < diff) for _ in range(chunks)])
            y[0], y[1] = 0.0, 1.0  # both classes in every problem
            acts[HOOKS[0]].append(torch.randn(chunks, d, generator=g))
            acts[HOOKS[1]].append(torch.randn(chunks, d, generator=g) + label * (2 * y[:, None] - 1) * direction)
            acts[HOOKS[2]].append(torch.randn(chunks, d, generator=g) + 4.0 * diff * direction)
            for k in range(chunks):
                rows["trace"].append(t)
                rows["position"].append(10 + 3 * k)
                rows["token_id"].append(0)
                rows["segment"].append(k)
                table.trace_id.append(ids[t])
                table.problem.append(ids[t])
                table.chunk.append(k)
                table.position.append(10 + 3 * k)
                table.share.append((k + 1) / chunks)
                table.text.append(f"step {k}")
                table.targets["correct"].append(float(y[k]))
        w.write_shard(s, {h: torch.cat(v) for h, v in acts.items()}, {k: torch.tensor(v) for k, v in rows.items()})
    w.finalize()
    return ActivationStore.open(tmp_path / "store"), table


@pytest.mark.parametrize(("kind", "solver"), [("logistic", "auto"), ("logistic", "adam"), ("mlp", "auto")])
def test_fit_finds_the_informative_layer(tmp_path, kind, solver):
    store, table = synthetic(tmp_path)
    cfg = ProbeConfig(kind=kind, hidden=8, epochs=30, patience=5, batch_size=64, bootstrap=50, lr=1e-2, solver=solver)
    ps = fit_probes(store, table, cfg, tmp_path / "probes")
    r = ps.report
    assert r["best_hook"] == HOOKS[1]
    noise, good, diff = (r["layers"][h] for h in HOOKS)
    assert good["auroc"] > 0.9 and good["auroc_within_problem"] > 0.9 and good["selectivity"] > 0.3
    assert good["auroc_ci"][0] <= good["auroc"] <= good["auroc_ci"][1]
    assert abs(noise["auroc"] - 0.5) < 0.15
    assert diff["auroc_within_problem"] < 0.7 and diff["selectivity"] < good["selectivity"] - 0.2
    assert set(r["baselines"]) == {"position", "bag_of_words"}
    assert 0 <= good["ece"] <= 1 and 0 <= good["brier"] <= 1
    test_problems = set(r["test_problems"])
    assert test_problems and len(test_problems) < 60
    # the artifact round-trips and predicts what the fit reported
    again = ProbeSet.open(tmp_path / "probes")
    p = again.predict_store(store)
    assert p.shape == (len(store),) and ((p >= 0) & (p <= 1)).all()
    rows = store.rows()
    test_rows = torch.tensor([store.manifest.trace_ids[int(t)] in test_problems for t in rows["trace"]])
    y = torch.tensor(table.targets["correct"])
    assert metrics.auroc(p[test_rows], y[test_rows]) == pytest.approx(good["auroc"], abs=1e-6)
    assert metrics.ece(p[test_rows], y[test_rows]) == pytest.approx(good["ece"], abs=1e-5)  # calibrated, as reported
    assert {"ece_raw", "brier_raw", "accuracy_raw"} <= set(good)


def test_platt_is_fitted_on_the_logits_predict_applies_it_to(tmp_path):
    store, table = synthetic(tmp_path, label=8.0)  # nearly separable: logits past the ±16.1 of logit(p, eps=1e-7)
    cfg = ProbeConfig(kind="logistic", bootstrap=10, weight_decay=0.0)
    ps = fit_probes(store, table, cfg, tmp_path / "probes")
    data = join_labels(store, table, cfg.target, cfg.test_fraction, cfg.val_fraction, cfg.seed)
    x = torch.cat(list(store.iter_batches(HOOKS[1], 8192)))
    z = ps.probe.layer_logits(x, 1)[0].detach().double()
    val = data.side == VAL
    assert z[data.row[val]].abs().max() > 17
    assert ps.calibration[HOOKS[1]] == pytest.approx(metrics.platt(z[data.row[val]], data.y[val]), abs=1e-5)


def test_best_layer_by_within_problem_auroc(tmp_path):
    """A weak within-problem signal (layer 1) against a strong difficulty signal (layer 2): pooled validation AUROC
    prefers the layer that reads difficulty, within-problem AUROC the one that reads the label."""
    store, table = synthetic(tmp_path, n_problems=120, label=0.06, spread=0.48)
    picked = {}
    for select_on in ("auroc", "auroc_within_problem"):
        ps = fit_probes(store, table, ProbeConfig(bootstrap=0, select_on=select_on), tmp_path / select_on)
        picked[select_on] = ps.best_hook
        assert ps.report["selected_on"] == f"val_{select_on}"
        layers = ps.report["layers"]
        assert ps.best_hook == max(HOOKS, key=lambda h: layers[h][f"val_{select_on}"])
    assert picked == {"auroc": HOOKS[2], "auroc_within_problem": HOOKS[1]}
    with pytest.raises(ValueError, match="select_on must be one of"):
        ProbeConfig(select_on="accuracy")


def test_probeset_refuses_other_models(tmp_path):
    store, table = synthetic(tmp_path, n_problems=20)
    ps = fit_probes(store, table, ProbeConfig(epochs=2, bootstrap=0), tmp_path / "probes")
    with pytest.raises(ValueError, match="width 8 given to probes of width 16"):
        ps.predict(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="weight hash"):
        ps.predict(torch.zeros(3, 16), weight_hash="sha256:other")
    with pytest.raises(KeyError, match="no probe for hook"):
        ps.predict(torch.zeros(3, 16), hook="blocks.7.hook_resid_post")
    with pytest.raises(ValueError, match="NaN"):
        ps.predict(torch.full((2, 16), math.nan))
    assert ps.predict(torch.zeros(2, 5, 16)).shape == (2, 5)
    with pytest.raises(ArtifactError):
        LabelTable.open(tmp_path / "probes")


def test_fit_bad_input_writes_nothing(tmp_path):
    store, table = synthetic(tmp_path, n_problems=20)
    one = LabelTable(**{**table.__dict__, "targets": {"correct": [1.0] * len(table)}})
    with pytest.raises(ValueError, match="one class only"):
        fit_probes(store, one, ProbeConfig(), tmp_path / "p")
    with pytest.raises(KeyError, match="no target 'safe_exit'"):
        fit_probes(store, table, ProbeConfig(target="safe_exit"), tmp_path / "p")
    with pytest.raises(ValueError, match="not in the store"):
        fit_probes(store, table, ProbeConfig(hooks="hook_mlp_out"), tmp_path / "p")
    other = LabelTable(**{**table.__dict__, "position": [p + 1 for p in table.position]})
    with pytest.raises(ValueError, match="no store row matches"), pytest.warns(UserWarning, match="have no store row"):
        fit_probes(store, other, ProbeConfig(), tmp_path / "p")
    with pytest.raises(ValueError, match="test_fraction"):
        ProbeConfig(test_fraction=1.5)
    assert not (tmp_path / "p").exists()
