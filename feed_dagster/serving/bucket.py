"""Serving generations on an S3-compatible bucket, for readers on other machines.

The serving DuckDB file is a local file (DuckDB reads and writes only local files). When
the artifacts live on a bucket, every publish also puts its generation there:

    <root>/generations/<generation_id>.duckdb   the file, one immutable object
    <root>/CURRENT                              JSON naming the live generation's object

The generation's object is uploaded first, under a key no reader looks at until the pointer
names it (one PUT, or a completed multipart upload, which also appears at once); then the
pointer is replaced in one PUT. An upload cut off at any point leaves the previous pointer
naming the previous, complete object. A reader (`fetch_current`) reads the pointer, then
the object it names, checks its size and SHA-256 against the pointer, and swaps the copy
into place locally with a rename, so a local reader never sees a half-downloaded file.

Objects are never overwritten, so a reader that read the pointer just before a publish
still finds the object it names; a publish deletes only generations older than the last
KEEP_GENERATIONS.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl

from feed_dagster.artifacts import Location, filesystem, join
from feed_dagster.atomic import remove_temp, replace_atomically, temp_path_beside
from feed_dagster.serving.lookup import lookup_path_for, sweep_lookup_files, write_lookup
from feed_dagster.serving.read import read_served

POINTER = "CURRENT"
GENERATIONS = "generations"
SUFFIX = ".duckdb"
# Generations kept on the bucket besides the live one: a reader that read the previous
# pointer a moment before a publish still finds its object.
KEEP_GENERATIONS = 3


class GenerationNotFoundError(FileNotFoundError):
    """No generation has been published to the bucket yet, or the one named is gone."""


class GenerationCorruptError(ValueError):
    """A downloaded generation does not match the size or checksum its pointer records."""


@dataclass(frozen=True)
class BucketGeneration:
    """What the pointer records: the live generation and its object (relative to the
    root), with the size and SHA-256 a reader checks its copy against."""

    generation_id: str
    key: str
    bytes: int
    sha256: str

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> BucketGeneration:
        data = json.loads(raw)
        return cls(data["generation_id"], data["key"], int(data["bytes"]), data["sha256"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def upload_generation(serving_file: Path, generation_id: str, root: Location) -> BucketGeneration:
    """Put the serving file of `generation_id` on the bucket under `root` and make it the
    current generation: the object first, then the pointer, each in one PUT. Returns what
    the pointer now records."""
    key = f"{GENERATIONS}/{generation_id}{SUFFIX}"
    current = BucketGeneration(
        generation_id, key, serving_file.stat().st_size, _sha256(serving_file)
    )
    fs, object_path = filesystem(join(root, key))
    fs.put_file(str(serving_file), object_path)
    # Only now does any reader learn of the object.
    fs.pipe_file(filesystem(join(root, POINTER))[1], current.to_json())
    # The generation is live: a sweep that fails leaves old objects for the next publish to
    # delete, and must not fail this one (its retry would publish yet another generation).
    with contextlib.suppress(OSError):
        _sweep(root, keep={key})
    return current


def _sweep(root: Location, keep: set[str]) -> None:
    """Delete all but the newest KEEP_GENERATIONS generation objects (and never `keep`)."""
    fs, prefix = filesystem(join(root, GENERATIONS))
    try:
        listed = fs.ls(prefix, detail=True)
    except FileNotFoundError:
        return
    objects = sorted(
        (o for o in listed if o["name"].endswith(SUFFIX)),
        key=lambda o: o.get("LastModified") or o.get("mtime") or 0,
        reverse=True,
    )
    old = [
        o["name"]
        for o in objects[KEEP_GENERATIONS:]
        if f"{GENERATIONS}/{o['name'].rsplit('/', 1)[-1]}" not in keep
    ]
    if old:
        fs.rm(old)


def current_generation(root: Location) -> BucketGeneration:
    """The generation the pointer under `root` names; GenerationNotFoundError when nothing
    has been published there."""
    fs, path = filesystem(join(root, POINTER))
    try:
        return BucketGeneration.from_json(fs.cat_file(path))
    except FileNotFoundError as exc:
        raise GenerationNotFoundError(
            f"no serving generation on the bucket: {join(root, POINTER)} does not exist "
            "(materialise published_feeds with FEED_DAGSTER_ARTIFACTS_URI on a bucket first)"
        ) from exc


def fetch_current(root: Location, target: Path) -> BucketGeneration:
    """Download the current generation under `root` to the local serving file `target`,
    with its lookup file, and swap it into place atomically (a reader of `target` keeps the
    generation it opened). Nothing is downloaded when `target` already holds it. Raises
    GenerationNotFoundError or GenerationCorruptError and leaves `target` as it was."""
    current = current_generation(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and _generation_of(target) == current.generation_id:
        return current
    tmp = temp_path_beside(target)
    lookup = lookup_path_for(target, current.generation_id)
    lookup_tmp: Path | None = None
    try:
        _download(root, current, tmp)
        # The HTTP service's fast read path is derived from the file, as the publish does.
        con = duckdb.connect(str(tmp), read_only=True)
        try:
            lookup_tmp = write_lookup(con, "feeds", lookup, current.generation_id)
        finally:
            con.close()
        replace_atomically(lookup_tmp, lookup)
        replace_atomically(tmp, target)
    except BaseException:
        remove_temp(tmp)
        if lookup_tmp is not None:
            remove_temp(lookup_tmp)
        raise
    sweep_lookup_files(target, current.generation_id)
    return current


def _download(root: Location, generation: BucketGeneration, target: Path) -> None:
    """The object of `generation` to `target`, checked against the pointer's size and
    SHA-256."""
    fs, path = filesystem(join(root, generation.key))
    try:
        fs.get_file(path, str(target))
    except FileNotFoundError as exc:
        raise GenerationNotFoundError(f"{join(root, generation.key)} is gone") from exc
    size, digest = target.stat().st_size, _sha256(target)
    if (size, digest) != (generation.bytes, generation.sha256):
        raise GenerationCorruptError(
            f"{join(root, generation.key)}: {size} bytes, sha256 {digest}; the pointer "
            f"records {generation.bytes} bytes, sha256 {generation.sha256}"
        )


def read_live_served(root: Location | None, local: Path) -> pl.DataFrame | None:
    """(user_id, article_id) of the live feeds, for the previously-served filter of a shard
    run: with a bucket (`root`) holding a generation, that generation's, wherever the shard
    runs (a worker's local serving file may be older, or absent); read from `local` when
    it holds that generation, else from a temporary copy outside the storage root. Without
    one, the local file's (None before the first publish)."""
    if root is None:
        return read_served(local)
    try:
        current = current_generation(root)
    except GenerationNotFoundError:
        return read_served(local)
    if local.exists() and _generation_of(local) == current.generation_id:
        return read_served(local)
    with tempfile.TemporaryDirectory(prefix="feed-served-") as scratch:
        copy = Path(scratch) / f"{current.generation_id}{SUFFIX}"
        _download(root, current, copy)
        return read_served(copy)


def _generation_of(path: Path) -> str | None:
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error:
        return None
    try:
        row = con.execute("select generation_id from meta").fetchone()
    except duckdb.Error:
        return None
    finally:
        con.close()
    return row[0] if row else None
