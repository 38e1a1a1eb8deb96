"""bindweave.atomic: every file and folder the project writes is written whole or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from bindweave import atomic
from bindweave.atomic import AtomicPath, write_atomic


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_success_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "shard-000000.tar"
    target.write_bytes(b"old")
    with AtomicPath(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".shard-000000.tar.tmp-")
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # a reader sees the old file until the rename
        assert [p.name for p in tmp_path.glob("*.tar")] == ["shard-000000.tar"]  # globs of real files skip it
    assert target.read_bytes() == b"new" and names(tmp_path) == ["shard-000000.tar"]
    assert write_atomic(tmp_path / "sub" / "a.json", b"{}") == tmp_path / "sub" / "a.json"  # folder created
    assert (tmp_path / "sub" / "a.json").read_bytes() == b"{}" and names(tmp_path / "sub") == ["a.json"]


def test_a_new_file_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        mode = stat.S_IMODE(write_atomic(tmp_path / "a.png", b"x").stat().st_mode)
    finally:
        os.umask(umask)
    assert mode == 0o644  # 0o666 less the umask, not a temporary file's 0o600


def test_a_failure_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "v.mp4"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with AtomicPath(target) as tmp:
            tmp.write_bytes(b"half a vid")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and names(tmp_path) == ["v.mp4"]
    with pytest.raises(RuntimeError):  # no old file: none afterwards either
        with AtomicPath(tmp_path / "new.mp4") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert names(tmp_path) == ["v.mp4"]


def test_a_failing_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "cache.json"
    target.write_bytes(b"old")

    def full_disk(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", full_disk)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and names(tmp_path) == ["cache.json"]


def test_explicit_commit_and_discard(tmp_path):
    """What AtomicShard uses: the temporary stays open across calls, then is committed or dropped."""
    kept, dropped = AtomicPath(tmp_path / "a.tar"), AtomicPath(tmp_path / "b.tar")
    kept.tmp.write_bytes(b"a")
    dropped.tmp.write_bytes(b"b")
    assert kept.commit() == tmp_path / "a.tar"
    dropped.discard()
    assert names(tmp_path) == ["a.tar"] and (tmp_path / "a.tar").read_bytes() == b"a"


def test_a_folder_is_swapped_in_whole(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"old")
    (export / "config.yaml").write_text("old")
    with pytest.raises(RuntimeError):
        with AtomicPath(export, folder=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"new")
            raise RuntimeError("interrupted")
    assert names(tmp_path) == ["export"] and (export / "model.safetensors").read_bytes() == b"old"
    with AtomicPath(export, folder=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
        assert (export / "config.yaml").exists()  # the old folder is whole until the swap
    assert names(tmp_path) == ["export"] and names(export) == ["model.safetensors"]
    assert (export / "model.safetensors").read_bytes() == b"new"
