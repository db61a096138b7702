"""The lookup file (serving/lookup.py): the HTTP service's read path without a DuckDB scan.

Every page it serves must equal the DuckDB page query's answer: same rows, same order,
same values and nulls, the same safety filtering, the same pagination, and one generation
per page while publishes swap the file underneath."""

from __future__ import annotations

import os
import shutil
import threading
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from serving_helpers import ServerThread, get, publish

from feed_dagster.paths import safety_path_for
from feed_dagster.serving import FeedReader, publish_feeds, read_meta
from feed_dagster.serving.http import create_app
from feed_dagster.serving.lookup import (
    LookupFile,
    LookupFileError,
    _check_sorted,
    add_lookup_file,
    lookup_dir_for,
    lookup_path_for,
)


def both(path: Path) -> tuple[FeedReader, FeedReader]:
    """A reader on the lookup file and one answering from DuckDB queries."""
    fast, slow = FeedReader(path), FeedReader(path, use_lookup=False)
    assert fast.read_path.startswith("lookup file"), fast.read_path
    assert slow.read_path.startswith("duckdb")
    return fast, slow


def same_pages(fast: FeedReader, slow: FeedReader, user: int, limit: int, after: int) -> None:
    a, b = fast.page(user, limit, after), slow.page(user, limit, after)
    assert a.rows == b.rows, (user, limit, after)
    assert (a.has_more, a.user_known, a.meta) == (b.has_more, b.user_known, b.meta)


GENERATED_AT = datetime(2026, 1, 7)


