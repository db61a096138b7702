"""The warehouse tables as Parquet objects on an S3-compatible bucket (moto's server on
loopback, tests/servers.py), switched on by FEED_DAGSTER_ARTIFACTS_URI: every reader gets
the same frames as from the DuckDB file, the IO manager writes one whole object per asset
and nothing under the local storage root, and a missing bucket is refused naming the
setting."""

from __future__ import annotations

import dataclasses
import os
import stat
from datetime import timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
from dagster_helpers import materialize
from polars.testing import assert_frame_equal

from feed_dagster.artifacts import ArtifactsUnavailable
from feed_dagster.data.schema import World
from feed_dagster.data.warehouse import (
    IMPRESSION_TOTALS,
    connect_read_only,
    read_heldout_sample,
    read_table,
    read_tables,
)
from feed_dagster.data.warehouse_store import remote_table_names, write_tables
from feed_dagster.data.world_tables import world_info, write_world
from feed_dagster.embeddings.lexical import LexicalEncoder
from feed_dagster.feeds.build import OPTIONAL_TABLES, PIPELINE_TABLES
from feed_dagster.feeds.precompute import read_shard_tables
from feed_dagster.models.budget import TrainingBudget, read_training_tables
from feed_dagster.models.catalog import FeatureConfig, ItemCatalog
from feed_dagster.models.exposures import ExposureLog
from feed_dagster.paths import ARTIFACTS_URI_VARIABLE, DataRoot
from feed_dagster.serving.guard import active_user_ids


def _tables(world: World) -> dict[str, pl.DataFrame]:
    return {"world_info": world_info(world, "test"), **world.tables()}


def _keys(server, bucket: str) -> list[str]:
    listed = server.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []))


