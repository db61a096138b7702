"""Atomic file replacement: a reader looking at a path sees the old file or the new one,
never half of one, and a crash leaves one of the two on disk.

The new content goes to a uniquely named temporary file in the same directory (a rename
is atomic only within one file system, and a unique name keeps two overlapping writers
from writing into the same temporary file). The file is fsynced before `os.replace`, so
the rename never points at data still in the page cache, and the directory is fsynced
after it, so the rename itself survives a crash.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Temporary names are `<name>.tmp-<random>`: they never end in the final suffix, so
# globs such as `*.parquet` (the incoming-batch sensor, shard readers) never pick them up.
TMP_MARKER = ".tmp-"


def temp_path_beside(path: str | Path) -> Path:
    """A new, unused temporary name in the directory of `path`."""
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_path(path: str | Path) -> None:
    """Flush a file or a directory to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(tmp: str | Path, path: str | Path) -> None:
    """Move the finished, closed file `tmp` over `path`: fsync it, rename, fsync the
    directory."""
    tmp, path = Path(tmp), Path(path)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def remove_temp(tmp: str | Path) -> None:
    """Delete a temporary file (or a directory a writer made there), if present."""
    tmp = Path(tmp)
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write the new content of `path` to, with any writer
    (`df.write_parquet(tmp)`, `zipfile.ZipFile(tmp, "w")`, ...). When the block ends
    normally the file replaces `path` atomically; when it raises, the temporary file is
    removed and `path` keeps its old content. The parent directory is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(path)
    try:
        yield tmp
        replace_atomically(tmp, path)
    except BaseException:
        remove_temp(tmp)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Replace `path` with `data` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Replace `path` with `text` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)
