"""One shard of feeds on disk: `shard-<key>.parquet` plus `shard-<key>.versions.json`.

Readers (the publish) look only at the final names, and a shard is written in a way that a
killed or concurrent writer can never leave them half-written or mixed:

- both files are written to temporary names unique to the writer and renamed into place, so
  a process killed mid-write leaves at most a temporary file, never a partial shard;
- a writer holds an exclusive lock on `shard-<key>.lock` from its first byte to its last
  rename. Two refreshes of the same shard (a schedule and a manual run, a retry racing the
  original) therefore write one after the other: the pair of files always comes from one
  run, and one writer cannot truncate the other's file. While holding the lock, temporary
  files of the shard can only be leftovers of a killed writer, so they are removed.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl

TMP_MARKER = ".tmp-"


def shard_path(directory: Path, key: str) -> Path:
    return directory / f"shard-{key}.parquet"


def versions_path(directory: Path, key: str) -> Path:
    return directory / f"shard-{key}.versions.json"


@contextmanager
def shard_lock(directory: Path, key: str) -> Iterator[None]:
    """Exclusive lock of one shard's files (released when the process dies, too)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / f"shard-{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def write_shard(directory: Path, key: str, feeds: pl.DataFrame, versions: dict[str, str]) -> Path:
    """Write one shard's feeds and model versions atomically; returns the Parquet path."""
    final, final_versions = shard_path(directory, key), versions_path(directory, key)
    with shard_lock(directory, key):
        for leftover in directory.glob(f"shard-{key}.*{TMP_MARKER}*"):
            leftover.unlink(missing_ok=True)
        token = f"{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}"
        tmp = final.with_name(final.name + token)
        tmp_versions = final_versions.with_name(final_versions.name + token)
        try:
            feeds.write_parquet(tmp)
            tmp_versions.write_text(json.dumps(versions))
            _fsync(tmp)
            os.replace(tmp, final)
            os.replace(tmp_versions, final_versions)
        finally:
            tmp.unlink(missing_ok=True)
            tmp_versions.unlink(missing_ok=True)
    return final


def read_versions(directory: Path, key: str) -> dict[str, str]:
    return json.loads(versions_path(directory, key).read_text())


def _fsync(path: Path) -> None:
    """Data on disk before the rename: after a power loss the name never points at a hole."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
