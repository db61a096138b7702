from datetime import datetime

import duckdb
import polars as pl
import pytest

from feed_dagster.errors import DataValidationError
from feed_dagster.incoming import BatchError, ingest_batches, pending_batches, replay_done
from feed_dagster.world.simulate import simulate_activity


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


# --------------------------------------------------------------------------------------
# bad input: every class is refused by name, and nothing is written


def _snapshot(path):
    """Every table's row count and the world's clock: what a refused batch must not move."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        names = [r[0] for r in con.execute("show tables").fetchall()]
        counts = {n: con.execute(f"select count(*) from main.{n}").fetchone()[0] for n in names}
        return counts, con.execute("select now from main.world_info").fetchone()[0]
    finally:
        con.close()


def _activity(world):
    return simulate_activity(world.articles, world.engagements, world.now)


def _set(df, column, value, dtype=None, row=1):
    lit = pl.lit(value, dtype=dtype or df.schema[column])
    return df.with_columns(
        pl.when(pl.int_range(pl.len()) == row).then(lit).otherwise(pl.col(column)).alias(column)
    )


def _truncated(world, tmp):
    posts, _ = _activity(world)
    posts.write_parquet(tmp)
    data = tmp.read_bytes()
    return data[: len(data) // 2]


BAD_BATCHES = {
    # name: (file, build(world, tmp) -> DataFrame | bytes, column, text in the error)
    "truncated_parquet": ("articles-t.parquet", _truncated, None, "not a readable Parquet"),
    "zero_bytes": ("engagements-z.parquet", lambda w, t: b"", None, "not a readable Parquet"),
    "missing_column": (
        "engagements-m.parquet",
        lambda w, t: _activity(w)[1].drop("engaged_at"),
        "engaged_at",
        "no column",
    ),
    "null_id": (
        "engagements-n.parquet",
        lambda w, t: _set(_activity(w)[1], "user_id", None),
        "user_id",
        "rows with null",
    ),
    "string_ids": (
        "engagements-s.parquet",
        lambda w, t: _activity(w)[1].with_columns(pl.col("article_id").cast(pl.String)),
        "article_id",
        "type String",
    ),
    "float_ids": (
        "articles-f.parquet",
        lambda w, t: _activity(w)[0].with_columns(pl.col("article_id").cast(pl.Float64) + 0.5),
        "article_id",
        "type Float64",
    ),
    "time_as_text": (
        "engagements-x.parquet",
        lambda w, t: _activity(w)[1].with_columns(pl.col("engaged_at").cast(pl.String)),
        "engaged_at",
        "type String",
    ),
    "negative_dwell": (
        "engagements-d.parquet",
        lambda w, t: _set(_activity(w)[1], "dwell_seconds", -4.0),
        "dwell_seconds",
        "out of range",
    ),
    "nan_dwell": (
        "engagements-nan.parquet",
        lambda w, t: _set(_activity(w)[1], "dwell_seconds", float("nan")),
        "dwell_seconds",
        "out of range",
    ),
    "negative_id": (
        "engagements-neg.parquet",
        lambda w, t: _set(_activity(w)[1], "user_id", -3),
        "user_id",
        "out of range",
    ),
    "engaged_in_1970": (
        "engagements-1970.parquet",
        lambda w, t: _set(_activity(w)[1], "engaged_at", datetime(1970, 1, 1)),
        "engaged_at",
        "plausible window",
    ),
    "published_in_2200": (
        "articles-2200.parquet",
        lambda w, t: _set(_activity(w)[0], "published_at", datetime(2200, 1, 1)),
        "published_at",
        "plausible window",
    ),
    "duplicate_article_ids": (
        "articles-dup.parquet",
        lambda w, t: _set(_activity(w)[0], "article_id", _activity(w)[0]["article_id"][0]),
        "article_id",
        "duplicate ids",
    ),
    "article_already_known": (
        "articles-known.parquet",
        lambda w, t: _set(_activity(w)[0], "article_id", int(w.articles["article_id"][0])),
        "article_id",
        "already in the warehouse",
    ),
    "author_unknown": (
        "articles-author.parquet",
        lambda w, t: _set(_activity(w)[0], "author_id", 10**9),
        "author_id",
        "unknown user ids",
    ),
    "engagement_of_unknown_article": (
        "engagements-art.parquet",
        lambda w, t: _set(_activity(w)[1], "article_id", 10**9),
        "article_id",
        "unknown article ids",
    ),
    "deletion_of_unknown_article": (
        "deletions-u.parquet",
        lambda w, t: pl.DataFrame({"article_id": [10**9], "deleted_at": [w.now]}),
        "article_id",
        "unknown article ids",
    ),
    "deletion_without_time": (
        "deletions-nt.parquet",
        lambda w, t: pl.DataFrame({"article_id": [int(w.articles["article_id"][0])]}),
        "deleted_at",
        "no column",
    ),
    "self_block": (
        "blocks-self.parquet",
        lambda w, t: pl.DataFrame({"user_id": [3], "blocked_id": [3]}),
        "blocked_id",
        "acting on the user themselves",
    ),
    "mute_of_unknown_account": (
        "mutes-u.parquet",
        lambda w, t: pl.DataFrame({"user_id": [3], "muted_id": [10**9]}),
        "muted_id",
        "unknown user ids",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_bad_batches_are_refused_by_name_and_write_nothing(
    case, tmp_path, warehouse, tiny_world
) -> None:
    file, build, column, text = BAD_BATCHES[case]
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    bad = build(tiny_world, tmp_path / "scratch.parquet")
    if isinstance(bad, bytes):
        (incoming / file).write_bytes(bad)
    else:
        bad.write_parquet(incoming / file)
    # A good batch beside it (one that would rewrite the safety list) is rolled back or
    # never started.
    pl.DataFrame({"user_id": [1], "blocked_id": [2]}).write_parquet(
        incoming / "blocks-0000-good.parquet"
    )
    before = _snapshot(warehouse)
    safety = tmp_path / "serving" / "feeds.safety.parquet"
    with pytest.raises(DataValidationError) as info:
        ingest_batches(warehouse, pending_batches(incoming), safety)
    err = info.value
    assert isinstance(err, BatchError)
    assert err.file.endswith(file) and err.column == column
    assert text in str(err)
    assert _snapshot(warehouse) == before
    assert not safety.parent.exists() or not any(safety.parent.iterdir())
    assert (incoming / "failed" / f"{file}.error.txt").read_text().startswith(err.file)
    assert [p.name for p in pending_batches(incoming)] == ["blocks-0000-good.parquet"]


def test_empty_batch_file_is_a_no_op(tmp_path, warehouse, tiny_world) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    _activity(tiny_world)[1].head(0).write_parquet(incoming / "engagements-empty.parquet")
    before = _snapshot(warehouse)
    report = ingest_batches(warehouse, pending_batches(incoming))
    assert report.rows == {"engagements": 0}
    assert _snapshot(warehouse) == before
