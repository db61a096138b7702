"""Recall of later positives and the chronological / popularity baseline feeds, on a world
of a handful of hand-written rows."""

from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl
import pytest

from feed_dagster.data.schema import conform
from feed_dagster.feeds.quality import (
    chronological_following_feed,
    later_positives,
    popularity_feed,
    recall_at_k,
)

NOW = datetime(2024, 3, 1, 12)
H = timedelta(hours=1)


def articles(rows: list[tuple[int, int, datetime]]) -> pl.DataFrame:
    """(article_id, author_id, published_at) rows."""
    df = pl.DataFrame(rows, schema=["article_id", "author_id", "published_at"], orient="row")
    return conform("articles", df)


def engagements(rows: list[tuple[int, int, datetime]], action: str = "click") -> pl.DataFrame:
    """(user_id, article_id, engaged_at) rows with one action set."""
    df = pl.DataFrame(
        rows, schema=["user_id", "article_id", "engaged_at"], orient="row"
    ).with_columns(pl.lit(True).alias(action))
    return conform("engagements", df)


def pairs(df: pl.DataFrame) -> list[tuple[int, int]]:
    return [(u, a) for u, a in df.select("user_id", "article_id").iter_rows()]


ARTICLES = articles(
    [
        (1, 10, NOW - 50 * H),  # older than 48 h
        (2, 10, NOW - 5 * H),
        (3, 11, NOW - 2 * H),
        (4, 1, NOW - 1 * H),  # user 1's own post
        (5, 11, NOW + 1 * H),  # published after now
    ]
)


def test_later_positives_keep_positive_actions_at_or_after_now_on_older_posts() -> None:
    eng = pl.concat(
        [
            engagements([(1, 2, NOW), (1, 3, NOW + H), (1, 5, NOW + 2 * H), (2, 3, NOW - H)]),
            engagements([(2, 2, NOW + H)], action="not_interested"),
            engagements([(1, 3, NOW + 3 * H)], action="favorite"),  # same pair again
        ]
    )
    got = later_positives(eng, ARTICLES, NOW)
    # (1, 5): post published after now; (2, 3): before now; (2, 2): not a positive action.
    assert pairs(got) == [(1, 2), (1, 3)]


def test_recall_macro_and_micro_over_the_first_k_posts() -> None:
    positives = pl.DataFrame({"user_id": [1, 1, 2, 3], "article_id": [2, 3, 2, 9]})
    feeds = pl.DataFrame(
        {"user_id": [1, 1, 2, 2], "article_id": [4, 2, 3, 2], "position": [0, 1, 1, 0]}
    )
    r = recall_at_k(feeds, positives, k=1)
    # k=1: user 1 gets post 4 (miss), user 2 post 2 (hit), user 3 has no feed.
    assert (r.users, r.positives, r.hits) == (3, 4, 1)
    assert r.macro == pytest.approx((0 + 1 + 0) / 3)
    assert r.micro == pytest.approx(1 / 4)
    r2 = recall_at_k(feeds, positives, k=2)
    assert r2.macro == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert r2.micro == pytest.approx(2 / 4)


def test_chronological_following_is_newest_first_from_follows_made_before_now() -> None:
    follows = pl.DataFrame(
        {
            "follower_id": [1, 1, 1, 2],
            "followee_id": [10, 11, 1, 11],
            "followed_at": [NOW - 100 * H, NOW - 100 * H, NOW - 100 * H, NOW + H],
        }
    )
    feed = chronological_following_feed(ARTICLES, conform("follows", follows), [1, 2], NOW, k=5)
    # User 1: posts 3 then 2 (post 1 too old, 4 own, 5 not yet published); user 2 followed
    # after now, so gets nothing.
    assert feed.rows() == [(1, 3, 0), (1, 2, 1)]


def test_popularity_counts_positives_before_now_and_skips_own_posts() -> None:
    eng = pl.concat(
        [
            engagements([(7, 4, NOW - H), (8, 4, NOW - H), (7, 2, NOW - H)]),
            engagements([(7, 3, NOW + H), (8, 3, NOW + H), (9, 3, NOW + H)]),  # after now
            engagements([(9, 2, NOW - H)], action="report"),  # not positive
        ]
    )
    feed = popularity_feed(ARTICLES, eng, [1, 2], NOW, k=2)
    # Counts before now: post 4 -> 2, post 2 -> 1, post 3 -> 0. User 1 wrote post 4.
    assert feed.filter(pl.col("user_id") == 1).rows() == [(1, 2, 0), (1, 3, 1)]
    assert feed.filter(pl.col("user_id") == 2).rows() == [(2, 4, 0), (2, 2, 1)]
