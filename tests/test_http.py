"""The HTTP service over the serving file: JSON feeds, cursor pagination on one
generation, request-time filters, health, hostile input, publishes under load."""

from __future__ import annotations

import base64
import threading
from collections import Counter
from datetime import datetime, timedelta
from urllib.parse import quote

import polars as pl
import pytest
from serving_helpers import ServerThread, get, publish

from feed_dagster.data.schema import ACTIONS
from feed_dagster.incoming import ingest_batches, pending_batches
from feed_dagster.paths import safety_path_for
from feed_dagster.serving import FeedReader, read_meta
from feed_dagster.serving.http import (
    MAX_ID,
    BadRequest,
    create_app,
    decode_cursor,
    encode_cursor,
)
from feed_dagster.serving.safety import SafetyList


def fullest_user(feeds: pl.DataFrame) -> int:
    counts = feeds.group_by("user_id").len().sort(["len", "user_id"], descending=[True, False])
    return int(counts["user_id"][0])


def test_feed_json_matches_the_serving_file(server, serving, feeds) -> None:
    user = fullest_user(feeds)
    status, body = get(f"{server.base}/v1/feeds/{user}")
    assert status == 200
    expected = FeedReader(serving).get_feed(user)
    assert [i["post"]["article_id"] for i in body["items"]] == expected["article_id"].to_list()
    assert [i["position"] for i in body["items"]] == expected["position"].to_list()
    assert body["generation_id"] == read_meta(serving)["generation_id"]
    assert body["model_version"] == "m1" and body["vector_table_version"] == "v1"
    first = body["items"][0]
    assert set(first["probabilities"]) == set(ACTIONS)
    assert first["probabilities"]["favorite"] == pytest.approx(expected["p_favorite"][0])
    assert first["post"]["title"] == expected["title"][0]
    assert first["author"]["handle"] == expected["author_handle"][0]
    assert first["source"] in ("in_network", "out_of_network")
    assert first["reason"] == expected["reason"][0]
    assert first["model_version"] == "m1"
    assert body["next_cursor"] is None  # the whole feed fits the default limit of 35


