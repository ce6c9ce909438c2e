"""tasks/lib/atomic.py: a reader sees the old file or directory, or the new one, never half of one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.lib.atomic import staged_directory, write_bytes_atomic


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    write_bytes_atomic(target, b"abc")
    write_bytes_atomic(target, b"defg")
    assert target.read_bytes() == b"defg"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_a_staged_directory_replaces_the_target_whole(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with staged_directory(target) as staging:
        (staging / "new.txt").write_text("new")
        assert (target / "old.txt").exists()  # nothing visible changes while the new one is built
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and oct(target.stat().st_mode)[-3:] == "755"


def test_a_failed_build_leaves_the_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half-way"), staged_directory(target) as staging:
        (staging / "partial.txt").write_text("partial")
        raise RuntimeError("failed half-way")
    assert [p.name for p in target.iterdir()] == ["old.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]
