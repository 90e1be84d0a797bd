"""Capture engine: padding equivalence, backends, resume after SIGKILL, OOM back-off, bad input."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reasonscope.capture import (
    CaptureConfig,
    LargeCaptureWarning,
    capture,
    capture_batch,
    length_batches,
    select_positions,
)
from reasonscope.models import load_model
from reasonscope.store import ActivationStore
from reasonscope.traces.loaders import write_traces_jsonl

from conftest import make_task_traces

ALL_KINDS = [
    "blocks.0.hook_resid_pre",
    "blocks.0.attn.hook_z",
    "blocks.0.hook_attn_out",
    "blocks.1.hook_mlp_out",
    "blocks.1.hook_resid_post",
]


def store_tensors(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((Path(path) / "shards").glob("*.safetensors"))}


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_equals_one_by_one(tiny_model_dir, task_traces, padding_side):
    h = load_model(tiny_model_dir, attn_implementation="eager")
    hooks = ALL_KINDS + ["blocks.1.attn.hook_pattern"]
    cfg = CaptureConfig(hooks=hooks, positions="all", padding_side=padding_side)
    key_len = max(len(t.token_ids) for t in task_traces)
    pos = [select_positions(t, "all") for t in task_traces]
    batched = capture_batch(h, task_traces, pos, cfg, key_len)
    assert len({len(t.token_ids) for t in task_traces}) > 3  # real padding happens
    for i, t in enumerate(task_traces):
        single = capture_batch(h, [t], [pos[i]], cfg, key_len)
        for name in hooks:
            assert torch.allclose(batched[name][i], single[name][0], atol=1e-5), (padding_side, name, i)


def test_store_rows_match_direct_run(tiny_handle, task_traces, tmp_path):
    cfg = CaptureConfig(hooks=["blocks.1.hook_resid_post"], positions="think", shard_size=5, token_budget=400)
    store = capture(tiny_handle, task_traces, cfg, str(tmp_path / "s"))
    assert store.manifest.complete and store.n_shards == 3
    t = task_traces[4]
    ids = torch.tensor([t.token_ids])
    got = {}
    tiny_handle.run(ids, hooks={"blocks.1.hook_resid_post": lambda x: got.update(h=x[0].cpu())})
    a, b = t.think_span
    assert torch.allclose(store.get("blocks.1.hook_resid_post", trace=t.id), got["h"][a:b], atol=1e-5)
    rows = store.rows()
    mine = rows["trace"] == 4
    assert rows["position"][mine].tolist() == list(range(a, b))
    assert rows["token_id"][mine].tolist() == t.token_ids[a:b]
    seg = rows["segment"][mine]
    assert seg.min() >= 0 and seg.max() == len(t.segments) - 1


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_backends_capture_identical_tensors(tiny_model_dir, tiny_handle, task_traces, tmp_path, backend):
    cfg = CaptureConfig(hooks=ALL_KINDS, positions="segment_ends", shard_size=6)
    ref = capture(tiny_handle, task_traces, cfg, str(tmp_path / "hf"))
    other = capture(load_model(tiny_model_dir, backend=backend), task_traces, cfg, str(tmp_path / backend))
    for name in ALL_KINDS:
        assert torch.allclose(ref.get(name), other.get(name), atol=1e-5), name


@pytest.mark.parametrize("backend", ["hf", "transformer_lens", "nnsight"])
def test_capture_skips_the_layers_after_the_last_hook(tiny_model_dir, tiny_handle, task_traces, tmp_path, backend):
    """``stop_early`` (the default): no block after the last hooked one and no unembedding runs, on every backend;
    the stored tensors are the same as with the whole pass."""
    handle = tiny_handle if backend == "hf" else load_model(tiny_model_dir, backend=backend)
    calls: list[str] = []
    spies = [
        handle.model.get_output_embeddings().register_forward_hook(lambda *a: calls.append("unembed")),
        handle.model.model.layers[1].register_forward_hook(lambda *a: calls.append("block 1")),
    ]
    cfg = CaptureConfig(hooks=["blocks.0.hook_resid_post"])
    try:
        early = capture(handle, task_traces, cfg, str(tmp_path / "early"), progress=False)
        assert calls == []
        whole = capture(handle, task_traces, dataclasses.replace(cfg, stop_early=False), str(tmp_path / "whole"))
        assert "unembed" in calls
    finally:
        for spy in spies:
            spy.remove()
    assert store_tensors(early.path) == store_tensors(whole.path)


def test_position_rules(task_traces):
    t = task_traces[0]
    assert select_positions(t, "all").tolist() == list(range(len(t.token_ids)))
    assert select_positions(t, "think").tolist() == list(range(*t.think_span))
    assert select_positions(t, "segment_ends").tolist() == [s.end - 1 for s in t.segments]
    assert select_positions(t, "last").tolist() == [len(t.token_ids) - 1]
    t.meta["spans"] = [[2, 4], [3, 6]]
    assert select_positions(t, "spans").tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="unknown position rule"):
        select_positions(t, "middle")


def test_length_batches_respect_budget():
    lengths = [10, 50, 20, 50, 5, 30]
    batches = length_batches(lengths, 100)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(len(b) * max(lengths[i] for i in b) <= 100 for b in batches)


def test_bad_input_errors(tiny_handle, task_traces, tmp_path):
    with pytest.raises(ValueError, match="valid names"):
        capture(tiny_handle, task_traces, CaptureConfig(hooks=["blocks.0.resid"]), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="out of range"):
        capture(tiny_handle, task_traces, CaptureConfig(hooks=["blocks.9.hook_resid_post"]), str(tmp_path / "b"))
    no_think = [type(t)(**{**t.__dict__, "think_span": None}) for t in task_traces]
    with pytest.raises(ValueError, match="selects no token"):
        capture(tiny_handle, no_think, CaptureConfig(hooks=["blocks.0.hook_resid_post"]), str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


def test_config_typos_are_errors():
    for bad in [
        dict(positions="thinking"),
        dict(padding_side="rigth"),
        dict(dtype="bf15"),
        dict(token_budget=0),
        dict(shard_size=0),
        dict(hooks=[]),
    ]:
        with pytest.raises(ValueError, match="choose one of|positive integer|at least one hook"):
            CaptureConfig(**{"hooks": ["hook_resid_post"], **bad})
    cfg = CaptureConfig(hooks="blocks.*.hook_resid_post, blocks.1.attn.hook_z", dtype="bf16")
    assert cfg.dtype == "bfloat16" and cfg.hooks == ("blocks.*.hook_resid_post", "blocks.1.attn.hook_z")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dtype = "float32"  # type: ignore[misc]


def test_bad_traces_error_before_writing(tiny_handle, task_traces, tmp_path):
    cfg = CaptureConfig(hooks=["blocks.0.hook_resid_post"])
    vocab = tiny_handle.model.get_input_embeddings().num_embeddings
    oov = [dataclasses.replace(t) for t in task_traces]
    oov[3] = dataclasses.replace(oov[3], token_ids=[*oov[3].token_ids[:-1], vocab + 5])
    foreign = [dataclasses.replace(t) for t in task_traces]  # another tokenizer's ids, all within this vocabulary
    foreign[2] = dataclasses.replace(foreign[2], token_ids=[(x + 1) % vocab for x in foreign[2].token_ids])
    long = [dataclasses.replace(t) for t in task_traces]
    long[5] = dataclasses.replace(long[5], token_ids=long[5].token_ids * 100)
    cases = [
        ([], "no traces to capture"),
        (oov, rf"trace 't3' has token id {vocab + 5} at position \d+ .* outside this model's vocabulary"),
        (foreign, r"trace 't2' has token id \d+ where its thinking ends .* not this model's </think>"),
        (long, r"trace 't5' has \d+ tokens, longer than this model's context of 512"),
    ]
    for i, (traces, msg) in enumerate(cases):
        with pytest.raises(ValueError, match=msg):
            capture(tiny_handle, traces, cfg, str(tmp_path / f"s{i}"), progress=False)
        assert not (tmp_path / f"s{i}").exists()


def test_pattern_needs_eager_attention(tiny_handle, task_traces, tmp_path):
    assert tiny_handle.attn_implementation != "eager"
    with pytest.raises(ValueError, match="needs eager attention"):
        capture(tiny_handle, task_traces, CaptureConfig(hooks=["blocks.1.attn.hook_pattern"]), str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_large_capture_warns_with_size(tiny_handle, task_traces, tmp_path, monkeypatch):
    import reasonscope.capture as cap

    monkeypatch.setattr(cap, "LARGE_CAPTURE_BYTES", 1000)
    with pytest.warns(LargeCaptureWarning, match=r"about [\d.]+ GiB .* rows x 64 values"):
        capture(tiny_handle, task_traces, CaptureConfig(hooks="hook_resid_post"), str(tmp_path / "s"), progress=False)


def test_patterns_as_in_the_cli(tiny_handle, task_traces, tmp_path):
    store = capture(
        tiny_handle,
        task_traces,
        CaptureConfig(hooks="hook_resid_post,blocks.0-1.attn.hook_z"),
        str(tmp_path / "s"),
        progress=False,
    )
    assert list(store.manifest.hooks) == [
        "blocks.0.attn.hook_z",
        "blocks.0.hook_resid_post",
        "blocks.1.attn.hook_z",
        "blocks.1.hook_resid_post",
    ]


def test_changed_traces_are_named_on_resume(tiny_handle, task_traces, tmp_path):
    cfg = CaptureConfig(hooks=["blocks.0.hook_resid_post"], shard_size=4)
    capture(tiny_handle, task_traces, cfg, str(tmp_path / "s"), shards=[0], finalize=False, progress=False)
    before = store_tensors(tmp_path / "s")
    changed = [
        dataclasses.replace(t, token_ids=t.token_ids[:-1] + [7]) if i % 3 == 0 else t for i, t in enumerate(task_traces)
    ]
    with pytest.raises(ValueError, match=r"traces changed since this store was started: 4 of 12 differ \('t0', 't3'"):
        capture(tiny_handle, changed, cfg, str(tmp_path / "s"), progress=False)
    assert store_tensors(tmp_path / "s") == before


def test_resume_follows_content_not_path_or_backend(tiny_model_dir, tiny_handle, task_traces, tmp_path, monkeypatch):
    cfg = CaptureConfig(hooks=["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"], shard_size=3)
    clean = store_tensors(capture(tiny_handle, task_traces, cfg, str(tmp_path / "clean"), progress=False).path)
    out = str(tmp_path / "s")
    capture(tiny_handle, task_traces, cfg, out, shards=[0], finalize=False, progress=False)
    monkeypatch.chdir(tiny_model_dir.parent)
    for spelling, shard in [(str(tiny_model_dir) + "/", 1), (tiny_model_dir.name, 2)]:
        capture(load_model(spelling), task_traces, cfg, out, shards=[shard], finalize=False, progress=False)
    store = capture(load_model(tiny_model_dir, backend="transformer_lens"), task_traces, cfg, out, progress=False)
    assert store.manifest.complete and store.completed_shards() == [0, 1, 2, 3]
    got = store_tensors(out)
    assert {k: got[k] for k in list(got)[:3]} == {k: clean[k] for k in list(clean)[:3]}  # hf shards byte-identical
    ref = ActivationStore.open(tmp_path / "clean")
    assert torch.allclose(store.get("blocks.1.attn.hook_z"), ref.get("blocks.1.attn.hook_z"), atol=1e-5)


def test_store_from_other_model_is_refused(tiny_model_dir, task_traces, tmp_path):
    cfg = CaptureConfig(hooks=["blocks.0.hook_resid_post"], shard_size=4)
    capture(load_model(tiny_model_dir), task_traces, cfg, str(tmp_path / "s"))
    before = store_tensors(tmp_path / "s")
    other = load_model(tiny_model_dir)
    with torch.no_grad():
        other.model.model.layers[0].mlp.up_proj.weight.add_(0.01)
    other.__dict__.pop("weight_hash", None)
    with pytest.raises(ValueError, match="model weights"):
        capture(other, task_traces, cfg, str(tmp_path / "s"))
    assert store_tensors(tmp_path / "s") == before


def test_oom_backs_off_and_gives_same_rows(tiny_handle, task_traces, tmp_path, monkeypatch):
    cfg = CaptureConfig(hooks=["blocks.1.hook_resid_post"], positions="all", shard_size=12, token_budget=4096)
    clean = capture(tiny_handle, task_traces, cfg, str(tmp_path / "clean"))
    real_run = type(tiny_handle).run
    calls = {"oom": 0}

    def flaky(self, ids, mask=None, hooks=None):
        if ids.shape[0] > 2:
            calls["oom"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_run(self, ids, mask, hooks)

    monkeypatch.setattr(type(tiny_handle), "run", flaky)
    backed = capture(tiny_handle, task_traces, cfg, str(tmp_path / "oom"))
    assert calls["oom"] > 0
    assert torch.allclose(backed.get("blocks.1.hook_resid_post"), clean.get("blocks.1.hook_resid_post"), atol=1e-5)


CAPTURE_SCRIPT = """
import sys
from reasonscope.capture import CaptureConfig, capture
from reasonscope.models import load_model
from reasonscope.traces.loaders import read_traces_jsonl
h = load_model(sys.argv[1])
cfg = CaptureConfig(hooks=["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"], positions="all", shard_size=2,
                    token_budget=256)