def test_pagination_walks_the_feed_on_one_generation(server, serving, feeds, tiny_world):
    user = fullest_user(feeds)
    full = feeds.filter(pl.col("user_id") == user).sort("position")["article_id"].to_list()
    assert len(full) > 10
    seen, cursor, pages = [], None, 0
    while True:
        url = f"{server.base}/v1/feeds/{user}?limit=4" + (f"&cursor={cursor}" if cursor else "")
        status, body = get(url)
        assert status == 200
        assert len(body["items"]) <= 4
        seen += [i["post"]["article_id"] for i in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == full and pages == -(-len(full) // 4)

    # A cursor is bound to its user.
    _, first = get(f"{server.base}/v1/feeds/{user}?limit=4")
    other = int(feeds.filter(pl.col("user_id") != user)["user_id"][0])
    status, body = get(f"{server.base}/v1/feeds/{other}?cursor={first['next_cursor']}")
    assert status == 422 and "belongs to user" in body["error"]

    # A publish between two pages: the next page says so instead of mixing generations.
    new_generation = publish(feeds, serving, tiny_world, model_version="m2")
    status, body = get(f"{server.base}/v1/feeds/{user}?limit=4&cursor={first['next_cursor']}")
    assert status == 409
    assert body["generation_id"] == new_generation and "first page" in body["error"]
    status, body = get(f"{server.base}/v1/feeds/{user}?limit=4")
    assert status == 200 and body["generation_id"] == new_generation
    assert body["model_version"] == "m2"


def test_unknown_user_is_a_clear_404(server, feeds) -> None:
    missing = int(feeds["user_id"].max()) + 1000
    for user in (missing, MAX_ID):
        status, body = get(f"{server.base}/v1/feeds/{user}")
        assert status == 404
        assert f"user {user} has no feed" in body["error"]


HOSTILE_IDS = {
    "negative": "-1",
    "huge": "9" * 30,
    "bigint_plus_one": str(MAX_ID + 1),
    "float": "1.5",
    "exponent": "1e3",
    "arabic_indic_digits": "١٢",
    "fullwidth_digits": "１２",
    "emoji": "😀",
    "sql": "1 OR 1=1",
    "sql_quote": "1'; DROP TABLE feeds; --",
    "whitespace": " 7",
    "plus_sign": "+7",
    "hex": "0x10",
    "very_long": "1" * 8_000,
    "very_long_text": "a" * 8_000,
    "null_byte": "1\x00",
    "dots": "..",
}


@pytest.mark.parametrize("raw", HOSTILE_IDS.values(), ids=HOSTILE_IDS.keys())
def test_hostile_user_ids_are_422_and_never_reach_the_reader(server, raw) -> None:
    calls: list[tuple] = []
    reader = server.app.state.service.reader
    original = reader.page
    reader.page = lambda *a, **k: calls.append(a) or original(*a, **k)  # type: ignore[method-assign]
    try:
        status, body = get(f"{server.base}/v1/feeds/{quote(raw, safe='')}")
    finally:
        reader.page = original  # type: ignore[method-assign]
    assert status == 422, body
    assert "user_id" in body["error"]
    assert len(body["error"]) < 200  # the input is echoed shortened, never whole
    assert calls == []


def test_a_megabyte_of_url_is_refused_before_the_app(server) -> None:
    # uvicorn's HTTP parser refuses it (400) before any route runs; the app would 422.
    status, _ = get(f"{server.base}/v1/feeds/{'1' * 1_000_000}")
    assert status in (400, 414, 422)
    assert get(f"{server.base}/v1/health")[0] == 200  # and the server is still up


PATH_TRICKS = [
    "/v1/feeds/../health",  # normalised by the client: lands on health, not a feed
    "/v1/feeds/%2e%2e%2fhealth",
    "/v1/feeds/1%2F2",
    "/v1/feeds/1/..",
    "/v1/feeds/",
    "/v1/feeds//1",
    "/v1/feeds/1/extra",
]


@pytest.mark.parametrize("path", PATH_TRICKS)
def test_path_tricks_never_serve_a_feed(server, path) -> None:
    status, body = get(server.base + path)
    assert status in (404, 422) or (status == 200 and "items" not in body), (status, body)


HOSTILE_QUERIES = {
    "limit_zero": "limit=0",
    "limit_negative": "limit=-5",
    "limit_huge": "limit=" + "9" * 40,
    "limit_over_max": "limit=201",
    "limit_text": "limit=ten",
    "limit_float": "limit=3.5",
    "limit_unicode": "limit=" + quote("٣"),
    "limit_empty": "limit=",
    "cursor_garbage": "cursor=not-a-cursor",
    "cursor_long": "cursor=" + "A" * 5000,
    "cursor_unicode": "cursor=" + quote("é☃"),
    "cursor_sql": "cursor=" + quote("x' OR '1'='1"),
    "cursor_negative_position": "cursor=" + base64.urlsafe_b64encode(b"ab.1.-5").decode(),
    "cursor_huge_position": "cursor=" + base64.urlsafe_b64encode(b"ab.1." + b"9" * 30).decode(),
}


@pytest.mark.parametrize("query", HOSTILE_QUERIES.values(), ids=HOSTILE_QUERIES.keys())
def test_hostile_limits_and_cursors_are_422(server, feeds, query) -> None:
    user = fullest_user(feeds)
    status, body = get(f"{server.base}/v1/feeds/{user}?{query}")
    assert status == 422, body
    assert ("limit" in body["error"]) or ("cursor" in body["error"])


def test_request_time_filters_without_a_republish(
    tmp_path, server, serving, feeds, tiny_world, warehouse
):
    """Deleted posts (everyone), blocked and muted authors (that viewer) and posts the
    viewer engaged with since the publish (that viewer) leave the API's answers at once."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    user = fullest_user(feeds)
    mine = feeds.filter(pl.col("user_id") == user).sort("position")
    shared = feeds.group_by("article_id").len().filter(pl.col("len") > 1)["article_id"]
    deleted = int(mine.filter(pl.col("article_id").is_in(shared.implode()))["article_id"][0])
    rest = mine.filter((pl.col("article_id") != deleted) & pl.col("author_id").is_not_null())
    blocked = int(rest.filter(pl.col("author_id") != user)["author_id"][0])
    rest = rest.filter(pl.col("author_id") != blocked)
    engaged = int(rest["article_id"][-1])
    other = int(
        feeds.filter((pl.col("article_id") == deleted) & (pl.col("user_id") != user))["user_id"][0]
    )
    generation = read_meta(serving)["generation_id"]

    def articles(u: int) -> list[int]:
        status, body = get(f"{server.base}/v1/feeds/{u}?limit=200")
        assert status == 200 and body["generation_id"] == generation
        return [i["post"]["article_id"] for i in body["items"]]

    assert {deleted, engaged} <= set(articles(user)) and deleted in articles(other)

    pl.DataFrame(
        {"article_id": [deleted], "deleted_at": [tiny_world.now]},
        schema={"article_id": pl.Int64, "deleted_at": pl.Datetime("us")},
    ).write_parquet(incoming / "deletions-1.parquet")
    pl.DataFrame({"user_id": [user], "blocked_id": [blocked]}).write_parquet(
        incoming / "blocks-1.parquet"
    )
    pl.DataFrame(
        {
            "user_id": [user],
            "article_id": [engaged],
            "engaged_at": [tiny_world.now + timedelta(minutes=5)],
        },
        schema={"user_id": pl.Int64, "article_id": pl.Int64, "engaged_at": pl.Datetime("us")},
    ).write_parquet(incoming / "engagements-1.parquet")
    ingest_batches(warehouse, pending_batches(incoming), safety_path_for(serving))

    after = articles(user)
    blocked_posts = set(mine.filter(pl.col("author_id") == blocked)["article_id"].to_list())
    assert deleted not in after and engaged not in after
    assert not blocked_posts & set(after)
    expected = [
        a
        for a in mine["article_id"].to_list()
        if a not in {deleted, engaged} and a not in blocked_posts
    ]
    assert after == expected  # nothing else removed, order kept
    assert deleted not in articles(other)
    # The seen post is hidden from its viewer only.
    holders = feeds.filter((pl.col("article_id") == engaged) & (pl.col("user_id") != user))
    if holders.height:
        assert engaged in articles(int(holders["user_id"][0]))
    # Paging over the filtered feed: no holes, no repeats.
    walked, cursor = [], None
    while True:
        url = f"{server.base}/v1/feeds/{user}?limit=3" + (f"&cursor={cursor}" if cursor else "")
        _, body = get(url)
        walked += [i["post"]["article_id"] for i in body["items"]]
        if not (cursor := body["next_cursor"]):
            break
    assert walked == expected


def test_seen_pairs_are_kept_only_while_in_a_live_feed(
    tmp_path, serving, feeds, tiny_world, warehouse
):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    user = fullest_user(feeds)
    in_feed = int(feeds.filter(pl.col("user_id") == user)["article_id"][0])
    not_in_feed = int(
        tiny_world.articles.filter(
            ~pl.col("article_id").is_in(
                feeds.filter(pl.col("user_id") == user)["article_id"].implode()
            )
        )["article_id"][0]
    )
    pl.DataFrame(
        {
            "user_id": [user, user],
            "article_id": [in_feed, not_in_feed],
            "engaged_at": [tiny_world.now + timedelta(minutes=1)] * 2,
        },
        schema={"user_id": pl.Int64, "article_id": pl.Int64, "engaged_at": pl.Datetime("us")},
    ).write_parquet(incoming / "engagements-1.parquet")
    safety = safety_path_for(serving)
    report = ingest_batches(warehouse, pending_batches(incoming), safety)
    assert report.safety_file == safety
    listed = SafetyList.read(safety)
    assert listed.seen_by(user).tolist() == [in_feed]  # small: only what a live feed shows
    # A publish without that post prunes the pair at the next ingest.
    publish(feeds.filter(pl.col("article_id") != in_feed), serving, tiny_world)
    pl.DataFrame({"user_id": [user], "muted_id": [user + 1]}).write_parquet(
        incoming / "mutes-1.parquet"
    )
    ingest_batches(warehouse, pending_batches(incoming), safety)
    assert SafetyList.read(safety).seen_by(user).size == 0


def test_health(tmp_path, server, serving) -> None:
    status, body = get(f"{server.base}/v1/health")
    meta = read_meta(serving)
    assert status == 200 and body["status"] == "ok"
    assert body["generation_id"] == meta["generation_id"]
    assert body["rows"] == meta["rows"] and body["users"] == meta["users"]
    assert 0 <= body["age_seconds"] < 600
    service = server.app.state.service
    old = service.health(now=meta["published_at"] + timedelta(hours=3))
    assert old["status"] == "stale" and old["age_seconds"] == pytest.approx(3 * 3600)

    # A short limit makes the live generation stale through HTTP too.
    with ServerThread(create_app(serving, stale_after=timedelta(seconds=0))) as srv:
        status, body = get(f"{srv.base}/v1/health")
        assert status == 200 and body["status"] == "stale"
    missing = tmp_path / "nothing" / "feeds.duckdb"
    with ServerThread(create_app(missing)) as srv:
        status, body = get(f"{srv.base}/v1/health")
        assert status == 503 and body["status"] == "unavailable"
        assert str(missing) in body["error"]
        status, body = get(f"{srv.base}/v1/feeds/1")
        assert status == 503
        status, text = get(f"{srv.base}/")
        assert status == 503 and "not been published" in text


def test_publishes_during_requests_cause_no_errors(server, serving, feeds, tiny_world) -> None:
    users = feeds["user_id"].unique().sort().to_list()
    stop = threading.Event()
    statuses: Counter[int] = Counter()
    generations: set[str] = set()
    errors: list[str] = []

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            user = users[i % len(users)]
            i += 7
            try:
                status, body = get(f"{server.base}/v1/feeds/{user}")
            except Exception as exc:  # a refused or broken connection is a failure too
                errors.append(repr(exc))
                continue
            statuses[status] += 1
            if status == 200:
                generations.add(body["generation_id"])
                assert body["items"], body
            else:
                errors.append(f"{status}: {body}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    published = {read_meta(serving)["generation_id"]}
    try:
        for n in range(3):
            published.add(publish(feeds, serving, tiny_world, model_version=f"m{n + 2}"))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert statuses[200] > 20
    assert generations <= published and len(generations) >= 2  # requests spanned publishes


def test_page_renders_a_users_feed(server, feeds) -> None:
    user = fullest_user(feeds)
    status, text = get(f"{server.base}/?user={user}")
    assert status == 200
    titles = feeds.filter(pl.col("user_id") == user).sort("position")["article_id"].to_list()
    assert f'data-article="{titles[0]}"' in text
    assert 'class="bar"' in text and "generation" in text
    status, text = get(f"{server.base}/?user={quote('<script>alert(1)</script>')}")
    assert status == 422 and "<script>alert(1)" not in text  # echoed escaped
    status, text = get(f"{server.base}/")
    assert status == 200 and "Examples" in text


def test_serve_command_wires_uvicorn(monkeypatch, tmp_path) -> None:
    import uvicorn

    from feed_dagster.cli import main
    from feed_dagster.serving.http import ENV_MEMORY, ENV_PATH, ENV_STALE, app_from_env

    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    for name in (ENV_PATH, ENV_STALE, ENV_MEMORY):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "f.duckdb"
    args = ["serve", "--port", "8123", "--path", str(path), "--workers", "2"]
    assert main([*args, "--memory-limit", "512MB", "--stale-after-hours", "0.5"]) == 0
    assert seen["port"] == 8123 and seen["host"] == "127.0.0.1" and seen["workers"] == 2
    assert seen["factory"] and seen["app"] == "feed_dagster.serving.http:app_from_env"
    app = app_from_env()
    assert app.state.service.reader.path == path
    assert app.state.service.stale_after == timedelta(minutes=30)
    assert app.state.service.reader.memory_limit == "512MB"
    for name in (ENV_PATH, ENV_STALE, ENV_MEMORY):
        monkeypatch.delenv(name)


def test_generated_at_is_iso(server, feeds) -> None:
    _, body = get(f"{server.base}/v1/feeds/{fullest_user(feeds)}")
    assert datetime.fromisoformat(body["generated_at"]) == datetime(2026, 1, 7)


def test_cursor_round_trip() -> None:
    cursor = encode_cursor("0f" * 16, 42, 7)
    assert decode_cursor(cursor) == ("0f" * 16, 42, 7)
    assert "=" not in cursor and "/" not in cursor and "+" not in cursor  # URL-safe
    for bad in (cursor[:-3], cursor + "!", "", "=" * 8):
        with pytest.raises(BadRequest):
            decode_cursor(bad)
