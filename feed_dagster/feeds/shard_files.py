"""One shard of feeds: `shard-<key>.parquet`, the model versions in its footer, in a local
directory or under a bucket prefix (feed_dagster/artifacts.py).

Readers (the publish) look only at the final name, and a shard is written in a way that a
killed or concurrent writer can never leave it half-written or mixed:

- the file is written whole to a temporary local file first, then renamed into place
  (local) or uploaded in one PUT (bucket), so a process killed mid-write leaves at most a
  temporary file, never a partial shard; the model versions the feeds were built with
  travel in the same file's key-value metadata, so data and versions are replaced by one
  rename or one PUT and always belong together;
- locally, a writer holds an exclusive lock on `shard-<key>.lock` from its first byte to its
  rename. Two refreshes of the same shard (a schedule and a manual run, a retry racing the
  original) therefore write one after the other and never into each other's file. While
  holding the lock, temporary files of the shard can only be leftovers of a killed writer,
  so they are removed. A bucket needs no lock: each PUT replaces the object whole, the
  last one wins, and no temporary object is ever made.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import overload

import polars as pl

from feed_dagster.artifacts import Location, download, filesystem, is_remote, join, writing
from feed_dagster.atomic import TMP_MARKER, remove_temp, temp_path_beside

VERSIONS_KEY = "feed_dagster:versions"


@overload
def shard_path(directory: Path, key: str) -> Path: ...
@overload
def shard_path(directory: Location, key: str) -> Location: ...
def shard_path(directory: Location, key: str) -> Location:
    """The shard's Parquet file: a Path in a local directory, a URL under a bucket prefix."""
    return join(directory, f"shard-{key}.parquet")


def versions_path(directory: Location, key: str) -> Location:
    return join(directory, f"shard-{key}.versions.json")


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


def write_shard(
    directory: Location, key: str, feeds: pl.DataFrame, versions: dict[str, str]
) -> Location:
    """Write one shard's feeds and model versions atomically; returns the Parquet file's
    location (see the module docstring)."""
    final = shard_path(directory, key)
    local = not is_remote(directory)
    with shard_lock(Path(directory), key) if local else nullcontext():
        if local:
            for leftover in Path(directory).glob(f"shard-{key}.parquet{TMP_MARKER}*"):
                leftover.unlink(missing_ok=True)
        with writing(final) as tmp:
            feeds.write_parquet(tmp, metadata={VERSIONS_KEY: json.dumps(versions)})
    return final


def read_versions(directory: Location, key: str) -> dict[str, str]:
    """The model versions a shard was built with (from its footer; shards written before
    the footer held them have a `shard-<key>.versions.json` beside them)."""
    fs, path = filesystem(shard_path(directory, key))
    # The footer only: a few small range reads of the file or object, not the feeds.
    with fs.open(path, "rb") as f:
        meta = pl.read_parquet_metadata(f)
    if VERSIONS_KEY in meta:
        return json.loads(meta[VERSIONS_KEY])
    fs, path = filesystem(versions_path(directory, key))
    return json.loads(fs.cat_file(path))


def missing_shards(directory: Location, keys: Sequence[str]) -> list[str]:
    """The file names of the shards of `keys` that do not exist under `directory`."""
    fs, base = filesystem(directory)
    names = [f"shard-{k}.parquet" for k in keys]
    return [n for n in names if not fs.exists(f"{base.rstrip('/')}/{n}")]


@contextmanager
def local_shards(directory: Location, keys: Sequence[str], beside: Path) -> Iterator[Path]:
    """A local directory holding the shard files of `keys`: `directory` itself when it is
    local, else a copy of each object downloaded into a new folder beside the local file
    `beside` (the serving file; removed after). The publish then measures, checks and
    loads one set of bytes, which a shard run rewriting its object meanwhile cannot change
    halfway."""
    if not is_remote(directory):
        yield Path(directory)
        return
    # The serving file's temporary name: a publish killed here leaves a folder that a later
    # publish sweeps away with its other leftovers (serving/publish.py).
    folder = temp_path_beside(beside)
    folder.mkdir(parents=True)
    try:
        for key in keys:
            download(shard_path(directory, key), shard_path(folder, key))
        yield folder
    finally:
        remove_temp(folder)
