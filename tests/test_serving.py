"""The serving file: atomic publish, read-only lookups, failure and concurrency behaviour."""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

import feed_dagster.serving.publish as publish_mod
from feed_dagster.errors import DataValidationError
from feed_dagster.pipeline import PopularityRetriever, TopicAffinityScorer, run_pipeline
from feed_dagster.serving import (
    FeedNotPublishedError,
    FeedReader,
    connect,
    get_feed,
    publish_feeds,
    read_meta,
    read_served,
)

GEN1 = datetime(2026, 1, 7, 0, 0)
GEN2 = datetime(2026, 1, 7, 1, 0)


@pytest.fixture(scope="module")
def feeds(tiny_world) -> pl.DataFrame:
    w = tiny_world
    out, _ = run_pipeline(
        w,
        w.users["user_id"].to_numpy()[:60],
        w.now,
        PopularityRetriever.from_tables(w),
        TopicAffinityScorer.from_tables(w),
    )
    return out


def publish(feeds, path: Path, world, version: str, at: datetime = GEN1):
    return publish_feeds(
        feeds,
        path,
        model_version=version,
        vector_table_version=f"vt-{version}",
        generated_at=at,
        articles=world.articles,
        users=world.users,
    )


def test_publish_and_get_feed(tmp_path: Path, feeds, tiny_world) -> None:
    path = tmp_path / "serving" / "feeds.duckdb"
    result = publish(feeds, path, tiny_world, "m1")
    assert result.rows == feeds.height and result.users == 60 and path.exists()
    # Nothing temporary left behind: the serving file and its generation's lookup file.
    assert sorted(os.listdir(path.parent)) == ["feeds.duckdb", "feeds.lookup"]
    assert os.listdir(path.parent / "feeds.lookup") == [f"{result.generation_id}.lookup"]

    feed = get_feed(3, path)
    expected = feeds.filter(pl.col("user_id") == 3)
    assert feed["article_id"].to_list() == expected["article_id"].to_list()
    assert feed["position"].to_list() == list(range(1, 36))
    assert feed["title"].null_count() == 0 and feed["author_handle"].null_count() == 0
    assert set(feed["model_version"]) == {"m1"} and set(feed["vector_table_version"]) == {"vt-m1"}
    assert get_feed(3, path, limit=5)["position"].to_list() == [1, 2, 3, 4, 5]
    assert get_feed(10**9, path).is_empty()

    meta = read_meta(path)
    assert (meta["model_version"], meta["rows"], meta["users"]) == ("m1", feeds.height, 60)
    assert meta["generation_id"] == result.generation_id
    with connect(path) as con:
        summary = con.execute("SELECT source, rows FROM serving.feed_summary").fetchall()
        assert sum(n for _, n in summary) == feeds.height
        assert {s for s, _ in summary} == {"in_network", "out_of_network"}
        assert con.execute("SELECT count(*) FROM serving.feed_users").fetchone()[0] == 60
        readable = con.execute("SELECT title FROM serving.feed_readable LIMIT 1").fetchone()
        assert readable[0]
    served = read_served(path)
    assert served is not None and served.height == feeds.height


def test_publish_from_parquet_shards(tmp_path: Path, feeds, tiny_world) -> None:
    shards = []
    with_shard = feeds.with_columns(shard=pl.col("user_id") % 3)
    for i, part in enumerate(with_shard.partition_by("shard", include_key=False)):
        shards.append(tmp_path / f"shard-{i}.parquet")
        part.write_parquet(shards[-1])
    path = tmp_path / "feeds.duckdb"
    publish(shards, path, tiny_world, "m1")
    with connect(path) as con:
        rows = con.execute("SELECT user_id, position, article_id FROM serving.feeds").pl()
    assert rows.equals(feeds.select("user_id", "position", "article_id"))  # ordered too

    with pytest.raises(DataValidationError, match="one row per"):
        publish([*shards, shards[0]], path, tiny_world, "m2")
    assert read_meta(path)["model_version"] == "m1"
    with pytest.raises(DataValidationError, match="missing"):
        publish(feeds.drop("reason"), path, tiny_world, "m2")


