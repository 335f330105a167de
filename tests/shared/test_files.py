from __future__ import annotations

from pathlib import Path

import pytest

from shared.files import atomic_path, atomic_write_bytes, atomic_writer


def test_the_new_content_replaces_the_old(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "mask.png"  # missing folders are created
    atomic_write_bytes(path, b"first")
    assert atomic_write_bytes(path, b"second") == path
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["mask.png"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_writer(path) as f:
        f.write(b"half of the ne")
        raise RuntimeError("the encoder failed")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]


def test_a_durable_write_removes_what_a_killed_writer_left(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    stale = tmp_path / ".last.pt.abc123.tmp"
    stale.write_bytes(b"torn")
    other = tmp_path / ".best.pt.abc123.tmp"  # another file's writer may still be at work
    other.write_bytes(b"in progress")
    with atomic_writer(path, durable=True) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"
    assert not stale.exists() and other.exists()


def test_a_writer_by_name_replaces_the_file_only_when_it_is_done(tmp_path: Path) -> None:
    path = tmp_path / "scene.tif"
    path.write_bytes(b"old")
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"new")
        assert tmp.parent == tmp_path and path.read_bytes() == b"old"  # readers see the old one
    assert path.read_bytes() == b"new"
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half of the ne")
        raise RuntimeError("GDAL failed")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["scene.tif"]
