"""The vector table on an S3-compatible bucket (moto's server on loopback,
tests/servers.py), switched on by FEED_DAGSTER_ARTIFACTS_URI: the same results as on a
local path, and a missing or unreachable bucket refused up front, naming the setting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from servers import S3Server, free_port

from feed_dagster.artifacts import ArtifactsUnavailable
from feed_dagster.paths import ARTIFACTS_URI_VARIABLE, DataRoot
from feed_dagster.resources.storage import StorageResource
from feed_dagster.resources.stores import LanceDBResource
from feed_dagster.vectors import (
    ensure_index,
    exact_topk,
    open_verified,
    optimize,
    search_batch,
    vector_index,
    write_vectors,
)


def _keys(server: S3Server, bucket: str, prefix: str = "") -> list[str]:
    listed = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


# --- where things live ------------------------------------------------------------------


def test_the_switch_moves_the_vector_table_only(tmp_path, monkeypatch) -> None:
    layout = DataRoot(tmp_path / "data")
    monkeypatch.delenv(ARTIFACTS_URI_VARIABLE, raising=False)
    assert layout.lancedb_uri() == str(tmp_path / "data" / "lancedb")
    layout.check_artifacts()  # a local root needs nothing

    monkeypatch.setenv(ARTIFACTS_URI_VARIABLE, "s3://feed-artifacts/prod/")
    assert layout.lancedb_uri() == "s3://feed-artifacts/prod/lancedb"
    # The DuckDB files and everything else stay under the local storage root.
    assert layout.warehouse_path() == tmp_path / "data" / "warehouse.duckdb"
    assert layout.serving_path() == tmp_path / "data" / "serving" / "feeds.duckdb"
    assert layout.models_dir() == tmp_path / "data" / "models"
    assert layout.shard_dir() == tmp_path / "data" / "feeds" / "shards"

    # A local path (or file:// URL) is a local root like the storage root.
    monkeypatch.setenv(ARTIFACTS_URI_VARIABLE, f"file://{tmp_path}/shared")
    assert layout.lancedb_uri() == str(tmp_path / "shared" / "lancedb")


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

    # Nothing listens on this port: connection refused (one attempt: botocore's retries
    # only lengthen the wait).
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv(ARTIFACTS_URI_VARIABLE, f"s3://{s3_bucket}/feed")
    with pytest.raises(ArtifactsUnavailable) as err:
        storage.check_artifacts()
    assert "cannot reach bucket" in str(err.value)
    assert ARTIFACTS_URI_VARIABLE in str(err.value) and "AWS_ENDPOINT_URL" in str(err.value)
