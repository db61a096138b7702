"""Deleted posts, new blocks and new mutes: recorded by the ingest, never served by the next
refresh, and dropped by readers from the next lookup on, before any refresh."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
from serving_helpers import publish, table_feeds, tiny_feeds

from feed_dagster.data.warehouse import read_tables
from feed_dagster.feeds.build import PIPELINE_TABLES
from feed_dagster.incoming import BatchError, ingest_batches, pending_batches, replay_done
from feed_dagster.paths import safety_path_for
from feed_dagster.serving import FeedReader, get_feed, read_meta
from feed_dagster.serving import safety as safety_mod
from feed_dagster.serving.safety import SafetyCache, SafetyList

N_USERS = 80


def build(tables):
    return table_feeds(tables, N_USERS)


@pytest.fixture(scope="module")
def feeds(tiny_world) -> pl.DataFrame:
    """More users than the shared fixture's, so every victim below has company."""
    return tiny_feeds(tiny_world, N_USERS)


def victims(feeds: pl.DataFrame) -> dict[str, int]:
    """A post served to several users (to delete), a user U who is served it and a post by
    another author Y (U blocks Y), and another user V served a post by author Z (V mutes Z)."""
    top = feeds.group_by("article_id").agg(pl.len().alias("n"), pl.first("author_id"))
    top = top.filter(pl.col("author_id").is_not_null()).sort(["n", "article_id"], descending=True)
    article, author = top.row(0)[0], top.row(0)[2]
    holders = feeds.filter(pl.col("article_id") == article)["user_id"].unique().sort()
    for u in holders:
        others = feeds.filter(
            (pl.col("user_id") == u)
            & pl.col("author_id").is_not_null()
            & (pl.col("author_id") != author)
            & (pl.col("author_id") != u)
        )
        if others.height:
            y = others["author_id"][0]
            break
    else:
        raise AssertionError("no user with the deleted post and another author")
    rest = feeds.filter(
        (pl.col("user_id") != u)
        & pl.col("author_id").is_not_null()
        & (pl.col("author_id") != author)
        & (pl.col("author_id") != pl.col("user_id"))
    ).sort("user_id", "position")
    v, z = rest["user_id"][0], rest["author_id"][0]
    return {"article": article, "author": author, "u": u, "y": y, "v": v, "z": z}


def drop_actions(incoming: Path, t: dict[str, int], deleted_at: datetime, tag: str = "1") -> None:
    incoming.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {"article_id": [t["article"]], "deleted_at": [deleted_at]},
        schema={"article_id": pl.Int64, "deleted_at": pl.Datetime("us")},
    ).write_parquet(incoming / f"deletions-{tag}.parquet")
    pl.DataFrame({"user_id": [t["u"]], "blocked_id": [t["y"]]}).write_parquet(
        incoming / f"blocks-{tag}.parquet"
    )
    pl.DataFrame({"user_id": [t["v"]], "muted_id": [t["z"]]}).write_parquet(
        incoming / f"mutes-{tag}.parquet"
    )


def served(feeds: pl.DataFrame, user: int) -> pl.DataFrame:
    return feeds.filter(pl.col("user_id") == user)


def test_ingest_records_tombstones_and_new_edges(tmp_path, warehouse, feeds, tiny_world) -> None:
    t = victims(feeds)
    incoming = tmp_path / "incoming"
    safety = tmp_path / "serving" / "feeds.safety.parquet"
    drop_actions(incoming, t, tiny_world.now)
    report = ingest_batches(warehouse, pending_batches(incoming), safety)
    assert report.rows == {"deleted_posts": 1, "blocks": 1, "mutes": 1}
    assert report.safety_file == safety
    tables = read_tables(warehouse, ["deleted_posts", "blocks", "mutes", "articles"])
    assert tables["deleted_posts"]["article_id"].to_list() == [t["article"]]
    assert tables["articles"].filter(pl.col("article_id") == t["article"]).height == 1  # kept
    assert (
        tables["blocks"]
        .filter((pl.col("user_id") == t["u"]) & (pl.col("blocked_id") == t["y"]))
        .height
        == 1
    )
    assert (
        tables["mutes"]
        .filter((pl.col("user_id") == t["v"]) & (pl.col("muted_id") == t["z"]))
        .height
        == 1
    )
    # The same actions again are recorded once, not twice.
    drop_actions(incoming, t, tiny_world.now, tag="2")
    ingest_batches(warehouse, pending_batches(incoming), safety)
    again = read_tables(warehouse, ["deleted_posts", "blocks", "mutes"])
    assert again["deleted_posts"].height == 1
    assert again["blocks"].height == tables["blocks"].height
    assert again["mutes"].height == tables["mutes"].height
    # The safety list readers use holds the full current state.
    listed = SafetyList.read(safety)
    assert t["article"] in listed.deleted
    assert t["y"] in listed.authors_hidden_from(t["u"])
    assert t["u"] in listed.authors_hidden_from(t["y"])  # Y blocked by U: U hidden from Y
    assert t["z"] in listed.authors_hidden_from(t["v"])
    assert len(listed.viewers) >= tiny_world.blocks.height + tiny_world.mutes.height


