"""Ray: a local 2-worker cluster on CPU produces the same store as one process."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from reasonscope.capture import CaptureConfig, capture

from conftest import make_task_traces

ray = pytest.importorskip("ray")


def test_two_ray_workers_match_single_process(tiny_model_dir, tiny_handle, tmp_path):
    from reasonscope.distributed import capture_distributed

    traces = make_task_traces(tiny_handle.tokenizer, 20, seed=5)
    cfg = CaptureConfig(hooks=["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"], positions="think", shard_size=3)
    single = capture(tiny_handle, traces, cfg, str(tmp_path / "single"))
    try:
        dist = capture_distributed(str(tiny_model_dir), traces, cfg, str(tmp_path / "dist"), num_workers=2)
    finally:
        ray.shutdown()
    assert dist.manifest.complete and dist.manifest.fingerprint() == single.manifest.fingerprint()
    shards = lambda p: {f.name: f.read_bytes() for f in sorted((Path(p) / "shards").iterdir())}  # noqa: E731
    assert shards(tmp_path / "dist") == shards(tmp_path / "single")
    assert len(shards(tmp_path / "dist")) == 7


def test_a_job_ray_can_never_schedule_is_refused_and_ray_is_left_as_found(tiny_model_dir, tiny_handle, tmp_path):
    """More GPU workers than the instance has waited for ever; now it is refused at once, naming the fix, and the
    Ray instance the call started is shut down (a later call with more workers could never schedule on it)."""
    from reasonscope.distributed import capture_distributed

    traces = make_task_traces(tiny_handle.tokenizer, 4, seed=5)
    cfg = CaptureConfig(hooks=["blocks.0.hook_resid_post"], positions="think", shard_size=1)
    with pytest.raises(ValueError, match=r"has that many GPUs: capture on CPUs \(num_gpus_per_worker=0\)"):
        capture_distributed(str(tiny_model_dir), traces, cfg, str(tmp_path / "s"), 2, num_gpus_per_worker=1)
    assert not ray.is_initialized()
    with pytest.raises(OSError, match="nope") as e:  # a worker that cannot load its model: that error, not "died"
        capture_distributed(str(tmp_path / "nope"), traces, cfg, str(tmp_path / "s"), 1)
    assert "re-run" not in str(e.value)
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        capture_distributed(str(tiny_model_dir), traces, cfg, str(tmp_path / "s"), 0)


def test_more_workers_than_shards_and_a_relative_out(tiny_model_dir, tiny_handle, tmp_path, monkeypatch):
    """Workers beyond the shard count are not started; a relative ``out`` is the driver's (workers may run
    elsewhere: on a cluster started from another directory they wrote under that one)."""
    from reasonscope.distributed import capture_distributed

    traces = make_task_traces(tiny_handle.tokenizer, 4, seed=5)
    cfg = CaptureConfig(hooks=["blocks.0.hook_resid_post"], positions="think", shard_size=2)
    monkeypatch.chdir(tmp_path)
    killed: list = []
    kill = ray.kill
    monkeypatch.setattr(ray, "kill", lambda actor: (killed.append(actor), kill(actor)))
    store = capture_distributed(str(tiny_model_dir), traces, cfg, "rel", num_workers=5)  # 2 shards
    assert Path(store.path) == tmp_path / "rel" and store.manifest.complete and store.n_shards == 2
    assert len(killed) == 2  # the workers started (each is killed at the end)
    assert not ray.is_initialized()


def test_workers_hand_their_warnings_to_the_driver_with_the_whole_jobs_size(
    tiny_model_dir, tiny_handle, tmp_path, monkeypatch
):
    """Ray drops a worker's warnings; a worker returns them, and the store-creating call sizes the whole job (it
    writes no shard, so it estimated nothing and the >4 GiB warning never came)."""
    import reasonscope.capture as cap
    from reasonscope.distributed import _raise_again, _Worker

    traces = make_task_traces(tiny_handle.tokenizer, 6, seed=5)
    cfg = CaptureConfig(hooks=["blocks.0.hook_resid_post"], positions="think", shard_size=2)
    monkeypatch.setattr(cap, "LARGE_CAPTURE_BYTES", 0)
    worker = _Worker(str(tiny_model_dir), {})
    caught = worker.run([t.to_dict() for t in traces], asdict(cfg), str(tmp_path / "s"), None)
    rows = sum(t.think_span[1] - t.think_span[0] for t in traces)
    assert [name for name, _ in caught] == ["LargeCaptureWarning"] and f"({rows} rows" in caught[0][1]
    assert worker.run([t.to_dict() for t in traces], asdict(cfg), str(tmp_path / "s"), [0]) == []  # a share's size
    with pytest.warns(cap.LargeCaptureWarning, match=f"{rows} rows"):
        _raise_again(caught + caught)


def test_a_workers_error_is_raised_as_itself(tiny_model_dir, tiny_handle, tmp_path):
    """A worker's user error (a store made by another job) reaches the caller as that error, one message naming the
    fix, not Ray's traceback-wrapped task error."""
    from reasonscope.distributed import capture_distributed

    traces = make_task_traces(tiny_handle.tokenizer, 4, seed=5)
    cfg = CaptureConfig(hooks=["blocks.0.hook_resid_post"], positions="think", shard_size=2)
    capture(tiny_handle, traces, cfg, str(tmp_path / "s"))
    other = CaptureConfig(hooks=["blocks.0.hook_resid_post"], positions="think", shard_size=2, dtype="bfloat16")
    with pytest.raises(ValueError) as e:
        capture_distributed(str(tiny_model_dir), traces, other, str(tmp_path / "s"), num_workers=1)
    assert "dtype" in str(e.value) and "Traceback" not in str(e.value) and type(e.value) is ValueError


class _Nodes:
    """Ray's view of a cluster, for the scheduling check: ``nodes()`` as Ray returns them."""

    def __init__(self, *resources: dict) -> None:
        self._nodes = [{"Alive": True, "Resources": r} for r in resources] + [{"Alive": False, "Resources": {"GPU": 8}}]

    def nodes(self) -> list[dict]:
        return self._nodes


def test_the_scheduling_check_counts_what_fits_on_each_node():
    """Workers fit on one node each: 3 workers of 0.6 GPU on two 1-GPU nodes never schedule (the cluster's 2 GPUs
    would pass a total count, and the third worker waited for ever); a dead node holds none."""
    from reasonscope.distributed import _check_resources

    two = _Nodes({"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1})
    _check_resources(two, 2, 0.6)
    with pytest.raises(ValueError, match=r"hold 2 such workers: use num_workers \(--workers\) 2 or fewer"):
        _check_resources(two, 3, 0.6)
    _check_resources(_Nodes({"CPU": 8, "GPU": 2}), 4, 0.5)
    _check_resources(_Nodes({"CPU": 3}), 3, 0)
    with pytest.raises(ValueError, match="hold 3 such workers"):
        _check_resources(_Nodes({"CPU": 3}), 4, 0)
    with pytest.raises(ValueError, match="capture on CPUs"):
        _check_resources(_Nodes({"CPU": 8, "GPU": 1}), 1, 2)