def test_failed_publish_keeps_the_previous_file(
    tmp_path: Path, feeds, tiny_world, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "feeds.duckdb"
    first = publish(feeds, path, tiny_world, "m1")

    def boom(con) -> None:
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(publish_mod, "_create_views", boom)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        publish(feeds.head(35), path, tiny_world, "m2", GEN2)
    assert read_meta(path)["generation_id"] == first.generation_id
    assert set(get_feed(3, path)["model_version"]) == {"m1"}
    assert sorted(os.listdir(tmp_path)) == ["feeds.duckdb", "feeds.lookup"]
    assert os.listdir(tmp_path / "feeds.lookup") == [f"{first.generation_id}.lookup"]


def test_stale_temporary_files_are_swept(tmp_path: Path, feeds, tiny_world) -> None:
    path = tmp_path / "feeds.duckdb"
    stale = tmp_path / "feeds.duckdb.tmp-dead"
    fresh = tmp_path / "feeds.duckdb.tmp-busy"
    spill = tmp_path / "feeds.duckdb.tmp-dead.tmp"
    stale.write_bytes(b"half a file")
    fresh.write_bytes(b"a publish in progress")
    spill.mkdir()
    (spill / "block").write_bytes(b"spilled")
    old = time.time() - 7 * 3600
    for p in (stale, spill):
        os.utime(p, (old, old))
    publish(feeds, path, tiny_world, "m1")
    assert not stale.exists() and not spill.exists() and fresh.exists()


def test_open_reader_keeps_old_generation_new_readers_see_new(
    tmp_path: Path, feeds, tiny_world
) -> None:
    path = tmp_path / "feeds.duckdb"
    publish(feeds, path, tiny_world, "m1")
    reader = FeedReader(path)
    assert set(reader.get_feed(3)["model_version"]) == {"m1"}
    con = connect(path)  # opened before the publish
    publish(feeds.filter(pl.col("user_id") != 3), path, tiny_world, "m2", GEN2)

    # The connection opened before the publish still reads the old, complete generation.
    old = con.execute("SELECT model_version, count(*) FROM serving.feeds GROUP BY ALL").fetchall()
    assert old == [("m1", feeds.height)]
    assert con.execute("SELECT count(*) FROM serving.feeds WHERE user_id = 3").fetchone()[0] == 35
    con.close()
    # New lookups, and the long-lived reader after the swap, see the new generation.
    assert get_feed(3, path).is_empty()
    assert set(get_feed(4, path)["model_version"]) == {"m2"}
    assert reader.get_feed(3).is_empty()
    assert set(reader.get_feed(4)["model_version"]) == {"m2"}
    assert reader.meta()["model_version"] == "m2"
    reader.close()


def test_readers_never_see_a_mix_during_publishes(tmp_path: Path, feeds, tiny_world) -> None:
    path = tmp_path / "feeds.duckdb"
    publish(feeds, path, tiny_world, "v0")
    problems: list[str] = []
    seen: set[str] = set()
    stop = threading.Event()

    def read_loop() -> None:
        with FeedReader(path) as reader:
            while not stop.is_set():
                for f in (get_feed(5, path), reader.get_feed(5)):
                    versions = set(f["model_version"])
                    seen.update(versions)
                    if len(versions) != 1 or f.height != 35:
                        problems.append(f"{versions} {f.height}")

    thread = threading.Thread(target=read_loop)
    thread.start()
    try:
        for i in range(1, 6):
            publish(feeds, path, tiny_world, f"v{i}")
    finally:
        stop.set()
        thread.join()
    assert not problems
    assert len(seen) >= 2


def test_missing_file_and_bad_input(tmp_path: Path, feeds, tiny_world) -> None:
    missing = tmp_path / "nope.duckdb"
    with pytest.raises(FeedNotPublishedError, match="materialise the published_feeds"):
        get_feed(1, missing)
    with pytest.raises(FeedNotPublishedError):
        FeedReader(missing).get_feed(1)
    assert read_served(missing) is None

    path = tmp_path / "feeds.duckdb"
    publish(feeds, path, tiny_world, "m1")
    with pytest.raises(TypeError):
        get_feed("3 OR 1=1", path)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        get_feed(3, path, limit=-1)
    assert get_feed(3, path).height == 35  # the table is still there


KILLED_PUBLISH = """
import sys
from datetime import datetime
import polars as pl
from feed_dagster.serving import publish_feeds
feeds = pl.read_parquet(sys.argv[1])
big = pl.concat([feeds.with_columns(user_id=feeds["user_id"] + i * 1_000_000) for i in range(400)])
print("start", flush=True)
publish_feeds(big, sys.argv[2], model_version="m2", vector_table_version="v2",
              generated_at=datetime(2026, 1, 7, 1))
print("done", flush=True)
"""


def test_killed_publish_leaves_the_previous_feeds_served(tmp_path: Path, feeds, tiny_world) -> None:
    import signal
    import subprocess
    import sys

    path = tmp_path / "feeds.duckdb"
    first = publish(feeds, path, tiny_world, "m1")
    shard = tmp_path / "shard.parquet"
    feeds.write_parquet(shard)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_PUBLISH, str(shard), str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "start"
    time.sleep(0.5)  # well inside a publish of a few hundred thousand rows
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    meta = read_meta(path)
    if meta["generation_id"] == first.generation_id:
        # Killed mid-build: the old generation is served whole, the new one left no trace
        # in the live file (its temporary file is swept by a later publish).
        assert set(get_feed(3, path)["model_version"]) == {"m1"}
        assert meta["rows"] == feeds.height
    else:  # the machine was fast enough to finish before the kill: a whole new generation
        assert meta["rows"] == feeds.height * 400


def test_readers_default_to_the_serving_file_under_the_data_root(
    tmp_path: Path, feeds, tiny_world, monkeypatch
) -> None:
    from feed_dagster.serving.http import create_app

    root = tmp_path / "elsewhere"
    monkeypatch.setenv("FEED_DAGSTER_DATA", str(root))
    monkeypatch.chdir(tmp_path)  # no ./data here: a hard-coded relative default would miss
    path = root / "serving" / "feeds.duckdb"
    publish(feeds, path, tiny_world, "m1")
    user = int(feeds["user_id"][0])
    expected = get_feed(user, path)
    assert get_feed(user).equals(expected)
    assert FeedReader().path == path and FeedReader().get_feed(user).equals(expected)
    assert read_meta()["model_version"] == "m1"
    assert read_served().height == feeds.height
    con = connect()
    try:
        assert con.execute("select count(*) from serving.feeds").fetchone()[0] == feeds.height
    finally:
        con.close()
    assert create_app().state.service.reader.path == path


def test_publish_picks_the_served_columns_by_name(
    tmp_path: Path, feeds, tiny_world, monkeypatch
) -> None:
    plain = tmp_path / "plain" / "feeds.duckdb"
    publish(feeds, plain, tiny_world, "m1")
    # The same columns in another order (as if FEED_SCHEMA gained or moved a column).
    monkeypatch.setattr(publish_mod, "FEED_COLUMNS", tuple(reversed(publish_mod.FEED_COLUMNS)))
    shuffled = tmp_path / "shuffled" / "feeds.duckdb"
    publish(feeds, shuffled, tiny_world, "m1")
    con = connect(shuffled)
    try:
        cols = [r[0] for r in con.execute("describe serving.feeds").fetchall()]
    finally:
        con.close()
    assert cols[:6] == ["user_id", "position", "article_id", "author_id", "author_handle", "title"]
    assert sorted(cols) == sorted(
        [*publish_mod.FEED_COLUMNS, "author_handle", "title", *publish_mod.VERSION_COLUMNS]
    )
    user = int(feeds["user_id"][0])
    assert get_feed(user, shuffled).equals(get_feed(user, plain))