def users_of(feeds: pl.DataFrame) -> list[int]:
    counts = feeds.group_by("user_id").len().sort("len", "user_id")
    ids = counts["user_id"].to_list()
    # The first and last user of the file (edges of the binary search), the shortest and
    # the fullest feeds, and a few in between.
    return sorted({min(ids), max(ids), ids[0], ids[-1], *ids[:: max(1, len(ids) // 6)]})


def test_pages_equal_the_duckdb_query(serving, feeds) -> None:
    fast, slow = both(serving)
    users = users_of(feeds)
    assert len(users) >= 5
    for user in users:
        for limit, after in [(35, 0), (200, 0), (1, 0), (4, 4), (10, 7), (35, 34), (5, 10_000)]:
            same_pages(fast, slow, user, limit, after)
    full = fast.page(users[-1], 200, 0)
    expected = feeds.filter(pl.col("user_id") == users[-1]).sort("position")
    assert [r[1] for r in full.rows] == expected["article_id"].to_list()
    # Types as DuckDB returns them: ints, floats (float32 widened exactly), strings.
    row = full.rows[0]
    assert [type(v) for v in row[:2]] == [int, int] and isinstance(row[6], float)
    assert isinstance(row[2], str) and isinstance(row[5], str)


def test_unknown_users_are_unknown(serving, feeds) -> None:
    fast, slow = both(serving)
    known = set(feeds["user_id"].to_list())
    gaps = sorted(set(range(min(known), max(known))) - known)[:3]
    for user in [-1, *gaps, max(known) + 1, max(known) + 1000, 2**63 - 1, 2**64, -(2**70)]:
        page = fast.page(user, 35, 0)
        assert page.rows == [] and not page.user_known and not page.has_more
        same_pages(fast, slow, user, 35, 0)


def test_unknown_user_is_404_and_health_names_the_read_path(server, feeds) -> None:
    status, body = get(f"{server.base}/v1/feeds/{int(feeds['user_id'].max()) + 1}")
    assert status == 404 and "has no feed" in body["error"]
    status, body = get(f"{server.base}/v1/health")
    assert status == 200 and body["read_path"].startswith("lookup file")


def test_pagination_walks_the_same_rows(serving, feeds) -> None:
    fast, slow = both(serving)
    for user in users_of(feeds):
        walks = []
        for reader in (fast, slow):
            rows, after = [], 0
            while True:
                page = reader.page(user, 4, after)
                rows += page.rows
                if not page.has_more:
                    break
                after = page.rows[-1][0]
            walks.append(rows)
        assert walks[0] == walks[1]
        expected = feeds.filter(pl.col("user_id") == user).sort("position")
        assert [r[0] for r in walks[0]] == expected["position"].to_list()


def write_safety(serving: Path, rows: list[tuple[str, int | None, int]]) -> None:
    kinds, users, targets = zip(*rows, strict=True)
    pl.DataFrame(
        {"kind": kinds, "user_id": users, "target_id": targets},
        schema={"kind": pl.String, "user_id": pl.Int64, "target_id": pl.Int64},
    ).write_parquet(safety_path_for(serving))


def test_request_time_filters_hide_the_same_rows(serving, feeds) -> None:
    fast, slow = both(serving)
    user = int(feeds.group_by("user_id").len().sort("len", descending=True)["user_id"][0])
    mine = feeds.filter(pl.col("user_id") == user).sort("position")
    authored = mine.filter(pl.col("author_id").is_not_null() & (pl.col("author_id") != user))
    deleted = int(mine["article_id"][2])
    blocked = int(authored["author_id"][-1])
    muted = int(authored.filter(pl.col("author_id") != blocked)["author_id"][0])
    seen = int(mine["article_id"][-1])
    write_safety(
        serving,
        [
            ("deleted", None, deleted),
            ("block", user, blocked),
            ("mute", user, muted),
            ("seen", user, seen),
        ],
    )
    hidden_authors = {blocked, muted}
    expected = [
        a
        for a, au in zip(mine["article_id"], mine["author_id"], strict=True)
        if a not in {deleted, seen} and au not in hidden_authors
    ]
    page = fast.page(user, 200, 0)
    assert [r[1] for r in page.rows] == expected and len(expected) < mine.height
    for limit, after in [(35, 0), (3, 0), (3, 3), (1, 1), (200, 0)]:
        same_pages(fast, slow, user, limit, after)
    # Paging over the filtered feed: no holes, no repeats, has_more exact at the end.
    walked, after = [], 0
    while True:
        page = fast.page(user, 3, after)
        walked += [r[1] for r in page.rows]
        if not page.has_more:
            break
        after = page.rows[-1][0]
    assert walked == expected
    # Another user keeps the seen post and the blocked author's posts; the deleted one goes.
    for other in users_of(feeds):
        same_pages(fast, slow, other, 200, 0)
        assert deleted not in [r[1] for r in fast.page(other, 200, 0).rows]


def test_nulls_round_trip(tmp_path, feeds) -> None:
    """Authorless posts and posts without a title (no articles table) come back as None."""
    path = tmp_path / "feeds.duckdb"
    nulls = feeds.with_columns(
        author_id=pl.when(pl.col("position") % 3 == 0).then(None).otherwise(pl.col("author_id")),
        p_reply=pl.when(pl.col("position") == 2).then(None).otherwise(pl.col("p_reply")),
    )
    publish_feeds(
        nulls,
        path,
        model_version="m",
        vector_table_version="v",
        generated_at=GENERATED_AT,
    )
    fast, slow = both(path)
    for user in users_of(feeds):
        same_pages(fast, slow, user, 200, 0)
    rows = fast.page(users_of(feeds)[-1], 200, 0).rows
    assert all(r[2] is None and r[4] is None for r in rows)  # title, author_handle
    assert any(r[3] is None for r in rows) and any(r[3] is not None for r in rows)
    # A hidden author never matches a null author (-1 stands for none).
    write_safety(path, [("block", int(feeds["user_id"][0]), 0)])
    same_pages(fast, slow, int(feeds["user_id"][0]), 200, 0)


def test_empty_generation(tmp_path, feeds) -> None:
    path = tmp_path / "feeds.duckdb"
    publish_feeds(
        feeds.head(0), path, model_version="m", vector_table_version="v", generated_at=GENERATED_AT
    )
    fast, slow = both(path)
    assert fast.page(1, 35, 0).rows == [] and not fast.page(1, 35, 0).user_known


def test_a_page_stays_on_one_generation_while_publishes_swap(serving, feeds, tiny_world) -> None:
    """Each generation shifts every score by its number: a page whose scores do not all
    match the generation its meta names would be a mix of two."""
    base = {(u, p): s for u, p, s in feeds.select("user_id", "position", "score").iter_rows()}
    users = users_of(feeds)
    stop = threading.Event()
    problems: list[str] = []
    seen: set[str] = set()
    read_paths: set[str] = set()
    pages = [0]

    def read_loop() -> None:
        reader = FeedReader(serving)
        i = 0
        while not stop.is_set():
            user = users[i % len(users)]
            i += 1
            try:
                page = reader.page(user, 35, 0)
            except Exception as exc:  # any error during a swap is a failure
                problems.append(repr(exc))
                continue
            version = page.meta["model_version"]
            seen.add(version)
            read_paths.add(reader.read_path.split(" ")[0])
            shift = 0 if version == "m1" else int(version.removeprefix("g"))
            bad = [r for r in page.rows if r[6] != pytest.approx(base[(user, r[0])] + shift)]
            if bad or not page.rows:
                problems.append(f"{version} user {user}: {len(bad)} rows of another generation")
            pages[0] += 1

    threads = [threading.Thread(target=read_loop) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for n in range(1, 5):
            shifted = feeds.with_columns(score=pl.col("score") + n)
            publish(shifted, serving, tiny_world, model_version=f"g{n}")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert problems == []
    assert pages[0] > 20 and len(seen) >= 2
    assert "lookup" in read_paths, read_paths
    # Only the live generation's lookup file and the one before it are kept.
    assert len(os.listdir(lookup_dir_for(serving))) == 2


def test_missing_lookup_file_falls_back_to_duckdb(serving, feeds) -> None:
    generation = read_meta(serving)["generation_id"]
    lookup = lookup_path_for(serving, generation)
    lookup.unlink()
    reader = FeedReader(serving)
    assert reader.read_path.startswith("duckdb (no lookup file")
    slow = FeedReader(serving, use_lookup=False)
    user = users_of(feeds)[-1]
    assert reader.page(user, 35, 0).rows == slow.page(user, 35, 0).rows
    # The HTTP service keeps answering, and says where its pages come from.
    with ServerThread(create_app(serving)) as srv:
        status, body = get(f"{srv.base}/v1/feeds/{user}")
        assert status == 200 and body["items"]
        _, health = get(f"{srv.base}/v1/health")
        assert health["read_path"].startswith("duckdb (no lookup file")
    # A lookup file added afterwards is used by readers that open the file from then on.
    assert add_lookup_file(serving) == lookup and lookup.exists()
    assert FeedReader(serving).read_path.startswith("lookup file")
    assert FeedReader(serving).page(user, 35, 0).rows == slow.page(user, 35, 0).rows


BROKEN = {
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "not_a_lookup_file": lambda b: b"PAR1" + b[4:],
    "garbled_header": lambda b: b[:16] + b"{" * 40 + b[56:],
}


@pytest.mark.parametrize("damage", BROKEN.values(), ids=BROKEN.keys())
def test_broken_lookup_file_falls_back_to_duckdb(serving, feeds, damage) -> None:
    lookup = lookup_path_for(serving, read_meta(serving)["generation_id"])
    lookup.write_bytes(damage(lookup.read_bytes()))
    reader, slow = FeedReader(serving), FeedReader(serving, use_lookup=False)
    assert reader.read_path.startswith("duckdb (unusable lookup file"), reader.read_path
    assert str(lookup) in reader.read_path
    user = users_of(feeds)[-1]
    assert reader.page(user, 35, 0).rows == slow.page(user, 35, 0).rows


def test_a_lookup_file_of_another_generation_is_refused(tmp_path, serving, feeds, tiny_world):
    old = lookup_path_for(serving, read_meta(serving)["generation_id"])
    keep = tmp_path / "old.lookup"
    shutil.copy(old, keep)
    new_generation = publish(feeds.head(100), serving, tiny_world, model_version="m2")
    new = lookup_path_for(serving, new_generation)
    shutil.copy(keep, new)  # the previous generation's file under the new name
    reader = FeedReader(serving)
    assert "holds generation" in reader.read_path and reader.read_path.startswith("duckdb")
    with pytest.raises(LookupFileError, match="rows, expected"):
        LookupFile.open(keep, read_meta_generation(keep), 1)


def read_meta_generation(path: Path) -> str:
    import orjson

    data = path.read_bytes()
    length = int.from_bytes(data[8:16], "little")
    return orjson.loads(data[16 : 16 + length])["generation_id"]


def test_a_failed_publish_leaves_no_lookup_file(tmp_path, feeds, tiny_world, monkeypatch) -> None:
    import feed_dagster.serving.publish as publish_mod

    path = tmp_path / "feeds.duckdb"
    first = publish(feeds, path, tiny_world)

    real_replace = publish_mod.replace_atomically

    def fail_the_swap(tmp: Path, dest: Path) -> None:
        # The lookup file goes into place first; the serving file's rename then fails.
        if Path(dest) == path:
            raise RuntimeError("disk full")
        real_replace(tmp, dest)

    monkeypatch.setattr(publish_mod, "replace_atomically", fail_the_swap)
    with pytest.raises(RuntimeError, match="disk full"):
        publish(feeds.head(35), path, tiny_world, model_version="m2")
    assert os.listdir(lookup_dir_for(path)) == [f"{first}.lookup"]
    assert FeedReader(path).read_path.startswith("lookup file")


def test_rows_out_of_order_are_refused() -> None:
    users = np.array([1, 1, 2, 2, 3], np.int64)
    _check_sorted(users, np.array([1, 2, 1, 2, 1], np.int32), Path("x"))
    with pytest.raises(LookupFileError, match="order at row 0"):
        _check_sorted(users, np.array([1, 1, 1, 2, 1], np.int32), Path("x"))
    with pytest.raises(LookupFileError, match="order at row 1"):
        _check_sorted(np.array([1, 1, 0], np.int64), np.array([1, 2, 1], np.int32), Path("x"))
