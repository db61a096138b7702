"""Artifacts on a local directory or an S3-compatible bucket, through one fsspec filesystem.

A location is a local `Path` or a URL string (`s3://bucket/prefix/...`, endpoint and
credentials from the usual AWS_* variables, read when a filesystem is built). The shard
files, the article embeddings and the LanceDB vector table live at such locations, and so
do the warehouse's tables as Parquet files on a bucket (data/warehouse_store.py); the
DuckDB files stay local because DuckDB writes only local files.

Every artifact appears whole or not at all, whatever the location:
- local: written to a temporary name beside the target, fsynced and renamed into place
  (feed_dagster/atomic.py);
- object store: written to a local temporary file first, then uploaded in one PUT (a
  completed multipart upload for files past s3fs's threshold, which also appears at once).
  No temporary object is ever created where a reader lists or looks, and an upload that
  fails or is cut off leaves the previous object, or none.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import fsspec
import polars as pl
from fsspec.implementations.local import LocalFileSystem

from feed_dagster.atomic import atomic_path

Location = str | Path


class ArtifactsUnavailable(OSError):
    """The artifacts' bucket does not exist or cannot be reached (endpoint, credentials)."""


def as_location(value: str) -> Location:
    """A configured root: a URL stays a string (`file://` becomes its path), anything else
    is a resolved local Path."""
    if value.startswith("file://"):
        return Path(value.removeprefix("file://")).resolve()
    return value.rstrip("/") if "://" in value else Path(value).resolve()


def is_remote(location: Location) -> bool:
    """Whether `location` is an object-store URL rather than a local path."""
    return isinstance(location, str) and "://" in location


def join(location: Location, *parts: str) -> Location:
    """`location/part/...`, of the same kind as `location` (a Path or a URL)."""
    if isinstance(location, Path):
        return location.joinpath(*parts)
    return "/".join([location.rstrip("/"), *parts])


def filesystem(location: Location) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) of `location`.

    A new filesystem every time, without a listings cache: other processes (shard runs, a
    publish) change the bucket while this one works, and the AWS_* variables are read now,
    not when some earlier filesystem for the same bucket was built."""
    return fsspec.url_to_fs(str(location), use_listings_cache=False, skip_instance_cache=True)


def exists(location: Location) -> bool:
    fs, path = filesystem(location)
    return fs.exists(path)


def read_parquet(location: Location) -> pl.DataFrame:
    """A Parquet file at `location`: memory-mapped locally, one GET from a bucket."""
    if not is_remote(location):
        return pl.read_parquet(location)
    fs, path = filesystem(location)
    return pl.read_parquet(io.BytesIO(fs.cat_file(path)))


@contextmanager
def writing(location: Location) -> Iterator[Path]:
    """A local temporary path to write the new content of `location` to, with any writer
    (`df.write_parquet(tmp)`). When the block ends normally the file becomes `location`
    whole (a rename locally, one upload to a bucket); when it raises, nothing is written
    and `location` keeps its old content."""
    if not is_remote(location):
        with atomic_path(location) as tmp:
            yield tmp
        return
    fs, path = filesystem(location)
    with tempfile.TemporaryDirectory(prefix="feed-artifact-") as scratch:
        tmp = Path(scratch) / path.rsplit("/", 1)[-1]
        yield tmp
        fs.put_file(str(tmp), path)


@contextmanager
def writing_all(locations: Sequence[Location]) -> Iterator[list[Path]]:
    """As `writing`, for several files written together: one temporary path each, and when
    the block ends normally every file becomes its location whole; on a bucket they are
    uploaded concurrently, each in one PUT (a sequence of single uploads costs a round trip
    per file). Each location is whole at every moment, but they do not all change at one
    instant: a reader may see some new files beside the previous others."""
    remote = [loc for loc in locations if is_remote(loc)]
    if not remote:
        with ExitStack() as stack:
            yield [stack.enter_context(atomic_path(Path(loc))) for loc in locations]
        return
    if len(remote) != len(locations):
        raise ValueError(f"writing_all: mixed local and remote locations {list(locations)}")
    fs, _ = filesystem(locations[0])
    paths = [filesystem(loc)[1] for loc in locations]
    with tempfile.TemporaryDirectory(prefix="feed-artifact-") as scratch:
        tmps = [Path(scratch) / str(i) / p.rsplit("/", 1)[-1] for i, p in enumerate(paths)]
        for tmp in tmps:
            tmp.parent.mkdir()
        yield tmps
        if tmps:
            fs.put([str(t) for t in tmps], paths)


def download(location: Location, target: Path) -> Path:
    """Copy the file at `location` to the local path `target`; returns `target`."""
    fs, path = filesystem(location)
    fs.get_file(path, str(target))
    return target


def check_reachable(location: Location, setting: str) -> None:
    """Raise ArtifactsUnavailable, naming `setting`, unless the bucket of `location` exists
    and answers. A local location needs nothing: writers create their directories.

    Asked before a step computes anything: a wrong endpoint or bucket otherwise surfaces as
    a bare client error after minutes of work, or, for LanceDB, as a table that seems
    missing (its open fails like one), which would quietly serve fallback feeds."""
    if not is_remote(location):
        return
    fs, path = filesystem(location)
    if isinstance(fs, LocalFileSystem):
        return
    bucket = path.split("/", 1)[0]
    where = (
        f"{location} comes from {setting}; the endpoint and credentials from "
        "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile)"
    )
    try:
        fs.info(bucket)
    except FileNotFoundError as exc:
        raise ArtifactsUnavailable(f"bucket {bucket!r} does not exist. {where}") from exc
    except Exception as exc:  # botocore's and aiohttp's errors share no base class
        raise ArtifactsUnavailable(
            f"cannot reach bucket {bucket!r} ({type(exc).__name__}: {exc}). {where}"
        ) from exc


def lance_storage_options(uri: Location) -> dict[str, str] | None:
    """LanceDB's `storage_options` for `uri`, from the same AWS_* variables s3fs reads, so
    the vector table and the other artifacts always reach the same endpoint. None for a
    local path. A plain-http endpoint (MinIO or moto on a private network) needs
    `allow_http`, which LanceDB does not infer from the URL."""
    if not is_remote(uri):
        return None
    env = os.environ
    options: dict[str, Any] = {
        "aws_access_key_id": env.get("AWS_ACCESS_KEY_ID"),
        "aws_secret_access_key": env.get("AWS_SECRET_ACCESS_KEY"),
        "aws_session_token": env.get("AWS_SESSION_TOKEN"),
        "aws_region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
    }
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["aws_endpoint"] = endpoint
        if endpoint.startswith("http://"):
            options["allow_http"] = "true"
    return {k: str(v) for k, v in options.items() if v}
