"""The artifact convention: atomic writes honouring the umask, manifests with hashes, checked opens."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from reasonscope.artifacts import (
    ArtifactDir,
    ArtifactError,
    CorruptFileError,
    ForeignArtifactError,
    IncompleteArtifactError,
    atomic_dir,
    atomic_file,
    find_artifacts,
    read_json,
    reading,
    verify_artifact,
    write_artifact,
)

KIND, FORMAT = "saelens_activations", 1


def make(out: Path, replace: bool = False) -> ArtifactDir:
    def files(tmp: Path) -> dict[str, int]:
        (tmp / "data").mkdir()
        (tmp / "data" / "a.bin").write_bytes(b"\x01" * 100)
        (tmp / "b.jsonl").write_text('{"x": 1}\n{"x": 2}\n')
        return {"b.jsonl": 2}

    return write_artifact(out, KIND, FORMAT, {"hook": "h"}, {"store": "sha256:0"}, files, replace=replace)


def write_then_fail(path: Path) -> None:
    with atomic_file(path) as f:
        f.write("half")
        raise RuntimeError("boom")


def test_atomic_file_respects_umask_and_leaves_nothing_on_error(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_file(tmp_path / "f.txt") as f:
            f.write("hi")
        with pytest.raises(RuntimeError, match="boom"):
            write_then_fail(tmp_path / "g.txt")
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.txt"]  # no g.txt, no temporaries


def test_atomic_dir_replaces_only_when_asked(tmp_path):
    with atomic_dir(tmp_path / "d") as d:
        (d / "x").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"), atomic_dir(tmp_path / "d") as d:
        pytest.fail("entering the context should have been refused")
    with atomic_dir(tmp_path / "d", replace=True) as d:
        (d / "y").write_text("new")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_replacing_a_directory_never_leaves_its_path_empty(tmp_path, monkeypatch):
    """The swap is one exchange where the system has it; where it has not, a failed second rename puts the old
    directory back (a crash between the two renames can only happen there)."""
    import reasonscope.artifacts as artifacts

    with atomic_dir(tmp_path / "d") as d:
        (d / "x").write_text("old")
    renames: list[tuple[str, str]] = []
    real = os.replace
    monkeypatch.setattr(artifacts.os, "replace", lambda a, b: (renames.append((str(a), str(b))), real(a, b))[1])
    with atomic_dir(tmp_path / "d", replace=True) as d:
        (d / "y").write_text("new")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["y"] and sorted(os.listdir(tmp_path)) == ["d"]
    if artifacts._exchange(tmp_path / "d", tmp_path / "d"):  # this system swaps in one step: no rename was made
        assert renames == []

    def second_fails(a, b):
        renames.append((str(a), str(b)))
        if len(renames) == 2:
            raise OSError("disk gone")
        return real(a, b)

    renames.clear()
    monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)
    monkeypatch.setattr(artifacts.os, "replace", second_fails)
    with pytest.raises(OSError, match="disk gone"), atomic_dir(tmp_path / "d", replace=True) as d:
        (d / "z").write_text("newer")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["y"]  # the old one is back
    assert sorted(os.listdir(tmp_path)) == ["d"]  # and no temporaries


def test_a_replace_killed_between_its_renames_says_where_the_old_directory_is(tmp_path, monkeypatch):
    """Outside Linux a crash between the two renames leaves the old directory in ``.NAME.old.*.tmp/``: opening
    the path names it and the command that moves it back, and moving it back restores the artifact."""
    import reasonscope.artifacts as artifacts

    make(tmp_path / "d")
    real = os.replace

    def killed(a, b):
        real(a, b)
        if Path(b).name == "d" and ".old." in str(b):
            raise KeyboardInterrupt  # stands in for SIGKILL: nothing after the first rename runs

    monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)
    monkeypatch.setattr(artifacts.os, "replace", killed)
    monkeypatch.setattr(artifacts.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing up
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "d", replace=True)
    with pytest.raises(FileNotFoundError, match="replacing it was interrupted") as err:
        ArtifactDir.open(tmp_path / "d", KIND, FORMAT)
    kept = next(tmp_path.glob(".d.old.*.tmp/d"))
    assert f"mv {kept} {tmp_path / 'd'}" in str(err.value)
    real(kept, tmp_path / "d")
    assert ArtifactDir.open(tmp_path / "d", KIND, FORMAT).manifest.kind == KIND


def test_files_a_library_writes_0600_get_the_umask(tmp_path):
    """safetensors creates its files 0o600; inside an artifact every file and directory follows the umask."""
    from safetensors.torch import save_file

    def files(tmp: Path) -> None:
        (tmp / "sub").mkdir(mode=0o700)
        save_file({"x": torch.zeros(2)}, str(tmp / "sub" / "t.safetensors"))

    old = os.umask(0o022)
    try:
        write_artifact(tmp_path / "a", KIND, FORMAT, {}, {}, files)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "a").rglob("*")}
    assert modes == {"sub": 0o755, "t.safetensors": 0o644, "manifest.json": 0o644}


def test_readers_name_a_garbled_file_or_a_manifest_missing_a_key(tmp_path):
    from safetensors.torch import save_file

    def files(tmp: Path) -> None:
        save_file({"x": torch.zeros(4)}, str(tmp / "t.safetensors"))
        (tmp / "r.json").write_text('{"a": 1}')

    write_artifact(tmp_path / "a", KIND, FORMAT, {"n": 1}, {}, files)
    art = ArtifactDir.open(tmp_path / "a", KIND, FORMAT)
    assert art.tensors("t.safetensors")["x"].shape == (4,) and art.json("r.json") == {"a": 1}
    for name, fill in (("t.safetensors", b"\xff"), ("r.json", b"\xff")):  # same size: only a hash would see it
        p = tmp_path / "a" / name
        p.write_bytes(fill * p.stat().st_size)
    with pytest.raises(CorruptFileError, match=r"t\.safetensors is not a readable safetensors file.*re-run"):
        art.tensors("t.safetensors")
    with pytest.raises(ArtifactError, match=r"r\.json is not valid JSON"):
        art.json("r.json")
    with pytest.raises(CorruptFileError, match="sha256"):
        art.tensors("t.safetensors", check="hash")
    with pytest.raises(CorruptFileError, match=r"has no data file 'nope'"):
        art.file("nope")
    with pytest.raises(CorruptFileError, match=r"cannot be read \(KeyError: 'shape'\).*re-run"), reading(art.path):
        art.manifest.config["shape"]
    with pytest.raises(CorruptFileError, match=r"AttributeError"), reading(art.path):
        art.manifest.config["n"].items()  # an int where a mapping was written
    with pytest.raises(CorruptFileError, match=r"^the reader's own message$"), reading(art.path):
        raise CorruptFileError("the reader's own message")  # passed through as it is


def test_find_artifacts_lists_each_once_and_a_directory_that_lost_its_manifest(tmp_path):
    make(tmp_path / "run" / "a")
    make(tmp_path / "run" / "fam" / "x")
    (tmp_path / "run" / "fam" / ".y.1.tmp").mkdir()  # a writer's temporary
    (tmp_path / "run" / "lost").mkdir()  # a stage without its manifest
    (tmp_path / "run" / "self").symlink_to(tmp_path / "run")  # a loop
    (tmp_path / "run" / "notes.txt").write_text("x")
    run = tmp_path / "run"
    assert find_artifacts(run) == [run / "a", run / "fam" / "x", run / "lost"]
    assert find_artifacts(run / "a") == [run / "a"] and find_artifacts(run / "notes.txt") == [run / "notes.txt"]
    assert [verify_artifact(p).ok for p in find_artifacts(run)] == [True, True, False]


def test_settling_permissions_leaves_linked_files_alone(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x")
    outside.chmod(0o444)

    def files(tmp: Path) -> None:
        (tmp / "link.bin").symlink_to(outside)
        os.link(outside, tmp / "hard.bin")

    write_artifact(tmp_path / "a", KIND, FORMAT, {}, {}, files)
    assert outside.stat().st_mode & 0o777 == 0o444


def test_manifest_lists_every_file(tmp_path):
    art = make(tmp_path / "a")
    d = read_json(tmp_path / "a" / "manifest.json")
    assert d["kind"] == KIND and d["format"] == FORMAT and d["complete"] and d["created"] and d["version"]
    assert d["config"] == {"hook": "h"} and d["inputs"] == {"store": "sha256:0"}
    assert d["files"]["data/a.bin"]["size"] == 100 and d["files"]["b.jsonl"]["rows"] == 2
    assert d["files"]["data/a.bin"]["rows"] is None
    again = ArtifactDir.open(tmp_path / "a", KIND, FORMAT, check="hash")
    assert again.manifest == art.manifest and again.file("b.jsonl").read_text().count("\n") == 2
    assert verify_artifact(tmp_path / "a").ok


@pytest.mark.parametrize("how", ["missing", "truncated", "altered"])
def test_damaged_file_is_refused_naming_it(tmp_path, how):
    make(tmp_path / "a")
    p = tmp_path / "a" / "data" / "a.bin"
    if how == "missing":
        p.unlink()
    elif how == "truncated":
        p.write_bytes(b"\x01" * 99)
    else:
        p.write_bytes(b"\x01" * 99 + b"\x02")
    check = "hash" if how == "altered" else "size"
    with pytest.raises(CorruptFileError, match=r"data/a.bin .*delete it and re-run"):
        ArtifactDir.open(tmp_path / "a", KIND, FORMAT, check=check)
    if how == "altered":
        ArtifactDir.open(tmp_path / "a", KIND, FORMAT)  # fast mode checks sizes only
    report = verify_artifact(tmp_path / "a")
    assert not report.ok and "a.bin" in str(report) and report.files_checked == 1


def test_foreign_half_written_and_unknown_are_refused(tmp_path):
    make(tmp_path / "a")
    with pytest.raises(
        ForeignArtifactError, match="describes a 'saelens_activations' artifact, not 'activation_store'"
    ):
        ArtifactDir.open(tmp_path / "a", "activation_store", 2)
    with pytest.raises(ForeignArtifactError, match="format 1.*reads format 7"):
        ArtifactDir.open(tmp_path / "a", KIND, 7)
    half = tmp_path / ".b.x1y2.tmp"
    half.mkdir()
    with pytest.raises(IncompleteArtifactError, match="temporary directory left by an interrupted write"):
        ArtifactDir.open(half, KIND, FORMAT)
    m = tmp_path / "a" / "manifest.json"
    m.write_text(json.dumps({**read_json(m), "complete": False}))
    with pytest.raises(IncompleteArtifactError, match="not marked complete"):
        ArtifactDir.open(tmp_path / "a", KIND, FORMAT)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ArtifactDir.open(tmp_path / "nope", KIND, FORMAT)
    m.write_text(json.dumps({**read_json(m), "kind": "mystery", "complete": True}))
    assert "unknown artifact kind 'mystery'" in str(verify_artifact(tmp_path / "a"))
    m.write_text("{not json")
    assert "not valid JSON" in str(verify_artifact(tmp_path / "a"))


def test_write_artifact_refuses_existing_unless_replace(tmp_path):
    make(tmp_path / "a")
    with pytest.raises(FileExistsError):
        make(tmp_path / "a")
    assert make(tmp_path / "a", replace=True).manifest.complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