capture(h, read_traces_jsonl(sys.argv[2]), cfg, sys.argv[3])
"""


@pytest.mark.slow
def test_sigkill_then_resume_gives_clean_bytes(tiny_model_dir, tiny_handle, tmp_path):
    traces = make_task_traces(tiny_handle.tokenizer, 160, seed=3)
    write_traces_jsonl(tmp_path / "t.jsonl", traces)
    script = tmp_path / "cap.py"
    script.write_text(CAPTURE_SCRIPT)
    cmd = [sys.executable, str(script), str(tiny_model_dir), str(tmp_path / "t.jsonl")]
    subprocess.run(cmd + [str(tmp_path / "clean")], check=True, timeout=300)

    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + [str(out)])
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "shards").glob("*.safetensors"))) < 3:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = ActivationStore.open(out, allow_incomplete=True)
    assert not partial.manifest.complete and 0 < len(partial.completed_shards()) < partial.n_shards
    subprocess.run(cmd + [str(out)], check=True, timeout=300)  # the same command resumes
    assert store_tensors(out) == store_tensors(tmp_path / "clean")
    assert ActivationStore.open(out).manifest.complete
    assert not list((out / "shards").glob(".*tmp"))


def test_positions_out_of_order_or_out_of_range_are_sorted_or_refused_naming_the_trace():
    from reasonscope.capture import select_positions
    from reasonscope.traces.record import Segment, Trace

    segs = [Segment("a", 5, 10, 0, 1), Segment("c", 20, 30, 4, 5), Segment("b", 12, 15, 2, 3)]
    t = Trace(
        id="t1", prompt="p", thinking="abc", answer="", token_ids=list(range(40)), think_span=(1, 39), segments=segs
    )
    assert select_positions(t, "segment_ends").tolist() == [9, 14, 29]
    bad = Trace(**{**t.__dict__, "segments": [segs[0], Segment("x", 50, 60, 1, 2), segs[1]]})
    with pytest.raises(ValueError, match="'t1'.*position 59, outside its 40 tokens"):
        select_positions(bad, "segment_ends")
