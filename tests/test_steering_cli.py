"""``steer`` commands and ``export`` through typer's CliRunner: outputs, and one ``error:`` line for bad input."""

from __future__ import annotations

import json

import numpy as np
import torch
from typer.testing import CliRunner

from reasonscope.cli import app  # mounts `steer` and `export` through their entry points
from steering.export import read_gguf
from steering.vector import SteeringVector, VectorMeta

from conftest import organisms, shared_data

runner = CliRunner()


def saved_vector(tmp_path, handle, layers=(1,)) -> str:
    g = handle.geometry
    torch.manual_seed(0)
    meta = VectorMeta(d_model=g.d_model, layers=layers, n_layers=g.n_layers, positions="last", gamma=2.0)
    SteeringVector(torch.randn(len(layers), g.d_model), meta).save(tmp_path / "vec")
    return str(tmp_path / "vec")


def user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_export_formats_and_errors(tmp_path, tiny_handle):
    src = saved_vector(tmp_path, tiny_handle)
    r = runner.invoke(app, ["export", "--in", src, "--format", "gguf", "--out", str(tmp_path / "v.gguf")])
    assert r.exit_code == 0, r.output
    directions, fields = read_gguf(tmp_path / "v.gguf")
    assert list(directions) == [1] and fields["controlvector.model_hint"] == "unknown"
    again = ["export", "--in", src, "--format", "gguf", "--out", str(tmp_path / "v.gguf")]
    user_error(runner.invoke(app, again), "already exists", "--overwrite")  # was replaced silently
    assert runner.invoke(app, [*again, "--overwrite"]).exit_code == 0
    back = ["export", "--in", str(tmp_path / "v.gguf"), "--format", "gguf", "--out", str(tmp_path / "v.gguf")]
    user_error(runner.invoke(app, [*back, "--overwrite"]), "is the --in file")
    (tmp_path / "e.steering.json").mkdir()  # where an EasySteer export's request would go
    es = ["export", "--in", src, "--format", "easysteer", "--out", str(tmp_path / "e.gguf")]
    user_error(runner.invoke(app, es), "e.steering.json is a directory")
    assert not (tmp_path / "e.gguf").exists()
    r = runner.invoke(app, ["export", "--in", src, "--format", "onnx", "--out", str(tmp_path / "x")])
    user_error(r, "--format", "gguf, easysteer, safetensors")
    r = runner.invoke(app, ["export", "--in", str(tmp_path / "nope"), "--format", "gguf", "--out", str(tmp_path / "x")])
    user_error(r, "--in", "does not exist")
    zero = saved_vector(tmp_path / "z", tiny_handle, layers=(0, 1))
    r = runner.invoke(app, ["export", "--in", zero, "--format", "gguf", "--out", str(tmp_path / "z.gguf")])
    user_error(r, "direction.0", "easysteer")
    assert not (tmp_path / "z.gguf").exists()
    torch.save(torch.randn(3, 8), tmp_path / "asc.pt")
    r = runner.invoke(
        app, ["export", "--in", str(tmp_path / "asc.pt"), "--format", "gguf", "--out", str(tmp_path / "a")]
    )
    user_error(r, "--layer")
    args = ["--in", str(tmp_path / "asc.pt"), "--format", "safetensors", "--out", str(tmp_path / "a.safetensors")]
    r = runner.invoke(app, ["export", *args, "--layer", "5"])
    assert r.exit_code == 0, r.output


