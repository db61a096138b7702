"""Query hydrators: one test per hydrator, on hand-made tables."""

from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl

from feed_dagster.data.schema import conform
from feed_dagster.pipeline.config import QueryConfig
from feed_dagster.pipeline.query import (
    hydrate_blocks,
    hydrate_follows,
    hydrate_history,
    hydrate_muted_keywords,
    hydrate_mutes,
    hydrate_query,
    hydrate_seen,
    hydrate_served,
    hydrate_topic_follows,
    hydrate_users,
)
from feed_dagster.pipeline.tables import user_frame

NOW = datetime(2026, 1, 3)
H = timedelta(hours=1)
BATCH = user_frame([1, 2])


def test_hydrate_users_keeps_batch_and_handles() -> None:
    users = conform("users", pl.DataFrame({"user_id": [1, 2, 3], "handle": ["a", "b", "c"]}))
    out = hydrate_users({"users": users}, user_frame([2, 1, 2, 9]))
    assert out.to_dicts() == [
        {"user_id": 1, "handle": "a"},
        {"user_id": 2, "handle": "b"},
        {"user_id": 9, "handle": None},
    ]


def test_hydrate_history_newest_before_now_capped() -> None:
    eng = conform(
        "engagements",
        pl.DataFrame(
            {
                "user_id": [1, 1, 1, 1, 2, 3],
                "article_id": [10, 11, 12, 13, 10, 10],
                "engaged_at": [NOW - 3 * H, NOW - 2 * H, NOW - H, NOW + H, NOW - H, NOW - H],
                "click": [True] * 6,
            }
        ),
    )
    arts = conform(
        "articles", pl.DataFrame({"article_id": [10, 11, 12, 13], "topic": [1, 2, 3, 4]})
    )
    out = hydrate_history(
        {"engagements": eng, "articles": arts}, BATCH, NOW, QueryConfig(history_max=2)
    )
    # User 1: the two newest before now (13 is in the future), oldest first; user 3 is
    # outside the batch.
    assert out.select("user_id", "article_id", "topic").rows() == [
        (1, 11, 2),
        (1, 12, 3),
        (2, 10, 1),
    ]


def test_hydrate_follows_and_topic_follows() -> None:
    follows = conform(
        "follows", pl.DataFrame({"follower_id": [1, 1, 2, 3], "followee_id": [5, 6, 5, 1]})
    )
    topics = conform("topic_follows", pl.DataFrame({"user_id": [1, 3], "topic": [7, 8]}))
    tables = {"follows": follows, "topic_follows": topics}
    assert hydrate_follows(tables, BATCH).rows() == [(1, 5), (1, 6), (2, 5)]
    assert hydrate_topic_follows(tables, BATCH).rows() == [(1, 7)]


def test_hydrate_blocks_both_directions_and_mutes() -> None:
    blocks = conform("blocks", pl.DataFrame({"user_id": [1, 7], "blocked_id": [5, 2]}))
    mutes = conform("mutes", pl.DataFrame({"user_id": [2, 8], "muted_id": [6, 1]}))
    blocked, blocked_by = hydrate_blocks({"blocks": blocks}, BATCH)
    assert blocked.rows() == [(1, 5)]
    assert blocked_by.rows() == [(2, 7)]  # user 7 blocked user 2
    assert hydrate_mutes({"mutes": mutes}, BATCH).rows() == [(2, 6)]


def test_hydrate_muted_keywords_normalised() -> None:
    kw = conform(
        "muted_keywords",
        pl.DataFrame({"user_id": [1, 1, 2, 3], "keyword": ["  Spoiler ", "World  Cup", "!!", "x"]}),
    )
    out = hydrate_muted_keywords({"muted_keywords": kw}, BATCH)
    # Lower case, single spaces, padded; a keyword without any word characters is dropped.
    assert out.rows() == [(1, " spoiler "), (1, " world cup ")]


def test_hydrate_seen_impressions_and_engagements_before_now() -> None:
    imp = conform(
        "impressions",
        pl.DataFrame(
            {
                "user_id": [1, 1, 2],
                "article_id": [10, 11, 12],
                "shown_at": [NOW - H, NOW + H, NOW - H],
            }
        ),
    )
    eng = conform(
        "engagements",
        pl.DataFrame({"user_id": [2, 3], "article_id": [13, 14], "engaged_at": [NOW - H, NOW - H]}),
    )
    out = hydrate_seen({"impressions": imp, "engagements": eng}, BATCH, NOW)
    assert out.rows() == [(1, 10), (2, 12), (2, 13)]


def test_hydrate_served_optional() -> None:
    assert hydrate_served(None, BATCH).is_empty()
    served = pl.DataFrame({"user_id": [1, 3, 1], "article_id": [10, 11, 10]})
    assert hydrate_served(served, BATCH).rows() == [(1, 10)]


def test_hydrate_query_bundles_everything(tiny_world) -> None:
    users = tiny_world.users["user_id"].head(10).to_numpy()
    q = hydrate_query(tiny_world, users, tiny_world.now)
    assert q.user_ids.tolist() == sorted(users.tolist())
    for frame in (q.history, q.follows, q.blocks, q.mutes, q.muted_keywords, q.seen):
        assert set(frame["user_id"].unique().to_list()) <= set(users.tolist())
    assert q.history["engaged_at"].max() < tiny_world.now
    assert q.served.is_empty()