def test_next_refresh_never_serves_them(tmp_path, warehouse, feeds, tiny_world) -> None:
    t = victims(feeds)
    before, _ = build(read_tables(warehouse, PIPELINE_TABLES))
    assert before.filter(pl.col("article_id") == t["article"]).height > 1  # control
    reposts = tiny_world.articles.filter(
        (pl.col("kind") == "repost") & (pl.col("parent_id") == t["article"])
    )["article_id"]
    drop_actions(tmp_path / "incoming", t, tiny_world.now)
    ingest_batches(warehouse, pending_batches(tmp_path / "incoming"))

    after, stats = build(read_tables(warehouse, PIPELINE_TABLES))
    assert after.height > 0
    assert t["article"] not in after["article_id"].to_list()
    assert not set(reposts.to_list()) & set(after["article_id"].to_list())
    assert stats.removed["deleted_posts"] > 0
    assert t["y"] not in served(after, t["u"])["author_id"].to_list()
    assert t["z"] not in served(after, t["v"])["author_id"].to_list()
    # A block or mute is per viewer: other users still get those authors when they did.
    others = before.filter(
        ~pl.col("user_id").is_in([t["u"], t["v"]]) & pl.col("author_id").is_in([t["y"], t["z"]])
    )
    assert others.height  # the data has such rows, so the check below means something
    kept = after.filter(
        ~pl.col("user_id").is_in([t["u"], t["v"]]) & pl.col("author_id").is_in([t["y"], t["z"]])
    )
    assert kept.height > 0


