"""One shard of feeds on disk: `shard-<key>.parquet`, the model versions in its footer.

Readers (the publish) look only at the final name, and a shard is written in a way that a
killed or concurrent writer can never leave it half-written or mixed:

- the file is written to a temporary name unique to the writer and renamed into place, so a
  process killed mid-write leaves at most a temporary file, never a partial shard; the
  model versions the feeds were built with travel in the same file's key-value metadata,
  so data and versions are replaced by one rename and always belong together;
- a writer holds an exclusive lock on `shard-<key>.lock` from its first byte to its
  rename. Two refreshes of the same shard (a schedule and a manual run, a retry racing the
  original) therefore write one after the other and never into each other's file. While
  holding the lock, temporary files of the shard can only be leftovers of a killed writer,
  so they are removed.
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
VERSIONS_KEY = "feed_dagster:versions"


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
    final = shard_path(directory, key)
    with shard_lock(directory, key):
        for leftover in directory.glob(f"shard-{key}.parquet{TMP_MARKER}*"):
            leftover.unlink(missing_ok=True)
        tmp = final.with_name(f"{final.name}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            feeds.write_parquet(tmp, metadata={VERSIONS_KEY: json.dumps(versions)})
            _fsync(tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    return final


def read_versions(directory: Path, key: str) -> dict[str, str]:
    """The model versions a shard was built with (from its footer; shards written before
    the footer held them have a `shard-<key>.versions.json` beside them)."""
    meta = pl.read_parquet_metadata(shard_path(directory, key))
    if VERSIONS_KEY in meta:
        return json.loads(meta[VERSIONS_KEY])
    return json.loads(versions_path(directory, key).read_text())


def _fsync(path: Path) -> None:
    """Data on disk before the rename: after a power loss the name never points at a hole."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
