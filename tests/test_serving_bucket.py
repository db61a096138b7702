"""Serving generations on the artifacts bucket (moto's server on loopback, tests/servers.py):
each publish puts its DuckDB file there as one immutable object and then replaces the
CURRENT pointer in one PUT; a reader on another machine fetches the generation it names."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import polars as pl
import pytest
from serving_helpers import publish

from feed_dagster.cli import main
from feed_dagster.feeds.shard_files import write_shard
from feed_dagster.generation import publish_generation
from feed_dagster.paths import ARTIFACTS_URI_VARIABLE
from feed_dagster.serving.bucket import (
    KEEP_GENERATIONS,
    GenerationCorruptError,
    GenerationNotFoundError,
    current_generation,
    fetch_current,
    read_live_served,
    upload_generation,
)
from feed_dagster.serving.guard import GuardConfig
from feed_dagster.serving.lookup import lookup_path_for
from feed_dagster.serving.read import FeedReader

ANY_COVERAGE = GuardConfig(min_active_coverage=0.0, min_share_of_live=0.0)
VERSIONS = {"model_version": "ranker:r1,two_tower:t1", "vector_table_version": "7"}


def _keys(server, bucket: str) -> list[str]:
    listed = server.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def _object(server, bucket: str, key: str) -> bytes:
    return server.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def _rows(path: Path) -> pl.DataFrame:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("SELECT * FROM feeds ORDER BY user_id, position").pl()
    finally:
        con.close()


def test_the_pointer_names_a_complete_object_written_before_it(
    tmp_path: Path, s3_server, s3_bucket, feeds, warehouse
) -> None:
    root = f"s3://{s3_bucket}/feed/serving"
    shard_dir = f"s3://{s3_bucket}/feed/feeds/shards"
    write_shard(shard_dir, "0", feeds, VERSIONS)
    serving = tmp_path / "serving" / "feeds.duckdb"
    mark = len(s3_server.requests())
    outcome = publish_generation(
        shard_dir, ["0"], serving, warehouse, ANY_COVERAGE, serving_bucket=root
    )
    assert outcome.published is not None and outcome.on_bucket is not None
    generation = outcome.published.generation_id
    key = f"feed/serving/generations/{generation}.duckdb"
    # The object in one PUT, then the pointer in one PUT; nothing else is written.
    writes = [r for r in s3_server.requests()[mark:] if r[0] in {"PUT", "POST", "DELETE"}]
    assert writes == [("PUT", f"/{s3_bucket}/{key}"), ("PUT", f"/{s3_bucket}/feed/serving/CURRENT")]
    pointer = json.loads(_object(s3_server, s3_bucket, "feed/serving/CURRENT"))
    assert pointer["generation_id"] == generation and pointer["key"] == key.split("serving/")[1]
    # The object is the local serving file, byte for byte.
    assert _object(s3_server, s3_bucket, key) == serving.read_bytes()
    assert pointer["bytes"] == serving.stat().st_size
    # The local serving file is as without a bucket.
    assert _rows(serving).height == feeds.height
    assert current_generation(root).generation_id == generation


def test_an_interrupted_upload_leaves_the_previous_pointer(
    tmp_path: Path, s3_server, s3_bucket, feeds, tiny_world, monkeypatch
) -> None:
    root = f"s3://{s3_bucket}/feed/serving"
    serving = tmp_path / "serving" / "feeds.duckdb"
    first_id = publish(feeds, serving, tiny_world, model_version="m1")
    upload_generation(serving, first_id, root)
    before = _keys(s3_server, s3_bucket)

    second_id = publish(feeds.head(50), serving, tiny_world, model_version="m2")
    import s3fs

    async def connection_lost(self, lpath, rpath, **kwargs):
        raise ConnectionResetError("connection lost")

    with monkeypatch.context() as patch, pytest.raises(ConnectionResetError):
        patch.setattr(s3fs.S3FileSystem, "_put_file", connection_lost)
        upload_generation(serving, second_id, root)
    # No object of the second generation, and the pointer still names the first.
    assert _keys(s3_server, s3_bucket) == before
    assert current_generation(root).generation_id == first_id

    # Cut off after the object but before the pointer: the object is there, unnamed.
    async def pointer_lost(self, path, data, **kwargs):
        raise ConnectionResetError("connection lost")

    with monkeypatch.context() as patch, pytest.raises(ConnectionResetError):
        patch.setattr(s3fs.S3FileSystem, "_pipe_file", pointer_lost)
        upload_generation(serving, second_id, root)
    assert current_generation(root).generation_id == first_id
    fetched = tmp_path / "reader" / "feeds.duckdb"
    assert fetch_current(root, fetched).generation_id == first_id
    assert _rows(fetched).height == feeds.height


def test_fetch_gives_the_same_feeds_as_the_local_file(
    tmp_path: Path, s3_server, s3_bucket, feeds, tiny_world, monkeypatch, capsys
) -> None:
    root = f"s3://{s3_bucket}/feed/serving"
    with pytest.raises(GenerationNotFoundError, match="CURRENT"):
        fetch_current(root, tmp_path / "nothing" / "feeds.duckdb")

    serving = tmp_path / "publisher" / "feeds.duckdb"
    generation = publish(feeds, serving, tiny_world)
    upload_generation(serving, generation, root)

    # Another machine: the command, with the artifacts root on the bucket.
    monkeypatch.setenv("FEED_DAGSTER_DATA", str(tmp_path / "reader"))
    monkeypatch.setenv(ARTIFACTS_URI_VARIABLE, f"s3://{s3_bucket}/feed")
    assert main(["fetch-serving"]) == 0
    assert generation in capsys.readouterr().out
    fetched = tmp_path / "reader" / "serving" / "feeds.duckdb"
    assert _rows(fetched).equals(_rows(serving))
    assert lookup_path_for(fetched, generation).exists()
    user = int(feeds["user_id"][0])
    with FeedReader(fetched) as reader:
        # Pages come from the lookup file made beside the copy, as after a local publish.
        assert reader.read_path.startswith("lookup")
        assert reader.get_feed(user).height > 0

    # Fetching again downloads nothing: the file already holds that generation.
    mark = len(s3_server.requests())
    assert fetch_current(root, fetched).generation_id == generation
    assert {p for _, p in s3_server.requests()[mark:]} == {f"/{s3_bucket}/feed/serving/CURRENT"}

    # A damaged object is refused and the local file stays.
    key = f"feed/serving/generations/{generation}.duckdb"
    s3_server.client().put_object(Bucket=s3_bucket, Key=key, Body=b"not a duckdb file")
    other = tmp_path / "other" / "feeds.duckdb"
    with pytest.raises(GenerationCorruptError, match="sha256"):
        fetch_current(root, other)
    assert not other.exists() and list(other.parent.iterdir()) == []

    monkeypatch.setenv(ARTIFACTS_URI_VARIABLE, str(tmp_path / "local"))
    assert main(["fetch-serving"]) == 1
    assert ARTIFACTS_URI_VARIABLE in capsys.readouterr().err


def test_a_shard_excludes_what_the_bucket_generation_served_on_any_machine(
    tmp_path: Path, s3_server, s3_bucket, feeds, tiny_world
) -> None:
    root = f"s3://{s3_bucket}/feed/serving"
    worker = tmp_path / "worker" / "serving" / "feeds.duckdb"
    # Before any publish: nothing served, on the bucket or here.
    assert read_live_served(root, worker) is None
    # A worker that once published an older generation keeps its file...
    publish(feeds.head(40), worker, tiny_world, model_version="old")
    # ...while another machine publishes the live one to the bucket.
    publisher = tmp_path / "publisher" / "serving" / "feeds.duckdb"
    upload_generation(publisher, publish(feeds, publisher, tiny_world), root)

    expected = feeds.select("user_id", "article_id").sort("user_id", "article_id")
    served = read_live_served(root, worker)
    assert served is not None and served.sort("user_id", "article_id").equals(expected)
    # The copy was temporary: the worker's file is untouched, still the older generation.
    assert _rows(worker).height == 40
    assert sorted(p.name for p in worker.parent.iterdir()) == ["feeds.duckdb", "feeds.lookup"]
    # Without a bucket, the local file as before.
    local = read_live_served(None, worker)
    assert local is not None and local.height == 40


def test_a_publish_keeps_the_last_generations_on_the_bucket(
    tmp_path: Path, s3_server, s3_bucket, feeds, tiny_world
) -> None:
    root = f"s3://{s3_bucket}/feed/serving"
    serving = tmp_path / "serving" / "feeds.duckdb"
    generations = []
    for n in range(KEEP_GENERATIONS + 2):
        generations.append(publish(feeds.head(20 + n), serving, tiny_world))
        upload_generation(serving, generations[-1], root)
    kept = [k for k in _keys(s3_server, s3_bucket) if k.startswith("feed/serving/generations/")]
    assert len(kept) == KEEP_GENERATIONS
    assert f"feed/serving/generations/{generations[-1]}.duckdb" in kept
    assert current_generation(root).generation_id == generations[-1]
