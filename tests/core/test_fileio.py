"""Atomic file writes: the target holds the old bytes or the new ones, never a mix or nothing."""

from __future__ import annotations

import pytest

from keye.fileio import atomic_path, atomic_write_text


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "report.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new ü")
    assert path.read_text(encoding="utf-8") == "new ü"
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "table.parquet"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.parquet"]


def test_fsync_path_writes_through(tmp_path):
    with atomic_path(tmp_path / "shard", fsync=True) as tmp:
        tmp.write_bytes(b"\x00\x01")
    assert (tmp_path / "shard").read_bytes() == b"\x00\x01"


def test_atomic_folder_replaces_the_old_folder_whole_or_leaves_it(tmp_path):
    from keye.fileio import atomic_folder, sha256_file

    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "half.txt").write_text("new")
        raise RuntimeError("killed half-way")
    assert [p.name for p in target.iterdir()] == ["stale.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_folder(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"abc")
    assert [p.name for p in target.iterdir()] == ["weights.bin"] and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sha256_file(target / "weights.bin") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