def test_readers_drop_them_before_any_refresh(
    tmp_path, warehouse, feeds, tiny_world, capsys
) -> None:
    from feed_dagster.cli import main

    t = victims(feeds)
    serving = tmp_path / "serving" / "feeds.duckdb"
    publish(feeds, serving, tiny_world)
    generation = read_meta(serving)["generation_id"]
    with FeedReader(serving) as reader:
        u_before = reader.get_feed(t["u"])
        v_before = reader.get_feed(t["v"])
        assert t["article"] in u_before["article_id"].to_list()
        assert t["y"] in u_before["author_id"].to_list()
        assert t["z"] in v_before["author_id"].to_list()

        drop_actions(tmp_path / "incoming", t, tiny_world.now)
        ingest_batches(warehouse, pending_batches(tmp_path / "incoming"), safety_path_for(serving))

        # Same reader, same generation, no refresh: the next lookup drops them.
        assert read_meta(serving)["generation_id"] == generation
        u_after = reader.get_feed(t["u"])
        v_after = reader.get_feed(t["v"])
    gone = (pl.col("article_id") == t["article"]) | (pl.col("author_id") == t["y"])
    assert u_after.equals(u_before.filter(~gone))  # the rest untouched, positions as published
    assert u_after.height < u_before.height
    assert v_after.equals(v_before.filter(pl.col("author_id") != t["z"]))
    # Every other user's feed loses only the deleted post.
    w = int(feeds.filter(~pl.col("user_id").is_in([t["u"], t["v"]]))["user_id"][0])
    w_all = feeds.filter(pl.col("user_id") == w)
    assert get_feed(w, serving)["article_id"].to_list() == [
        a for a in w_all["article_id"].to_list() if a != t["article"]
    ]
    # One-shot lookups and the CLI read the same list.
    assert get_feed(t["u"], serving).equals(u_after)
    assert main(["feed", str(t["u"]), "--path", str(serving), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["article_id"] for r in rows] == u_after["article_id"].to_list()
    # A short page is filled from the remaining posts, not shortened by the drops.
    page = get_feed(t["u"], serving, limit=3)
    assert page["article_id"].to_list() == u_after["article_id"].to_list()[:3]


def test_the_ingest_job_makes_deletes_visible_to_readers(
    data_dir, tiny_world, feeds, make_warehouse
) -> None:
    """Through the Dagster op the incoming sensor starts: one run, and readers drop them."""
    import dagster as dg

    from feed_dagster.definitions import build_definitions
    from feed_dagster.jobs.automation import incoming_batches
    from feed_dagster.paths import DataRoot

    storage = DataRoot(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    make_warehouse(storage.warehouse_path(), tiny_world)
    publish(feeds, storage.serving_path(), tiny_world)
    t = victims(feeds)
    reader = FeedReader(storage.serving_path())
    assert t["article"] in reader.get_feed(t["u"])["article_id"].to_list()
    drop_actions(storage.incoming_dir(), t, tiny_world.now)
    instance = dg.DagsterInstance.ephemeral()
    defs = build_definitions()
    # A context manager: the definitions' resources depend on the storage resource, and
    # Dagster builds such resources only inside one.
    with dg.build_sensor_context(instance=instance, resources=defs.resources) as ctx:
        request = incoming_batches(ctx)
    job = defs.resolve_job_def("ingest_incoming")
    result = job.execute_in_process(run_config=request.run_config, instance=instance)
    assert result.success
    keys = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert {"deleted_posts", "blocks", "mutes"} <= keys
    after = reader.get_feed(t["u"])
    assert t["article"] not in after["article_id"].to_list()
    assert t["y"] not in after["author_id"].to_list()
    reader.close()


def test_a_refused_batch_changes_neither_warehouse_nor_safety_list(
    tmp_path, warehouse, feeds, tiny_world
) -> None:
    t = victims(feeds)
    incoming = tmp_path / "incoming"
    safety = tmp_path / "serving" / "feeds.safety.parquet"
    drop_actions(incoming, t, tiny_world.now)
    ingest_batches(warehouse, pending_batches(incoming), safety)
    listed = safety.read_bytes()
    counts = {k: v.height for k, v in read_tables(warehouse, ["deleted_posts", "blocks"]).items()}
    # A good deletion next to a block of an unknown account: all or nothing.
    other = int(feeds.filter(pl.col("article_id") != t["article"])["article_id"][0])
    pl.DataFrame(
        {"article_id": [other], "deleted_at": [tiny_world.now]},
        schema={"article_id": pl.Int64, "deleted_at": pl.Datetime("us")},
    ).write_parquet(incoming / "deletions-3.parquet")
    pl.DataFrame({"user_id": [t["u"]], "blocked_id": [10**9]}).write_parquet(
        incoming / "blocks-3.parquet"
    )
    with pytest.raises(BatchError, match="unknown user ids") as info:
        ingest_batches(warehouse, pending_batches(incoming), safety)
    assert info.value.column == "blocked_id" and info.value.file.endswith("blocks-3.parquet")
    assert safety.read_bytes() == listed
    assert [p.name for p in safety.parent.iterdir()] == [safety.name]  # no temporary left
    assert {
        k: v.height for k, v in read_tables(warehouse, ["deleted_posts", "blocks"]).items()
    } == counts
    assert [p.name for p in pending_batches(incoming)] == ["deletions-3.parquet"]


def test_rebuild_replays_deletions_blocks_and_mutes(tmp_path, warehouse, feeds, tiny_world):
    t = victims(feeds)
    incoming = tmp_path / "incoming"
    drop_actions(incoming, t, tiny_world.now)
    ingest_batches(warehouse, pending_batches(incoming))
    rebuilt = replay_done(tiny_world, incoming / "done")
    assert rebuilt.deleted_posts["article_id"].to_list() == [t["article"]]
    assert rebuilt.blocks.height == tiny_world.blocks.height + 1
    assert rebuilt.mutes.height == tiny_world.mutes.height + 1
    assert rebuilt.now == tiny_world.now


def test_reader_reloads_the_list_only_when_its_file_changes(tmp_path, monkeypatch) -> None:
    path = tmp_path / "feeds.safety.parquet"
    loads: list[Path] = []
    original = SafetyList.read.__func__  # type: ignore[attr-defined]

    def counting(cls, p):
        loads.append(p)
        return original(cls, p)

    monkeypatch.setattr(safety_mod.SafetyList, "read", classmethod(counting))
    cache = SafetyCache(path)
    assert cache.current().empty and loads == []  # no file: nothing to drop, nothing read

    def write(rows: list[tuple[str, int | None, int]]) -> None:
        df = pl.DataFrame(rows, schema=safety_mod.SAFETY_SCHEMA, orient="row")
        tmp = path.with_name("x.tmp")
        df.write_parquet(tmp)
        tmp.replace(path)

    write([("deleted", None, 5)])
    for _ in range(3):
        assert cache.current().deleted.tolist() == [5]
    assert len(loads) == 1
    write([("deleted", None, 5), ("mute", 1, 9)])
    assert cache.current().authors_hidden_from(1).tolist() == [9]
    assert len(loads) == 2
    path.unlink()
    assert cache.current().empty


def test_safety_list_rules() -> None:
    df = pl.DataFrame(
        [("deleted", None, 100), ("block", 1, 2), ("mute", 3, 4)],
        schema=safety_mod.SAFETY_SCHEMA,
        orient="row",
    )
    s = SafetyList.from_frame(df)
    feed = pl.DataFrame(
        {"article_id": [100, 101, 102, 103], "author_id": [7, 2, None, 4], "position": [1, 2, 3, 4]}
    )
    assert s.apply(feed, 1)["article_id"].to_list() == [102, 103]  # deleted, blocked author
    assert s.apply(feed, 3)["article_id"].to_list() == [101, 102]  # deleted, muted author
    assert s.apply(feed, 9)["article_id"].to_list() == [101, 102, 103]  # only the delete
    assert 1 in s.authors_hidden_from(2).tolist()  # the blocked account loses the blocker
    assert s.apply(feed.head(0), 1).is_empty()
