"""The vector table, the shard files and the article embeddings on an S3-compatible bucket
(moto's server on loopback, tests/servers.py), switched on by FEED_DAGSTER_ARTIFACTS_URI:
the same results as on local paths, each shard one whole object written in one PUT, and a
missing or unreachable bucket refused up front, naming the setting."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest
from dagster_helpers import materialize
from servers import S3Server, unreachable_s3_endpoint

from feed_dagster.artifacts import ArtifactsUnavailable, writing_all
from feed_dagster.feeds.shard_files import read_versions, write_shard
from feed_dagster.generation import publish_generation
from feed_dagster.paths import ARTIFACTS_URI_VARIABLE, DataRoot
from feed_dagster.resources.storage import StorageResource
from feed_dagster.resources.stores import LanceDBResource
from feed_dagster.serving.guard import GuardConfig
from feed_dagster.vectors import (
    ensure_index,
    exact_topk,
    open_verified,
    optimize,
    search_batch,
    vector_index,
    write_vectors,
)

# The guard's coverage rule is the warehouse's business, not the bucket's: the tiny feeds
# cover only the first users.
ANY_COVERAGE = GuardConfig(min_active_coverage=0.0)
VERSIONS = {"model_version": "ranker:r1,two_tower:t1", "vector_table_version": "7"}


def _keys(server: S3Server, bucket: str, prefix: str = "") -> list[str]:
    listed = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def _object(server: S3Server, bucket: str, key: str) -> bytes:
    return server.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def _writes(server: S3Server, since: int) -> list[tuple[str, str]]:
    """Requests after the first `since` that change objects."""
    return [r for r in server.requests()[since:] if r[0] in {"PUT", "POST", "DELETE"}]


def _split(feeds: pl.DataFrame, n: int = 2) -> dict[str, pl.DataFrame]:
    return {str(i): feeds.filter(pl.col("user_id") % n == i) for i in range(n)}


def _served(path: Path) -> pl.DataFrame:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("SELECT * EXCLUDE (generated_at) FROM feeds").pl()
    finally:
        con.close()


# --- where things live ------------------------------------------------------------------


def test_the_switch_moves_the_warehouse_vectors_shards_and_embeddings_only(
    tmp_path, monkeypatch
) -> None:
    layout = DataRoot(tmp_path / "data")
    monkeypatch.delenv(ARTIFACTS_URI_VARIABLE, raising=False)
    assert layout.shard_dir() == tmp_path / "data" / "feeds" / "shards"
    assert layout.lancedb_uri() == str(tmp_path / "data" / "lancedb")
    assert (
        layout.embeddings_path() == tmp_path / "data" / "embeddings" / "article_embeddings.parquet"
    )
    layout.check_artifacts()  # a local root needs nothing

    monkeypatch.setenv(ARTIFACTS_URI_VARIABLE, "s3://feed-artifacts/prod/")
    assert layout.shard_dir() == "s3://feed-artifacts/prod/feeds/shards"
    assert layout.lancedb_uri() == "s3://feed-artifacts/prod/lancedb"
    assert (
        layout.embeddings_path() == "s3://feed-artifacts/prod/embeddings/article_embeddings.parquet"
    )
    # The warehouse becomes Parquet objects there (tests/test_warehouse_s3.py); the serving
    # file and everything else stay under the local storage root.
    assert layout.warehouse_path() == "s3://feed-artifacts/prod/warehouse"
    assert layout.serving_path() == tmp_path / "data" / "serving" / "feeds.duckdb"
    assert layout.models_dir() == tmp_path / "data" / "models"

    # A local path (or file:// URL) is a local root like the storage root.
    monkeypatch.setenv(ARTIFACTS_URI_VARIABLE, f"file://{tmp_path}/shared")
    assert layout.shard_dir() == tmp_path / "shared" / "feeds" / "shards"


# --- several files at once ---------------------------------------------------------------


def test_files_written_together_appear_whole_or_not_at_all(
    tmp_path: Path, s3_server, s3_bucket
) -> None:
    remote = [f"s3://{s3_bucket}/feed/t/{n}.bin" for n in ("a", "b")]
    for locations in ([tmp_path / "t" / "a.bin", tmp_path / "t" / "b.bin"], remote):
        with pytest.raises(RuntimeError), writing_all(locations) as tmps:
            tmps[0].write_bytes(b"a")
            raise RuntimeError("cut off")
        if locations is remote:
            assert _keys(s3_server, s3_bucket) == []
        else:
            assert not (tmp_path / "t").exists() or not list((tmp_path / "t").iterdir())
        since = len(s3_server.requests())
        with writing_all(locations) as tmps:
            for tmp, body in zip(tmps, (b"a", b"b"), strict=True):
                tmp.write_bytes(body)
        if locations is remote:
            assert _object(s3_server, s3_bucket, "feed/t/a.bin") == b"a"
            assert _object(s3_server, s3_bucket, "feed/t/b.bin") == b"b"
            assert sorted(_writes(s3_server, since)) == [
                ("PUT", f"/{s3_bucket}/feed/t/a.bin"),
                ("PUT", f"/{s3_bucket}/feed/t/b.bin"),
            ]
        else:
            assert [p.read_bytes() for p in locations] == [b"a", b"b"]
            assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["a.bin", "b.bin"]


# --- the vector table ---------------------------------------------------------------------


def _vector_frame(n: int, dim: int, seed: int) -> pl.DataFrame:
    from datetime import datetime, timedelta

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(n)
    return pl.DataFrame(
        {
            "article_id": ids,
            "vector": vectors,
            "author_id": ids % 7,
            "published_at": [datetime(2026, 1, 1) - timedelta(hours=int(h)) for h in ids % 50],
            "topic": (ids % 5).astype(np.int32),
            "is_reply": ids % 4 == 0,
            "is_repost": ids % 9 == 0,
        }
    )


def test_the_vector_table_is_written_indexed_and_searched_on_the_bucket(
    tmp_path: Path, s3_server, s3_bucket, monkeypatch
) -> None:
    monkeypatch.setenv(ARTIFACTS_URI_VARIABLE, f"s3://{s3_bucket}/feed")
    lancedb = LanceDBResource(storage=StorageResource(root=str(tmp_path / "data")))
    uri = lancedb.checked_uri()
    assert uri == f"s3://{s3_bucket}/feed/lancedb"
    frame = _vector_frame(600, 16, seed=1)
    local_uri = str(tmp_path / "local-lancedb")
    for where in (local_uri, uri):
        assert write_vectors(where, "article_vectors", frame) == 1

    # The same exact answers from the bucket's table, through LanceDB's own scan, as from
    # the local one and from numpy.
    queries = _vector_frame(8, 16, seed=2)["vector"].to_numpy()
    remote, local = (
        open_verified(uri, "article_vectors"),
        open_verified(local_uri, "article_vectors"),
    )
    hits = search_batch(remote, queries, 10, exact=False)
    assert hits.sort("query_idx", "article_id").equals(
        search_batch(local, queries, 10, exact=False).sort("query_idx", "article_id")
    )
    expected = exact_topk(frame["vector"].to_numpy(), frame["article_id"].to_numpy(), queries, 10)
    assert (
        hits.select("query_idx", "article_id")
        .sort("query_idx", "article_id")
        .equals(expected.select("query_idx", "article_id").sort("query_idx", "article_id"))
    )
    # Filtered search goes through the bucket's rows, too.
    filtered = search_batch(remote, queries, 5, where="NOT is_reply", exact=False)
    assert filtered.height == 40 and not (filtered["article_id"] % 4 == 0).any()

    # An upsert that changes and removes rows, an index and the maintenance the
    # article_vectors asset runs: all on the bucket.
    changed = _vector_frame(600, 16, seed=3).head(50)
    changed_frame = pl.concat([changed, frame.slice(50, 500)])  # ids 550..599 removed
    assert write_vectors(uri, "article_vectors", changed_frame) > 1
    table = open_verified(uri, "article_vectors")
    report = ensure_index(table, threshold=256, n_calibration=32)
    assert report.kind == "IVF_FLAT" and vector_index(table) is not None
    optimize(table)
    table = open_verified(uri, "article_vectors")
    assert table.count_rows() == 550
    top = search_batch(table, changed["vector"].head(3).to_numpy(), 1)
    assert top["article_id"].to_list() == [0, 1, 2]

    keys = _keys(s3_server, s3_bucket)
    assert keys and all(k.startswith("feed/lancedb/article_vectors.lance/") for k in keys)
    assert not (tmp_path / "data").exists(), "nothing is written under the local root"


# --- shard files and the publish ------------------------------------------------------------


def test_shards_in_the_bucket_publish_the_same_feeds_as_local_shards(
    tmp_path: Path, s3_server, s3_bucket, feeds, warehouse
) -> None:
    shards = _split(feeds)
    remote_dir = f"s3://{s3_bucket}/feed/feeds/shards"
    local_dir = tmp_path / "shards"
    for key, frame in shards.items():
        write_shard(local_dir, key, frame, VERSIONS)
        mark = len(s3_server.requests())
        assert write_shard(remote_dir, key, frame, VERSIONS) == f"{remote_dir}/shard-{key}.parquet"
        # One PUT of the final object: no temporary object, no lock object.
        assert _writes(s3_server, mark) == [
            ("PUT", f"/{s3_bucket}/feed/feeds/shards/shard-{key}.parquet")
        ]
    assert _keys(s3_server, s3_bucket) == [
        "feed/feeds/shards/shard-0.parquet",
        "feed/feeds/shards/shard-1.parquet",
    ]
    assert read_versions(remote_dir, "1") == VERSIONS

    local = publish_generation(
        local_dir, ["0", "1"], tmp_path / "a" / "feeds.duckdb", warehouse, ANY_COVERAGE
    ).published
    mark = len(s3_server.requests())
    remote = publish_generation(
        remote_dir, ["0", "1"], tmp_path / "b" / "feeds.duckdb", warehouse, ANY_COVERAGE
    ).published
    assert local is not None and remote is not None
    assert _writes(s3_server, mark) == [], "the publish only reads the bucket"
    assert (
        (remote.rows, remote.users)
        == (local.rows, local.users)
        == (feeds.height, feeds["user_id"].n_unique())
    )
    assert remote.model_version == VERSIONS["model_version"]
    assert _served(remote.path).equals(_served(local.path))
    # The downloaded copies are gone: only the serving file and its lookup folder remain.
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["feeds.duckdb", "feeds.lookup"]

    # A shard missing from the bucket stops the publish before anything is built.
    with pytest.raises(FileNotFoundError, match=r"shard-2\.parquet.*missing"):
        publish_generation(
            remote_dir, ["0", "1", "2"], tmp_path / "c" / "feeds.duckdb", warehouse, ANY_COVERAGE
        )
    assert not (tmp_path / "c" / "feeds.duckdb").exists()


# A shard writer that stops half-way through its Parquet file and waits to be killed.
HALF_WRITTEN_SHARD = """
import sys, time
from pathlib import Path
import polars as pl
from feed_dagster.feeds.shard_files import write_shard