@pytest.fixture()
def remote(tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The warehouse location the layout gives with the artifacts on the test's bucket."""
    monkeypatch.setenv(ARTIFACTS_URI_VARIABLE, f"s3://{s3_bucket}/feed")
    location = DataRoot(tmp_path / "data").warehouse_path()
    assert location == f"s3://{s3_bucket}/feed/warehouse"
    return location


@pytest.fixture()
def both(warehouse: Path, remote: str, tiny_world: World) -> tuple[Path, str]:
    """The tiny world in a DuckDB file (tests/conftest.py) and on the bucket."""
    write_tables(remote, _tables(tiny_world))
    return warehouse, remote


def _assert_same(local: dict[str, pl.DataFrame], remote: dict[str, pl.DataFrame]) -> None:
    assert list(remote) == list(local)
    for name, frame in local.items():
        try:
            assert_frame_equal(remote[name], frame, check_row_order=False)
        except AssertionError as exc:
            raise AssertionError(f"table {name}: {exc}") from exc


def _assert_same_value(local, remote, where: str = "") -> None:
    """Equal dataclasses of numpy arrays (the exposure indexes), field by field."""
    if dataclasses.is_dataclass(local):
        for field in dataclasses.fields(local):
            name = f"{where}.{field.name}"
            _assert_same_value(getattr(local, field.name), getattr(remote, field.name), name)
    elif isinstance(local, np.ndarray):
        np.testing.assert_array_equal(remote, local, err_msg=where)
    else:
        assert remote == local, where


# --- where the warehouse lives ----------------------------------------------------------


def test_the_warehouse_moves_to_the_bucket_only_with_a_remote_artifacts_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = DataRoot(tmp_path / "data")
    monkeypatch.delenv(ARTIFACTS_URI_VARIABLE, raising=False)
    assert layout.warehouse_path() == tmp_path / "data" / "warehouse.duckdb"
    monkeypatch.setenv(ARTIFACTS_URI_VARIABLE, "s3://feed-artifacts/prod/")
    assert layout.warehouse_path() == "s3://feed-artifacts/prod/warehouse"
    # A local artifacts root keeps the DuckDB file: nothing else could write it faster.
    monkeypatch.setenv(ARTIFACTS_URI_VARIABLE, f"file://{tmp_path}/shared")
    assert layout.warehouse_path() == tmp_path / "data" / "warehouse.duckdb"


# --- the readers --------------------------------------------------------------------------


def test_every_table_is_one_object_and_reads_back_as_from_the_duckdb_file(
    both, s3_server, s3_bucket, tiny_world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    local, remote = both
    names = list(_tables(tiny_world))
    assert _keys(s3_server, s3_bucket) == sorted(f"feed/warehouse/{n}.parquet" for n in names)
    assert remote_table_names(remote) == sorted(names)
    _assert_same(read_tables(local, names), read_tables(remote, names))
    # Straight from the source frames too: the bucket's types are the DuckDB file's.
    assert_frame_equal(read_tables(remote, ["users"])["users"], tiny_world.users)

    # A column subset, read column by column.
    columns = ["user_id", "article_id", "shown_at"]
    assert_frame_equal(
        read_table(remote, "impressions", columns), read_table(local, "impressions", columns)
    )
    assert read_table(remote, "impressions", columns).columns == columns

    # `feed-dagster run`'s summary counts the same rows.
    from feed_dagster.cli import print_warehouse_summary

    print_warehouse_summary(local)
    from_file = capsys.readouterr().out
    print_warehouse_summary(remote)
    assert capsys.readouterr().out.replace(remote, str(local)) == from_file


def test_a_shard_read_cuts_the_impressions_to_its_users_as_from_the_file(both) -> None:
    local, remote = both
    users = read_tables(local, ["users"])["users"]["user_id"].to_numpy()[::3]
    for kwargs in ({}, {"totals_at": None}):
        got = read_tables(remote, PIPELINE_TABLES, OPTIONAL_TABLES, users=users, **kwargs)
        want = read_tables(local, PIPELINE_TABLES, OPTIONAL_TABLES, users=users, **kwargs)
        _assert_same(want, got)
        assert set(got["impressions"]["user_id"].unique()) <= set(users.tolist())
        assert got[IMPRESSION_TOTALS]["shown"][0] > got["impressions"].height
    at = read_tables(local, ["world_info"])["world_info"]["heldout_start"][0]
    _assert_same(
        read_tables(local, ["impressions"], users=users, totals_at=at),
        read_tables(remote, ["impressions"], users=users, totals_at=at),
    )
    _assert_same(read_shard_tables(local, 1, 4), read_shard_tables(remote, 1, 4))


def test_a_missing_optional_table_is_left_out_as_from_the_file(
    tmp_path: Path, remote: str, tiny_world: World, make_warehouse
) -> None:
    tables = {n: df for n, df in _tables(tiny_world).items() if n != "deleted_posts"}
    write_tables(remote, tables)
    local = tmp_path / "without.duckdb"
    write_tables(local, tables)
    got = read_tables(remote, ["users", "deleted_posts"], OPTIONAL_TABLES)
    assert list(got) == ["users"]
    _assert_same(read_tables(local, ["users", "deleted_posts"], OPTIONAL_TABLES), got)


def test_evaluation_training_exposure_guard_and_check_readers_agree(both, tiny_world) -> None:
    from feed_dagster.assets.checks import RULES

    local, remote = both
    names = ["users", "articles", "impressions", "impression_truth", "engagements"]
    for max_users in (0, 5):
        want, want_n = read_heldout_sample(local, names, max_users, seed=3)
        got, got_n = read_heldout_sample(remote, names, max_users, seed=3)
        assert got_n == want_n
        _assert_same(want, got)

    budget = TrainingBudget(train_slates=50, valid_slates=10, heldout_users=5, seed=2)
    want, want_sample = read_training_tables(local, names, budget)
    got, got_sample = read_training_tables(remote, names, budget)
    assert got_sample == want_sample
    _assert_same(want, got)

    catalog = ItemCatalog.build(
        tiny_world.articles,
        LexicalEncoder().encode(tiny_world.articles),
        FeatureConfig(history_len=8, max_candidates=16),
    )
    users = np.sort(tiny_world.users["user_id"].to_numpy()[:7])
    at = tiny_world.impressions["shown_at"].max() - timedelta(hours=6)
    for args in ((None, None), (users, None), (users, at)):
        _assert_same_value(
            ExposureLog.from_warehouse(local, catalog, *args),
            ExposureLog.from_warehouse(remote, catalog, *args),
        )

    assert_frame_equal(
        active_user_ids(remote).to_frame(), active_user_ids(local).to_frame(), check_row_order=False
    )
    con_local, con_remote = connect_read_only(local), connect_read_only(remote)
    try:
        for rule in RULES:
            want, got = rule.run(con_local), rule.run(con_remote)
            assert (got.passed, got.description) == (want.passed, want.description), rule.name
    finally:
        con_local.close()
        con_remote.close()


def test_a_replaced_table_is_one_new_object_written_in_one_put(
    both, s3_server, s3_bucket, tiny_world: World
) -> None:
    _, remote = both
    since = len(s3_server.requests())
    fewer = tiny_world.users.head(3)
    write_tables(remote, {"users": fewer})
    writes = [r for r in s3_server.requests()[since:] if r[0] in {"PUT", "POST", "DELETE"}]
    assert writes == [("PUT", f"/{s3_bucket}/feed/warehouse/users.parquet")]
    assert_frame_equal(read_tables(remote, ["users"])["users"], fewer)
    # An empty frame replaces the table too (schema kept), as in the DuckDB file.
    write_tables(remote, {"users": fewer.clear()})
    assert_frame_equal(read_tables(remote, ["users"])["users"], fewer.clear())


# --- the ingest ----------------------------------------------------------------------------


def _drop_batches(incoming: Path, world: World) -> None:
    """New posts, engagements, a deletion, a block and a mute, an hour after `now`."""
    later = world.now + timedelta(hours=1)
    incoming.mkdir(parents=True)
    article = world.articles.sort("article_id").tail(1)
    article = article.with_columns(article_id=pl.col("article_id") + 1, published_at=pl.lit(later))
    article.write_parquet(incoming / "articles-1.parquet")
    world.engagements.head(2).with_columns(engaged_at=pl.lit(later)).write_parquet(
        incoming / "engagements-1.parquet"
    )
    pl.DataFrame(
        {"article_id": world.articles["article_id"][:1], "deleted_at": [later]}
    ).write_parquet(incoming / "deletions-1.parquet")
    users = world.users["user_id"]
    pl.DataFrame({"user_id": [users[0]], "blocked_id": [users[1]]}).write_parquet(
        incoming / "blocks-1.parquet"
    )
    pl.DataFrame({"user_id": [users[1]], "muted_id": [users[2]]}).write_parquet(
        incoming / "mutes-1.parquet"
    )


def test_the_ingest_appends_to_the_objects_as_to_the_file(
    tmp_path: Path, both, s3_server, s3_bucket, tiny_world: World
) -> None:
    from feed_dagster.incoming import INGEST_TABLES, ingest_batches, pending_batches

    local, remote = both
    reports = {}
    since = len(s3_server.requests())
    for side, warehouse in (("local", local), ("remote", remote)):
        incoming = tmp_path / side / "incoming"
        _drop_batches(incoming, tiny_world)
        safety = tmp_path / side / "serving" / "feeds.safety.parquet"
        reports[side] = ingest_batches(warehouse, pending_batches(incoming), safety)
        assert sorted(p.name for p in (incoming / "done").iterdir()) == sorted(
            f"{k}-1.parquet" for k in ("articles", "engagements", "deletions", "blocks", "mutes")
        )
    local_report, remote_report = reports["local"], reports["remote"]
    assert remote_report.rows == local_report.rows and remote_report.now == local_report.now
    assert local_report.now == tiny_world.now + timedelta(hours=1)
    _assert_same(read_tables(local, list(INGEST_TABLES)), read_tables(remote, list(INGEST_TABLES)))
    assert_frame_equal(
        pl.read_parquet(remote_report.safety_file),
        pl.read_parquet(local_report.safety_file),
        check_row_order=False,
    )
    # Only the changed tables were written, each in one PUT; `users` was only read.
    writes = sorted(r for r in s3_server.requests()[since:] if r[0] in {"PUT", "POST", "DELETE"})
    changed = ["articles", "blocks", "deleted_posts", "engagements", "mutes", "world_info"]
    assert writes == [("PUT", f"/{s3_bucket}/feed/warehouse/{t}.parquet") for t in changed]


# --- the IO manager ----------------------------------------------------------------------


def test_assets_land_in_the_bucket_and_nothing_under_the_storage_root(
    data_dir: Path, s3_server, s3_bucket, monkeypatch: pytest.MonkeyPatch, tiny_world: World
) -> None:
    """The raw tables, their SQL checks and follow_graph (which loads users and follows
    through the IO manager) with the artifacts on the bucket: one object per asset, and the
    storage root never written (it is read-only for the run)."""
    from feed_dagster.assets.raw import RAW_TABLES

    monkeypatch.setenv(ARTIFACTS_URI_VARIABLE, f"s3://{s3_bucket}/feed")
    data_dir.mkdir(parents=True)
    data_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        result = materialize(dg.AssetSelection.groups("raw", "social_graph"))
    finally:
        data_dir.chmod(stat.S_IRWXU)
    assert result.success
    # Root may write a read-only directory: that nothing was written is checked here too.
    assert list(data_dir.iterdir()) == []
    assert _keys(s3_server, s3_bucket) == sorted(
        f"feed/warehouse/{n}.parquet" for n in [*RAW_TABLES, "follow_graph"]
    )
    checks = result.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks)
    (event,) = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey("follow_graph")
    ]
    assert event.materialization.metadata["uri"].value.endswith("/warehouse/follow_graph.parquet")
    remote = f"s3://{s3_bucket}/feed/warehouse"
    users = read_tables(remote, ["users"])["users"]
    assert_frame_equal(users, tiny_world.users)
    assert read_table(remote, "follow_graph").height == users.height
    if os.getuid() != 0:  # the chmod really stopped writes: the run needed none
        assert not (data_dir / "warehouse.duckdb").exists()


