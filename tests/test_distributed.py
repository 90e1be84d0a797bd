"""Ray: a local 2-worker cluster on CPU produces the same store as one process."""

from __future__ import annotations

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