directory, ready = sys.argv[1], Path(sys.argv[2])
real = pl.DataFrame.write_parquet

def half_write(self, file, **kwargs):
    real(self, file, **kwargs)
    data = Path(file).read_bytes()
    Path(file).write_bytes(data[: len(data) // 2])
    ready.write_text("half written")
    time.sleep(600)

pl.DataFrame.write_parquet = half_write
frame = pl.DataFrame({"user_id": list(range(1000)), "tag": ["new"] * 1000})
write_shard(directory, "0", frame, {"model_version": "new", "vector_table_version": "1"})
"""


def test_an_interrupted_shard_write_leaves_no_object_the_publish_would_read(
    tmp_path: Path, s3_server, s3_bucket, feeds, warehouse, monkeypatch
) -> None:
    remote_dir = f"s3://{s3_bucket}/feed/feeds/shards"
    shards = _split(feeds)
    write_shard(remote_dir, "0", shards["0"], VERSIONS)
    previous = _object(s3_server, s3_bucket, "feed/feeds/shards/shard-0.parquet")

    # A writer killed half-way through a new version of shard 0.
    ready, scratch = tmp_path / "ready", tmp_path / "scratch"
    scratch.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", HALF_WRITTEN_SHARD, remote_dir, str(ready)],
        stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(scratch)},  # its local temporary file, kept here
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the writer never reached its half-way point"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    # The half-written file is local, under a temporary folder; the bucket holds the
    # previous shard 0, byte for byte, and nothing else.
    (partial,) = scratch.glob("feed-artifact-*/shard-0.parquet")
    with pytest.raises(Exception):  # noqa: B017 - any Parquet error: it is half a file
        pl.read_parquet(partial)
    assert _keys(s3_server, s3_bucket) == ["feed/feeds/shards/shard-0.parquet"]
    assert _object(s3_server, s3_bucket, "feed/feeds/shards/shard-0.parquet") == previous

    # An upload cut off (the connection lost) for shard 1: no object appears.
    import s3fs

    async def connection_lost(self, lpath, rpath, **kwargs):
        raise ConnectionResetError("connection lost")

    with monkeypatch.context() as patch, pytest.raises(ConnectionResetError):
        patch.setattr(s3fs.S3FileSystem, "_put_file", connection_lost)
        write_shard(remote_dir, "1", shards["1"], VERSIONS)
    assert _keys(s3_server, s3_bucket) == ["feed/feeds/shards/shard-0.parquet"]

    # The publish finds shard 1 missing; with shard 0 alone it serves the old, whole shard.
    serving = tmp_path / "serving" / "feeds.duckdb"
    with pytest.raises(FileNotFoundError, match=r"shard-1\.parquet"):
        publish_generation(remote_dir, ["0", "1"], serving, warehouse, ANY_COVERAGE)
    published = publish_generation(remote_dir, ["0"], serving, warehouse, ANY_COVERAGE).published
    assert published is not None and published.rows == shards["0"].height
    assert published.model_version == VERSIONS["model_version"]


# --- a wrong bucket ---------------------------------------------------------------------------


def test_a_missing_bucket_or_unreachable_endpoint_names_the_setting(
    tmp_path: Path, s3_bucket, monkeypatch
) -> None:
    storage = StorageResource(root=str(tmp_path / "data"))
    monkeypatch.setenv(ARTIFACTS_URI_VARIABLE, "s3://no-such-bucket/feed")
    for check in (storage.check_artifacts, LanceDBResource(storage=storage).checked_uri):
        with pytest.raises(ArtifactsUnavailable) as err:
            check()
        assert "bucket 'no-such-bucket' does not exist" in str(err.value)
        assert ARTIFACTS_URI_VARIABLE in str(err.value)
    # The LanceDB resource's own uri names its own setting.
    own = LanceDBResource(storage=storage, uri="s3://no-such-bucket/vectors")
    with pytest.raises(ArtifactsUnavailable, match=r"resources\.lancedb\.config\.uri"):
        own.checked_uri()

    unreachable_s3_endpoint(monkeypatch)
    monkeypatch.setenv(ARTIFACTS_URI_VARIABLE, f"s3://{s3_bucket}/feed")
    with pytest.raises(ArtifactsUnavailable) as err:
        storage.check_artifacts()
    assert "cannot reach bucket" in str(err.value)
    assert ARTIFACTS_URI_VARIABLE in str(err.value) and "AWS_ENDPOINT_URL" in str(err.value)


# --- the asset graph ----------------------------------------------------------------------


def test_the_asset_graph_keeps_embeddings_and_shards_in_the_bucket(
    data_dir: Path, s3_server, s3_bucket, monkeypatch
) -> None:
    """Unchanged assets, the bucket by configuration only: the warehouse tables, the
    embeddings and every shard are objects, and the serving file built from them is local."""
    from feed_dagster.assets.feeds import user_shards

    monkeypatch.setenv(ARTIFACTS_URI_VARIABLE, f"s3://{s3_bucket}/feed")
    assert materialize(dg.AssetSelection.groups("raw", "social_graph")).success
    assert materialize(dg.AssetSelection.assets("article_embeddings")).success
    keys = user_shards.get_partition_keys()
    for key in keys:
        assert materialize(dg.AssetSelection.assets("user_feeds"), key).success
    assert materialize(dg.AssetSelection.assets("published_feeds")).success

    assert _keys(s3_server, s3_bucket, "feed/embeddings/") + _keys(
        s3_server, s3_bucket, "feed/feeds/"
    ) == [
        "feed/embeddings/article_embeddings.parquet",
        *(f"feed/feeds/shards/shard-{k}.parquet" for k in keys),
    ]
    assert _keys(s3_server, s3_bucket, "feed/warehouse/")  # the tables, as objects
    assert not (data_dir / "feeds").exists() and not (data_dir / "embeddings").exists()
    assert not (data_dir / "warehouse.duckdb").exists()
    served = _served(data_dir / "serving" / "feeds.duckdb")
    assert served.height == sum(
        pl.read_parquet(
            _object(s3_server, s3_bucket, f"feed/feeds/shards/shard-{k}.parquet")
        ).height
        for k in keys
    )
    # A second embeddings run reads the stored vectors back from the bucket and reuses them.
    result = materialize(dg.AssetSelection.assets("article_embeddings"))
    (event,) = result.get_asset_materialization_events()
    assert event.materialization.metadata["n_encoded"].value == 0