# --- a wrong bucket -------------------------------------------------------------------------


def test_a_missing_bucket_names_the_setting(
    tmp_path: Path, s3_bucket, monkeypatch: pytest.MonkeyPatch, tiny_world: World
) -> None:
    monkeypatch.setenv(ARTIFACTS_URI_VARIABLE, "s3://no-such-bucket/feed")
    location = DataRoot(tmp_path / "data").warehouse_path()
    for attempt in (
        lambda: write_tables(location, {"users": tiny_world.users}),
        lambda: read_tables(location, ["users"]),
    ):
        with pytest.raises(ArtifactsUnavailable) as err:
            attempt()
        assert "bucket 'no-such-bucket' does not exist" in str(err.value)
        assert ARTIFACTS_URI_VARIABLE in str(err.value)
    assert not (tmp_path / "data").exists()

    # The bucket exists, the warehouse in it does not yet.
    monkeypatch.setenv(ARTIFACTS_URI_VARIABLE, f"s3://{s3_bucket}/feed")
    with pytest.raises(FileNotFoundError, match="materialise the raw assets"):
        read_tables(DataRoot(tmp_path / "data").warehouse_path(), ["users"])


def test_a_world_written_in_parts_goes_up_whole(tmp_path: Path, remote: str) -> None:
    from feed_dagster.world import stream_world, world_config

    cfg = world_config("tiny", n_users=100, n_posts=500)
    stream = stream_world(cfg)
    tables = ["world_info", *stream.head.tables()]
    rows = write_world(remote, stream, "test")
    local = tmp_path / "whole.duckdb"
    world = stream_world(cfg).collect()
    write_tables(local, _tables(world))
    assert rows["impressions"] == world.impressions.height > 0
    _assert_same(read_tables(local, tables), read_tables(remote, tables))