def test_apply_prints_plain_and_steered_completions(tmp_path, tiny_model_dir, tiny_handle):
    src = saved_vector(tmp_path, tiny_handle)
    args = ["steer", "apply", "--vector", src, "--model", str(tiny_model_dir), "--prompt", "a=3. what is a?"]
    r = runner.invoke(app, [*args, "--gamma", "30", "--positions", "all", "--max-new-tokens", "8", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["gamma"] == 30.0 and out["positions"] == "all"
    assert out["completions"][0]["plain"] != out["completions"][0]["steered"]


def test_apply_grades_the_first_dataset_rows(tmp_path, tiny_model_dir, tiny_handle, r1_tiny_dir, monkeypatch):
    import steering.questions as questions_module
    from reasonscope.traces import load_hf_dataset

    gsm8k = shared_data("gsm8k/test.jsonl")
    seen: list[tuple[list[str], list[str | None], str | None]] = []
    real = questions_module.generate_traces

    def spy(handle, prompts, cfg, **kw):
        seen.append((list(prompts), list(kw["golds"]), kw["grader"]))
        return real(handle, prompts, cfg, **kw)

    monkeypatch.setattr(questions_module, "generate_traces", spy)
    src = saved_vector(tmp_path, tiny_handle)
    args = ["steer", "apply", "--vector", src, "--model", str(tiny_model_dir), "--n", "3"]
    r = runner.invoke(app, [*args, "--dataset", f"gsm8k:{gsm8k}", "--max-new-tokens", "4", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["plain"]["n"] == out["steered"]["n"] == 3 and "accuracy_by_difficulty" not in out["plain"]
    rows = load_hf_dataset(gsm8k)[:3]
    want = ([tiny_handle.chat_prompt(t.prompt, thinking=True) for t in rows], [t.gold for t in rows], "gsm8k")
    assert seen == [want, want]  # plain, then steered
    r1 = ["steer", "apply", "--vector", src, "--model", str(r1_tiny_dir), "--n", "3"]
    user_error(runner.invoke(app, r1), "the default questions are the organism task's", "--dataset")


def test_apply_and_asc_validate_before_loading(tmp_path, tiny_model_dir, tiny_handle):
    g = tiny_handle.geometry
    meta = VectorMeta(d_model=g.d_model + 1, layers=(0,))
    SteeringVector(torch.ones(1, g.d_model + 1), meta).save(tmp_path / "wide")
    base = ["steer", "apply", "--model", str(tiny_model_dir), "--prompt", "x"]
    user_error(runner.invoke(app, [*base, "--vector", str(tmp_path / "wide")]), "does not fit", "d_model")
    user_error(runner.invoke(app, [*base, "--vector", str(tmp_path / "none")]), "--vector", "does not exist")
    src = saved_vector(tmp_path, tiny_handle)
    user_error(runner.invoke(app, [*base, "--vector", src, "--positions", "middle"]), "--positions")
    no_prompt = ["steer", "apply", "--model", str(tiny_model_dir), "--vector", src]
    user_error(runner.invoke(app, no_prompt), "--prompt")
    asc = ["steer", "asc", "--model", str(tiny_model_dir), "--out", str(tmp_path / "asc")]
    user_error(runner.invoke(app, [*asc, "--layer", "7"]), "--layer 7")
    user_error(runner.invoke(app, [*asc, "--layers", "0,9"]), "--layers", "layer 9")
    user_error(runner.invoke(app, [*asc, "--layers", "0,1.5"]), "--layers", "block numbers")
    user_error(runner.invoke(app, [*asc, "--extract-at", "middle"]), "--extract-at")
    user_error(runner.invoke(app, [*asc, "--sweep", "a,b"]), "--sweep")
    user_error(runner.invoke(app, [*asc, "--epsilon", "0"]), "epsilon")
    user_error(runner.invoke(app, [*asc, "--gamma-rule", "best"]), "--gamma-rule")
    user_error(runner.invoke(app, [*asc, "--vector", "pca"]), "--vector")
    user_error(runner.invoke(app, [*asc, "--positions", "all"]), "--positions")
    user_error(runner.invoke(app, [*asc, "--vector", "learned", "--extract-at", "start"]), "extract_at")
    assert not (tmp_path / "asc").exists()


def _pairs_file(tmp_path) -> str:
    rows = [
        {"question": f"what is {i}+1?", "concise": f"{i}+1={i + 1}.", "verbose": f"let me see. {i}+1={i + 1}. yes."}
        for i in range(4)
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_asc_on_any_model_needs_its_pairs_and_questions(tmp_path, r1_tiny_dir):
    """A model that does not speak the organism format gets no organism questions or pairs by default: the command
    says what to pass, before the model loads; bad pair files name the line."""
    gsm8k = f"gsm8k:{shared_data('gsm8k/test.jsonl')}"
    asc = ["steer", "asc", "--model", str(r1_tiny_dir), "--out", str(tmp_path / "asc"), "--layer", "0"]
    user_error(runner.invoke(app, asc), "the default questions are the organism task's", "--dataset")
    user_error(runner.invoke(app, [*asc, "--dataset", gsm8k]), "--pairs-file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "concise": "a", "verbose": "b"}\n{"question": "q"}\n')
    user_error(runner.invoke(app, [*asc, "--dataset", gsm8k, "--pairs-file", str(bad)]), "bad.jsonl:2")
    few = tmp_path / "few.jsonl"
    few.write_text('{"question": "what is 1+1?", "answer": "#### 2"}\n')
    args = [*asc, "--dataset", f"gsm8k:{few}", "--pairs-file", _pairs_file(tmp_path)]
    user_error(runner.invoke(app, args), "has 1 rows", "--n-select")
    user_error(runner.invoke(app, [*asc, "--dataset", "gsm8k:/no/such.jsonl"]), "is not a file")
    user_error(runner.invoke(app, [*asc, "--dtype", "int3"]), "--dtype")
    assert not (tmp_path / "asc").exists()


def test_steer_asc_on_gsm8k_with_a_pairs_file(tmp_path, tiny_model_dir):
    gsm8k = shared_data("gsm8k/test.jsonl")
    args = ["steer", "asc", "--model", str(tiny_model_dir), "--out", str(tmp_path / "asc"), "--layers", "0,1"]
    args += ["--pairs-file", _pairs_file(tmp_path), "--dataset", f"gsm8k:{gsm8k}", "--n-select", "2"]
    args += ["--n-eval", "3", "--sweep", "0.5", "--max-new-tokens", "4", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["split"] == {"select": {"n": 2, "rows": [0, 2]}, "test": {"n": 3, "rows": [2, 5]}}
    assert out["config"]["grader"] == "gsm8k" and out["baseline"]["n"] == 3
    vec = SteeringVector.open(tmp_path / "asc")
    assert vec.meta.recipe["n_pairs_used"] == 4 and vec.layers == tuple(out["layers"])


def test_asc_apply_and_export_on_an_r1_format_model(tmp_path, r1_tiny_dir):
    """The real-model path end to end on the R1 tokenizer and chat format: ASC from a pairs file on GSM8K (a
    learned vector, one pair per forward pass), graded application, and the serving exports read back."""
    from steering.export import load_vector

    gsm8k = f"gsm8k:{shared_data('gsm8k/test.jsonl')}"
    model = ["--model", str(r1_tiny_dir)]
    args = ["steer", "asc", *model, "--pairs-file", _pairs_file(tmp_path), "--dataset", gsm8k, "--layers", "1"]
    args += ["--n-select", "2", "--n-eval", "2", "--sweep", "0.5", "--max-new-tokens", "6", "--vector", "learned"]
    args += ["--positions", "prompt", "--learn-steps", "2", "--learn-micro-batch", "1", "--out", str(tmp_path / "v")]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["layers"] == [1] and out["vector"] == "learned" and out["learned"]["n_pairs"] == 4
    r = runner.invoke(
        app, ["steer", "apply", *model, "--vector", str(tmp_path / "v"), "--n", "2", "--dataset", gsm8k, "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steered"]["n"] == 2
    vec = SteeringVector.open(tmp_path / "v")
    for fmt, name in (("gguf", "v.gguf"), ("easysteer", "es"), ("safetensors", "v.safetensors")):
        r = runner.invoke(app, ["export", "--in", str(tmp_path / "v"), "--format", fmt, "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    back = load_vector(tmp_path / "v.gguf")
    torch.testing.assert_close(back.direction(1), vec.direction(1))


@organisms
def test_steer_asc_json(tmp_path):
    args = ["steer", "asc", "--out", str(tmp_path / "asc"), "--n-eval", "6", "--n-select", "6", "--n-pairs", "8"]
    args += ["--sweep", "0.5"]
    r = runner.invoke(app, [*args, "--max-new-tokens", "128", "--batch-size", "8", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    for key in ("gamma", "gamma_rule", "baseline", "steered", "length_reduction", "sweep"):
        assert key in out
    assert {"accuracy", "mean_think_tokens"} <= set(out["baseline"]) and out["sweep"][0]["gamma"] == 0.5
    assert np.isfinite(out["kl_bound"]["gamma"])


def test_organism_defaults_are_refused_for_models_that_do_not_speak_them(tmp_path, r1_tiny_dir, tiny_model_dir):
    """Every command whose default questions are the organism task's refuses a model without the organisms' chat
    format (here the real R1 tokenizer) before it loads, naming what to pass; organism-format models keep them."""
    from reasonscope.cli_kit import organism_format
    from reasonscope.heads import CompressionPolicy, HeadMap

    m = str(r1_tiny_dir)
    HeadMap(torch.ones(2, 2), "window", "sha256:x", CompressionPolicy()).save(tmp_path / "map", {}, {})
    hybrid = ["steer", "hybrid", "--base", m, "--thinking", m, "--out", str(tmp_path / "o"), "--sae-layer", "1"]
    cases = [
        (["heads", "score", "--model", m, "--out", str(tmp_path / "o")], "--traces"),
        (["heads", "eval", "--model", m, "--map", str(tmp_path / "map")], "--dataset"),
        (["heads", "diff", "--base", m, "--model", m], "--dataset"),
        (["probe", "monitor", "--model", m], "--dataset"),
        (hybrid, "--dataset"),
    ]
    for args, fix in cases:
        user_error(runner.invoke(app, args), "the default questions are the organism task's", fix)
    assert not (tmp_path / "o").exists()
    assert organism_format(str(tiny_model_dir)) and organism_format("organism:base") and not organism_format(m)
    assert not organism_format("someone/some-hub-model")


def test_imported_vectors_need_a_strength_and_gguf_exports_say_where_llama_cpp_steers(
    tmp_path, tiny_model_dir, tiny_handle
):
    torch.save(torch.randn(3, tiny_handle.geometry.d_model), tmp_path / "asc.pt")
    args = ["steer", "apply", "--vector", str(tmp_path / "asc.pt"), "--layer", "1", "--model", str(tiny_model_dir)]
    user_error(runner.invoke(app, [*args, "--prompt", "x"]), "--gamma", "h - gamma*mean")
    r = runner.invoke(app, [*args, "--prompt", "x", "--gamma", "-0.5", "--max-new-tokens", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["gamma"] == -0.5
    sampled = [*args, "--prompt", "x", "--gamma", "1", "--max-new-tokens", "8", "--temperature", "1", "--json"]
    plain = [
        json.loads(runner.invoke(app, [*sampled, "--seed", str(k)]).stdout)["completions"][0]["plain"]
        for k in (0, 0, 1)
    ]
    assert plain[0] == plain[1] != plain[2]  # --seed picks the sampling stream
    src = saved_vector(tmp_path, tiny_handle)  # positions "last"
    r = runner.invoke(app, ["export", "--in", src, "--format", "gguf", "--out", str(tmp_path / "v.gguf")])
    assert r.exit_code == 0 and "every token" in r.output and "positions='last'" in r.output, r.output
