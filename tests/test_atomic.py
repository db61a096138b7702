"""The atomic-write helper: right content, nothing left behind, the old file kept on failure."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest

from feed_dagster import atomic
from feed_dagster.atomic import atomic_path, temp_path_beside, write_bytes_atomic, write_text_atomic


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if atomic.TMP_MARKER in p.name)


def test_writes_the_content_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.txt"  # the directory is created
    assert write_text_atomic(path, "first\n") == path
    assert path.read_text() == "first\n"
    write_bytes_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    frame = pl.DataFrame({"x": [1, 2, 3]})
    with atomic_path(tmp_path / "sub" / "f.parquet") as tmp:
        assert tmp.parent == path.parent and not tmp.name.endswith(".parquet")
        frame.write_parquet(tmp)
    assert pl.read_parquet(tmp_path / "sub" / "f.parquet").equals(frame)
    assert _leftovers(path.parent) == []


def test_a_failure_mid_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_path(path) as tmp:
        tmp.write_text("half of the ne")
        raise RuntimeError("disk on fire")
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_a_failed_rename_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "a.txt"
    write_text_atomic(path, "old")

    def refuse(src, dst):
        raise OSError("rename refused")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OSError, match="rename refused"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_file_and_directory_are_fsynced_around_the_rename(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    real_fsync, real_replace = atomic.fsync_path, os.replace
    monkeypatch.setattr(atomic, "fsync_path", lambda p: calls.append(f"fsync {Path(p).name}"))
    monkeypatch.setattr(
        atomic.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))
    )
    write_text_atomic(tmp_path / "a.txt", "x")
    assert calls[0].startswith("fsync a.txt" + atomic.TMP_MARKER)
    assert calls[1:] == ["replace", f"fsync {tmp_path.name}"]
    real_fsync(tmp_path)  # a directory can be fsynced on this platform


def test_temporary_names_are_unique(tmp_path: Path) -> None:
    path = tmp_path / "article_embeddings.parquet"
    names = {temp_path_beside(path) for _ in range(100)}
    assert len(names) == 100
    assert all(n.parent == tmp_path and n.name.startswith(path.name) for n in names)
