"""Tests for reasonscope.store (random tensors, tmp dirs; the SAELens test is the only slow one)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

import reasonscope.store.reader as reader
import reasonscope.store.writer as writer
from reasonscope.artifacts import ForeignArtifactError, IncompleteArtifactError, read_json, verify_artifact, write_json
from reasonscope.store import (
    ROW_KEYS,
    ActivationStore,
    CorruptShardError,
    StoreManifest,
    StoreWriteError,
    StoreWriter,
    weight_hash,
)
from reasonscope.store.manifest import record_path

H0, H1 = "blocks.0.hook_resid_post", "blocks.3.hook_resid_post"
HOOKS = {H0: 8, H1: 12}


def manifest(n_traces: int = 5, shard_size: int = 2, dtype: str = "float32", **kw) -> StoreManifest:
    args = dict(
        weight_hash="sha256:aaa",
        hooks=dict(HOOKS),
        positions="think",
        dtype=dtype,
        trace_ids=[f"t{i}" for i in range(n_traces)],
        shard_size=shard_size,
    )
    args.update(kw)
    return StoreManifest(**args)


def make_shard(m: StoreManifest, index: int, seed: int = 0):
    """Random activations for the traces of shard ``index``: 3-6 rows per trace, positions from 10."""
    g = torch.Generator().manual_seed(seed * 1000 + index)
    lo, hi = index * m.shard_size, min((index + 1) * m.shard_size, len(m.trace_ids))
    trace, pos, seg = [], [], []
    for t in range(lo, hi):
        n = int(torch.randint(3, 7, (1,), generator=g))
        trace += [t] * n
        pos += list(range(10, 10 + n))
        seg += [-1] + [(p - 10) // 2 for p in range(11, 10 + n)]
    n = len(trace)
    acts = {h: torch.randn(n, d, generator=g) for h, d in m.hooks.items()}
    rows = {
        "trace": torch.tensor(trace),
        "position": torch.tensor(pos),
        "token_id": torch.randint(0, 1000, (n,), generator=g),
        "segment": torch.tensor(seg),
    }
    return acts, rows


def build(path: Path, m: StoreManifest | None = None, finalize: bool = True, seed: int = 0):
    m = m or manifest()
    store = StoreWriter.create(path, m)
    written = {}
    for i in reversed(range(store.n_shards)):  # order of writing does not matter
        acts, rows = make_shard(m, i, seed)
        store.write_shard(i, acts, rows)
        written[i] = (acts, rows)
    if finalize:
        store.finalize()
    return store, written


def snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_round_trip(tmp_path):
    _, written = build(tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s")
    assert store.manifest.complete and store.n_shards == 3 and store.completed_shards() == [0, 1, 2]
    all_rows = {k: torch.cat([written[i][1][k] for i in range(3)]) for k in ROW_KEYS}
    all_acts = {h: torch.cat([written[i][0][h] for i in range(3)]) for h in HOOKS}
    assert len(store) == len(all_rows["trace"])
    for k, v in store.rows().items():
        assert torch.equal(v, all_rows[k])
    for h in HOOKS:
        assert torch.equal(store.get(h), all_acts[h])
        assert torch.equal(torch.cat(list(store.iter_batches(h, 4))), all_acts[h])
        sizes = [b.shape[0] for b in store.iter_batches(h, 4)]
        assert set(sizes[:-1]) == {4} and 1 <= sizes[-1] <= 4
    for t, tid in enumerate(store.manifest.trace_ids):
        sel = all_rows["trace"] == t
        x = all_acts[H1][sel]
        assert torch.equal(store.get(H1, trace=tid), x)
        assert torch.equal(store.get(H1, trace=t), x)
        seg = all_rows["segment"][sel]
        assert torch.equal(store.get(H1, trace=tid, segment=0), x[seg == 0])
        assert torch.equal(store.get(H1, trace=tid, positions=[10, 12]), x[[0, 2]])
    assert torch.equal(store.get(H0, segment=1), all_acts[H0][all_rows["segment"] == 1])
    with pytest.raises(KeyError, match="not captured"):
        store.get(H0, trace="t0", positions=[9])
    with pytest.raises(KeyError, match="not in this store"):
        store.get(H0, trace="nope")


def test_get_one_trace_opens_only_its_shard(tmp_path, monkeypatch):
    build(tmp_path / "s")
    opened: list[str] = []
    real = reader.safe_open

    def counting(path, *a, **kw):
        opened.append(Path(path).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(reader, "safe_open", counting)
    store = ActivationStore.open(tmp_path / "s")
    x = store.get(H0, trace="t3")  # t3 lives in shard 1 (shard_size 2)
    assert opened == ["shard-00001.safetensors"] and x.shape[1] == HOOKS[H0]


def test_resume_and_refuse_other_job(tmp_path):
    m = manifest()
    store = StoreWriter.create(tmp_path / "s", m)
    store.write_shard(0, *make_shard(m, 0))
    again = StoreWriter.create(tmp_path / "s", manifest())  # same job, fresh object
    assert again.completed_shards() == [0]
    again.write_shard(1, *make_shard(m, 1))
    assert StoreWriter.create(tmp_path / "s", manifest()).completed_shards() == [0, 1]

    before = snapshot(tmp_path / "s")
    with pytest.raises(
        ValueError, match=r"model weights sha256:aaa, this job has sha256:bbb.*another --out or delete it"
    ):
        StoreWriter.create(tmp_path / "s", manifest(weight_hash="sha256:bbb"))
    with pytest.raises(ValueError, match="has hooks"):
        StoreWriter.create(tmp_path / "s", manifest(hooks={H0: 8}))
    with pytest.raises(ValueError, match="at index 4"):
        StoreWriter.create(tmp_path / "s", manifest(trace_ids=["t0", "t1", "t2", "t3", "x"]))
    with pytest.raises(FileExistsError):
        StoreWriter.create(tmp_path / "s", manifest(), resume=False)
    assert snapshot(tmp_path / "s") == before

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not an activation store"):
        StoreWriter.create(tmp_path / "other", manifest())


def test_write_validation(tmp_path):
    m = manifest()
    store = StoreWriter.create(tmp_path / "s", m)
    acts, rows = make_shard(m, 0)
    with pytest.raises(
        ValueError, match=r"hook 'blocks.3.hook_resid_post': expected activations \[n_rows, 12\], got width 11"
    ):
        store.write_shard(0, {**acts, H1: acts[H1][:, :11]}, rows)
    with pytest.raises(ValueError, match="missing"):
        store.write_shard(0, {H0: acts[H0]}, rows)
    bad = acts[H0].clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"hook 'blocks.0.hook_resid_post': 1 non-finite"):
        store.write_shard(0, {**acts, H0: bad}, rows)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        store.write_shard(0, {**acts, H0: bad}, rows)
    with pytest.raises(ValueError, match="trace indices"):
        store.write_shard(0, acts, {**rows, "trace": rows["trace"] + 2})
    with pytest.raises(ValueError, match="shape"):
        store.write_shard(0, acts, {**rows, "position": rows["position"][:-1]})
    with pytest.raises(IndexError):
        store.write_shard(3, acts, rows)
    assert store.completed_shards() == []

    h16 = StoreWriter.create(tmp_path / "h", manifest(dtype="float16"))
    with pytest.raises(ValueError, match="overflow float16"):
        h16.write_shard(0, {**acts, H0: acts[H0] * 1e6}, rows)
    with pytest.raises(ValueError, match="non-finite.*--dtype bfloat16"):  # capture casts before the writer sees them
        h16.write_shard(0, {**acts, H0: (acts[H0] * 1e6).half()}, rows)


def test_unknown_hook_lists_valid_hooks(tmp_path):
    store, _ = build(tmp_path / "s")
    with pytest.raises(KeyError, match=r"unknown hook 'blocks.9.hook_resid_post'.*blocks.0.hook_resid_post"):
        store.get("blocks.9.hook_resid_post", trace=0)
    with pytest.raises(KeyError, match="unknown hook"):
        next(store.iter_batches("nope", 4))


def test_open_refuses_incomplete_missing_and_corrupt_manifest(tmp_path):
    m = manifest()
    store = StoreWriter.create(tmp_path / "s", m)
    store.write_shard(0, *make_shard(m, 0))
    with pytest.raises(ValueError, match=r"incomplete \(1 of 3 shards"):
        ActivationStore.open(tmp_path / "s")
    part = ActivationStore.open(tmp_path / "s", allow_incomplete=True)
    assert part.completed_shards() == [0] and part.get(H0, trace="t1").shape[0] > 0
    with pytest.raises(KeyError, match="not been captured"):
        part.get(H0, trace="t2")
    with pytest.raises(ValueError, match=r"2 shards missing \(first: \[1, 2\]\)"):
        store.finalize()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ActivationStore.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IncompleteArtifactError, match="no manifest.json.*re-run"):
        ActivationStore.open(tmp_path / "empty")
    (tmp_path / "s" / "manifest.json").write_text('{"model_id": "tin')
    with pytest.raises(ValueError, match="not valid JSON"):
        ActivationStore.open(tmp_path / "s", allow_incomplete=True)


def test_write_failure_leaves_no_partial_shard(tmp_path, monkeypatch):
    m = manifest()
    store = StoreWriter.create(tmp_path / "s", m)
    store.write_shard(0, *make_shard(m, 0))
    real = writer.save_file

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # half-written file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "save_file", disk_full)
    with pytest.raises(StoreWriteError, match=r"still readable up to the 1 shards already complete.*resumes") as ei:
        store.write_shard(1, *make_shard(m, 1))
    assert isinstance(ei.value, OSError) and ei.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path / "s" / "shards")) == [  # no temp, no partial
        "shard-00000.safetensors",
        "shard-00000.safetensors.record.json",
    ]
    part = ActivationStore.open(tmp_path / "s", allow_incomplete=True)
    assert part.completed_shards() == [0] and len(part) == len(make_shard(m, 0)[1]["trace"])

    monkeypatch.setattr(writer, "save_file", real)  # "re-running the same command resumes"
    resumed = StoreWriter.create(tmp_path / "s", manifest())
    for i in (1, 2):
        resumed.write_shard(i, *make_shard(m, i))
    resumed.finalize()
    assert ActivationStore.open(tmp_path / "s").completed_shards() == [0, 1, 2]


def test_bfloat16_storage(tmp_path):
    m = manifest(dtype="bfloat16")
    _, written = build(tmp_path / "s", m)
    store = ActivationStore.open(tmp_path / "s")
    x = store.get(H0, trace="t4")
    acts, rows = written[2]
    assert x.dtype == torch.bfloat16 and torch.equal(x, acts[H0][rows["trace"] == 4].to(torch.bfloat16))
    b = next(store.iter_batches(H0, 3))
    assert b.dtype == torch.float32 and torch.equal(b, written[0][0][H0][:3].to(torch.bfloat16).float())


def test_deterministic_bytes_and_rewrite(tmp_path):
    build(tmp_path / "a")
    store_b, _ = build(tmp_path / "b")
    for i in range(3):
        name = f"shards/shard-{i:05d}.safetensors"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    m = manifest()
    store_b.write_shard(1, *make_shard(m, 1))  # identical bytes: accepted, no-op
    with pytest.raises(FileExistsError, match="already captured"):
        store_b.write_shard(1, *make_shard(m, 1, seed=7))
    assert not [p for p in (tmp_path / "b" / "shards").iterdir() if p.name.endswith(".tmp")]


def test_rows_grouped_by_trace(tmp_path):
    m = manifest()
    store = StoreWriter.create(tmp_path / "s", m)
    acts, rows = make_shard(m, 0)
    perm = torch.randperm(len(rows["trace"]), generator=torch.Generator().manual_seed(3))
    store.write_shard(0, {h: a[perm] for h, a in acts.items()}, {k: v[perm] for k, v in rows.items()})
    part = ActivationStore.open(tmp_path / "s", allow_incomplete=True)
    sel = rows["trace"][perm] == 1
    assert torch.equal(part.get(H0, trace="t1"), acts[H0][perm][sel])


SHARD1 = Path("shards") / "shard-00001.safetensors"


def damage(path: Path, how: str) -> None:
    p = path / SHARD1
    if how == "deleted":
        p.unlink()
    elif how == "truncated":
        p.write_bytes(p.read_bytes()[:-7])
    else:  # 8 bytes overwritten inside the data, same size
        b = bytearray(p.read_bytes())
        b[-40:-32] = b"\x7f" * 8
        p.write_bytes(bytes(b))


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_deleted_or_truncated_shard_fails_open(tmp_path, how):
    build(tmp_path / "s")
    damage(tmp_path / "s", how)
    with pytest.raises(
        CorruptShardError, match=r"shard-00001.safetensors (is missing|has \d+ bytes).*re-run the capture"
    ):
        ActivationStore.open(tmp_path / "s")
    with pytest.raises(CorruptShardError):
        ActivationStore.open(tmp_path / "s", check="size")
    report = verify_artifact(tmp_path / "s")
    assert not report.ok and "shard-00001" in report.problems[0]


def test_deleted_shard_of_incomplete_store_fails_open(tmp_path):
    build(tmp_path / "s", finalize=False)
    damage(tmp_path / "s", "deleted")
    with pytest.raises(CorruptShardError, match="shard-00001.safetensors is missing"):
        ActivationStore.open(tmp_path / "s", allow_incomplete=True)


def test_altered_shard_is_an_error_on_every_read(tmp_path):
    build(tmp_path / "s")
    damage(tmp_path / "s", "altered")
    reads = {
        "get": lambda s: s.get(H0),
        "get_trace": lambda s: s.get(H1, trace="t2"),
        "iter_batches": lambda s: list(s.iter_batches(H0, 4)),
        "rows": lambda s: s.rows(),
        "to_hf_dataset": lambda s: s.to_hf_dataset(H0),
    }
    for read in reads.values():
        store = ActivationStore.open(tmp_path / "s")  # sizes match: opens
        with pytest.raises(CorruptShardError, match=r"shard-00001.safetensors does not match its manifest's sha256"):
            read(store)
    assert torch.isfinite(ActivationStore.open(tmp_path / "s").get(H0, trace="t0")).all()  # other shards still read
    fast = ActivationStore.open(tmp_path / "s", check="size")  # fast mode: sizes only
    assert fast.get(H0, trace="t0").shape[0] > 0
    report = verify_artifact(tmp_path / "s")
    assert not report.ok and report.files_checked == 2 and "sha256" in str(report)


def test_manifest_records_every_shard(tmp_path):
    build(tmp_path / "s")
    d = read_json(tmp_path / "s" / "manifest.json")
    assert d["kind"] == "activation_store" and d["format"] == 2 and d["complete"] and d["version"]
    assert d["created"] and d["inputs"]["model_weights"] == "sha256:aaa"
    assert sorted(d["files"]) == [f"shards/shard-0000{i}.safetensors" for i in range(3)]
    store = ActivationStore.open(tmp_path / "s")
    for name, rec in d["files"].items():
        p = tmp_path / "s" / name
        assert rec["size"] == p.stat().st_size and rec["sha256"].startswith("sha256:") and rec["rows"] > 0
    assert sum(r["rows"] for r in d["files"].values()) == len(store)
    assert not list((tmp_path / "s" / "shards").glob("*.record.json"))  # folded into the manifest
    assert verify_artifact(tmp_path / "s").ok


def test_foreign_or_unknown_format_is_refused_untouched(tmp_path):
    build(tmp_path / "s")
    mpath = tmp_path / "s" / "manifest.json"
    d = read_json(mpath)
    old = {k: v for k, v in d.items() if k not in ("kind", "format")}  # a format-1 (pre-artifact) manifest
    cases = [
        ({**d, "kind": "steering_vector"}, r"manifest.json describes a 'steering_vector' artifact"),
        ({**d, "format": 99}, "format 99.*reads format 2"),
        (old, "older reasonscope"),
    ]
    for bad, msg in cases:
        write_json(mpath, bad)
        before = snapshot(tmp_path / "s")
        with pytest.raises(ForeignArtifactError, match=msg):
            ActivationStore.open(tmp_path / "s")
        with pytest.raises(ForeignArtifactError, match=msg):
            StoreWriter.create(tmp_path / "s", manifest())
        assert not verify_artifact(tmp_path / "s").ok
        assert snapshot(tmp_path / "s") == before


def test_half_written_store_is_refused(tmp_path):
    m = manifest()
    store = StoreWriter.create(tmp_path / "s", m)
    store.write_shard(0, *make_shard(m, 0))
    with pytest.raises(ValueError, match="incomplete"):
        ActivationStore.open(tmp_path / "s")
    assert not verify_artifact(tmp_path / "s").ok
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(IncompleteArtifactError, match="no manifest.json"):
        ActivationStore.open(tmp_path / "s", allow_incomplete=True)


def test_killed_between_shard_and_record_recaptures(tmp_path):
    m = manifest()
    store = StoreWriter.create(tmp_path / "s", m)
    store.write_shard(0, *make_shard(m, 0))
    store.write_shard(1, *make_shard(m, 1))
    (tmp_path / "s" / (str(SHARD1) + ".record.json")).unlink()  # the shard landed, its record did not
    again = StoreWriter.create(tmp_path / "s", manifest())
    assert again.completed_shards() == [0]
    for i in (1, 2):
        again.write_shard(i, *make_shard(m, i))
    assert again.finalize().completed_shards() == [0, 1, 2]


def test_a_writer_that_another_completed_the_store_under_leaves_it_intact(tmp_path):
    """Two writers of one job: the one still running when the other finalized writes nothing more (its shards may
    differ in bytes: batching, GPUs) and finalizes to the finished store instead of reporting shards missing."""
    m = manifest()
    late = StoreWriter.create(tmp_path / "s", m)
    build(tmp_path / "s")  # another process captures and finalizes the same job meanwhile
    ref = (tmp_path / "s" / SHARD1).read_bytes()
    late.write_shard(1, *make_shard(m, 1, seed=7))  # other bytes
    assert (tmp_path / "s" / SHARD1).read_bytes() == ref
    store = late.finalize()
    assert store.manifest.complete and len(store.get(H0)) == len(store)
    assert not list((tmp_path / "s" / "shards").glob("*.record.json"))


@pytest.mark.parametrize("how", ["deleted", "altered"])
def test_resume_recaptures_deleted_shard_of_complete_store(tmp_path, how):
    build(tmp_path / "s")
    ref = (tmp_path / "s" / SHARD1).read_bytes()
    damage(tmp_path / "s", how)
    m = manifest()
    again = StoreWriter.create(tmp_path / "s", m)
    assert not again.manifest.complete and again.completed_shards() == [0, 2]
    again.write_shard(1, *make_shard(m, 1))
    store = again.finalize()
    assert (tmp_path / "s" / SHARD1).read_bytes() == ref and len(store.get(H0)) == len(store)


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_resume_of_an_unfinished_store_recaptures_a_lost_recorded_shard(tmp_path, how):
    """A recorded shard of an unfinished store that is now missing or cut short loses its record on resume, so the
    resumed job captures it again (before, its record kept it 'done' and finalize failed on every re-run)."""
    build(tmp_path / "s", finalize=False)
    ref = (tmp_path / "s" / SHARD1).read_bytes()
    damage(tmp_path / "s", how)
    m = manifest()
    again = StoreWriter.create(tmp_path / "s", m)
    assert again.completed_shards() == [0, 2]
    again.write_shard(1, *make_shard(m, 1))
    assert (tmp_path / "s" / SHARD1).read_bytes() == ref and len(again.finalize()) > 0


def test_a_shard_written_but_not_recorded_is_recaptured_even_if_different(tmp_path):
    """Killed between a shard's rename and its record: the resumed job's recapture replaces it, whatever its bytes
    (another token budget or GPU); a recorded shard is still never overwritten with other content."""
    m = manifest()
    w = StoreWriter.create(tmp_path / "s", m)
    w.write_shard(1, *make_shard(m, 1, seed=7))
    record_path(tmp_path / "s", 1).unlink()  # the kill
    again = StoreWriter.create(tmp_path / "s", m)
    assert 1 not in again.completed_shards()
    again.write_shard(1, *make_shard(m, 1))
    assert 1 in again.completed_shards()
    with pytest.raises(FileExistsError, match="already captured"):
        again.write_shard(1, *make_shard(m, 1, seed=7))


def test_files_respect_umask(tmp_path):
    old = os.umask(0o022)
    try:
        build(tmp_path / "s")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "s").rglob("*")}
    assert modes["manifest.json"] == 0o644 and modes["shard-00000.safetensors"] == 0o644 and modes["shards"] == 0o755


def test_weight_hash():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    b = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    b.load_state_dict(a.state_dict())
    ha = weight_hash(a)
    assert ha.startswith("sha256:") and ha == weight_hash(b) == weight_hash(a, chunk_elems=7)
    with torch.no_grad():
        b[2].bias[0] += 1e-3
    assert weight_hash(b) != ha
    assert weight_hash(a.to(torch.bfloat16)) != ha


def test_to_hf_dataset_layout(tmp_path):
    store, _ = build(tmp_path / "s", manifest(dtype="bfloat16"))
    ds = store.to_hf_dataset(H1)  # in memory, context_size 1
    assert len(ds) == len(store) and ds.features[H1].shape == (1, 12)
    ds.set_format("torch")
    assert torch.equal(ds[:][H1].reshape(-1, 12), store.get(H1).float())
    assert torch.equal(ds[:]["token_ids"].reshape(-1).long(), store.rows()["token_id"])

    out = tmp_path / "hf"
    ds4 = store.to_hf_dataset(H1, out, context_size=4)
    assert len(ds4) == len(store) // 4 and ds4.features[H1].shape == (4, 12)
    assert (out / "manifest.json").exists() and (out / "state.json").exists()
    ds4.set_format("torch")
    assert torch.equal(ds4[:][H1].reshape(-1, 12), store.get(H1).float()[: len(ds4) * 4])
    assert len(store.to_hf_dataset(H1, out, context_size=4)) == len(ds4)  # reused
    with pytest.raises(FileExistsError):
        store.to_hf_dataset(H1, out, context_size=2)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_to_hf_dataset_refuses_float16_overflow(tmp_path):
    m = manifest(dtype="bfloat16")
    w = StoreWriter.create(tmp_path / "s", m)
    for i in range(w.n_shards):
        acts, rows = make_shard(m, i)
        acts[H1][0, 0] = 7e4  # fits bfloat16, not float16
        w.write_shard(i, acts, rows)
    w.finalize()
    store = ActivationStore.open(tmp_path / "s")
    with pytest.raises(ValueError, match="overflows float16.*float32"):
        store.to_hf_dataset(H1, tmp_path / "hf", dtype="float16")
    assert not (tmp_path / "hf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert store.to_hf_dataset(H1, dtype="float32")[0][H1][0][0] == 70144.0  # 7e4 in bfloat16


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:All samples in the training dataset have been exhausted")
def test_saelens_trains_sae_from_store(tmp_path):
    """SAELens reads the store through its own cached-activations path and its trainer fits an SAE."""
    pytest.importorskip("sae_lens")
    from sae_lens import ActivationsStore, SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    # sparse synthetic data: each row = 2 of 24 unit directions in R^16 with random magnitudes
    g = torch.Generator().manual_seed(0)
    d, n_feat, per_trace, n_traces = 16, 24, 256, 16
    dirs = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=g), dim=1)
    m = StoreManifest(
        weight_hash="sha256:0",
        hooks={H0: d},
        positions="all",
        dtype="float32",
        trace_ids=[f"t{i}" for i in range(n_traces)],
        shard_size=4,
    )
    store = StoreWriter.create(tmp_path / "s", m)
    for i in range(store.n_shards):
        n = 4 * per_trace
        idx = torch.stack([torch.randperm(n_feat, generator=g)[:2] for _ in range(n)])
        coef = 1 + 2 * torch.rand(n, 2, generator=g)
        x = (coef[..., None] * dirs[idx]).sum(1)
        rows = {
            "trace": torch.arange(4 * i, 4 * i + 4).repeat_interleave(per_trace),
            "position": torch.arange(per_trace).repeat(4),
            "token_id": torch.randint(0, 50, (n,), generator=g),
            "segment": torch.full((n,), -1),
        }
        store.write_shard(i, {H0: x}, rows)
    store.finalize()
    store.to_hf_dataset(H0, tmp_path / "hf")  # the one call; SAELens reads this directory

    def sae_lens_store(mix: float) -> ActivationsStore:
        return ActivationsStore(
            model=None,
            dataset=None,
            streaming=False,
            hook_name=H0,
            hook_head_index=None,
            context_size=1,
            d_in=d,
            n_batches_in_buffer=512,
            total_training_tokens=len(store),
            store_batch_size_prompts=256,
            train_batch_size_tokens=128,
            prepend_bos=False,
            normalize_activations="none",
            device=torch.device("cpu"),
            dtype="float32",
            cached_activations_path=str(tmp_path / "hf"),
            activations_mixing_fraction=mix,
        )

    acts, tokens = sae_lens_store(0.5).get_raw_llm_batch()  # SAELens' own reader sees exactly our rows
    assert torch.equal(acts, store.get(H0)[:256]) and torch.equal(tokens.long(), store.rows()["token_id"][:256])

    torch.manual_seed(0)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=48, l1_coefficient=1e-3))
    held_out = next(store.iter_batches(H0, 1024))

    def mse() -> float:
        with torch.no_grad():
            return float(((sae(held_out) - held_out) ** 2).sum(-1).mean())

    before = mse()
    trainer = SAETrainer(
        SAETrainerConfig(total_training_samples=128 * 300, train_batch_size_samples=128, lr=3e-3, lr_end=3e-3),
        sae,
        data_provider=sae_lens_store(0.5),
    )
    trainer.fit()
    after = mse()
    print(f"SAE reconstruction MSE {before:.3f} -> {after:.3f}")
    assert after < 0.2 * before, (before, after)


class _Wrapped(torch.nn.Module):
    """Stands in for TransformerBridge, which wraps each HF module as ``<name>._original_component``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self._original_component = inner


def test_weight_hash_ignores_bridge_names_and_zero_biases():
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False))
    bridged = torch.nn.Sequential(_Wrapped(torch.nn.Linear(6, 4, bias=True)))
    with torch.no_grad():
        bridged[0]._original_component.weight.copy_(plain[0].weight)
        bridged[0]._original_component.bias.zero_()
    assert weight_hash(plain) == weight_hash(bridged)
    with torch.no_grad():
        bridged[0]._original_component.bias[0] = 1.0
    assert weight_hash(plain) != weight_hash(bridged)
