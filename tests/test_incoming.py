import duckdb
import polars as pl
import pytest

from feed_dagster.data.incoming import BatchError, ingest_batches, pending_batches, replay_done
from feed_dagster.data.sources import world_info
from feed_dagster.world.simulate import simulate_activity


@pytest.fixture()
def warehouse(tmp_path, tiny_world):
    path = tmp_path / "warehouse.duckdb"
    con = duckdb.connect(str(path))
    tables = {"world_info": world_info(tiny_world, "test"), **tiny_world.tables()}
    for name, df in tables.items():
        con.register("df", df)
        con.execute(f"create table main.{name} as select * from df")
        con.unregister("df")
    con.close()
    return path


def _count(path, table):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(f"select count(*) from main.{table}").fetchone()[0]
    finally:
        con.close()


def test_simulated_batch_is_ingested_and_moved_to_done(tmp_path, warehouse, tiny_world):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    posts, eng = simulate_activity(tiny_world.articles, tiny_world.engagements, tiny_world.now)
    posts.write_parquet(incoming / "articles-0001.parquet")
    eng.write_parquet(incoming / "engagements-0001.parquet")
    before = _count(warehouse, "articles")
    report = ingest_batches(warehouse, pending_batches(incoming))
    assert report.rows == {"articles": posts.height, "engagements": eng.height}
    assert _count(warehouse, "articles") == before + posts.height
    assert pending_batches(incoming) == []
    assert sorted(p.name for p in (incoming / "done").iterdir()) == [
        "articles-0001.parquet",
        "engagements-0001.parquet",
    ]
    con = duckdb.connect(str(warehouse), read_only=True)
    now = con.execute("select now from main.world_info").fetchone()[0]
    con.close()
    assert now > tiny_world.now
    # A rebuild replays committed batches on top of the source.
    rebuilt = replay_done(tiny_world, incoming / "done")
    assert rebuilt.articles.height == tiny_world.articles.height + posts.height


def test_bad_batch_is_quarantined_and_nothing_is_written(tmp_path, warehouse, tiny_world):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    posts, eng = simulate_activity(tiny_world.articles, tiny_world.engagements, tiny_world.now)
    posts.write_parquet(incoming / "articles-0001.parquet")
    eng.with_columns(user_id=pl.col("user_id") + 10**9).write_parquet(
        incoming / "engagements-0001.parquet"
    )
    before = _count(warehouse, "articles")
    with pytest.raises(BatchError, match="unknown user ids"):
        ingest_batches(warehouse, pending_batches(incoming))
    assert _count(warehouse, "articles") == before  # the good file was rolled back too
    assert [p.name for p in pending_batches(incoming)] == ["articles-0001.parquet"]
    error = (incoming / "failed" / "engagements-0001.parquet.error.txt").read_text()
    assert "unknown user ids" in error


def test_unreadable_or_misnamed_files_are_refused(tmp_path, warehouse):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "articles-broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(BatchError, match="not a readable Parquet file"):
        ingest_batches(warehouse, pending_batches(incoming))
    pl.DataFrame({"x": [1]}).write_parquet(incoming / "stuff.parquet")
    with pytest.raises(BatchError, match="cannot tell the table"):
        ingest_batches(warehouse, pending_batches(incoming))
