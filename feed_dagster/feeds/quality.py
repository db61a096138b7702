"""Offline quality of served feeds: recall@k of later positive engagements, and the two
classic feeds a ranked feed must beat (chronological following, global popularity).

Protocol: feeds are computed at `now` from data strictly before it; the positives are the
(user, post) pairs a user engaged with positively at or after `now`. Only posts published
before `now` could have been in a feed computed then, so recall's denominator counts those
alone. Per-user recall is averaged over users with at least one such positive (macro); the
micro average pools every pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from feed_dagster.data.schema import DEFAULT_CANDIDATE_WINDOW, POSITIVE_ACTIONS
from feed_dagster.pipeline.tables import published_between

PAIR = {"user_id": pl.Int64, "article_id": pl.Int64}


def _positive(engagements: pl.DataFrame) -> pl.Expr:
    return pl.any_horizontal([pl.col(a) for a in POSITIVE_ACTIONS if a in engagements.columns])


def later_positives(
    engagements: pl.DataFrame, articles: pl.DataFrame, start: datetime
) -> pl.DataFrame:
    """Distinct (user_id, article_id) positively engaged at or after `start` whose post was
    published strictly before `start` (the only ones a feed built at `start` can hold)."""
    published = articles.filter(pl.col("published_at") < start).select("article_id")
    return (
        engagements.filter((pl.col("engaged_at") >= start) & _positive(engagements))
        .select(pl.col("user_id").cast(pl.Int64), pl.col("article_id").cast(pl.Int64))
        .join(published, on="article_id", how="semi")
        .unique()
        .sort("user_id", "article_id")
    )


@dataclass(frozen=True)
class Recall:
    macro: float  # mean over users with at least one positive
    micro: float  # hits / positives over all those users
    users: int  # users with at least one positive
    positives: int
    hits: int


def recall_at_k(feeds: pl.DataFrame, positives: pl.DataFrame, k: int = 35) -> Recall:
    """Recall of `positives` (user_id, article_id) by the first `k` posts of each feed.

    `feeds` has user_id, article_id and optionally position (0 = top); without it rows are
    taken in order. A user without a feed counts with recall 0.
    """
    if "position" in feeds.columns:
        feeds = feeds.sort("user_id", "position")
    top = (
        feeds.select(pl.col("user_id").cast(pl.Int64), pl.col("article_id").cast(pl.Int64))
        .filter(pl.int_range(pl.len()).over("user_id") < k)
        .unique()
        .with_columns(hit=pl.lit(True))
    )
    per_user = (
        positives.select(*PAIR)
        .unique()
        .join(top, on=["user_id", "article_id"], how="left")
        .group_by("user_id")
        .agg(n=pl.len(), hits=pl.col("hit").fill_null(False).sum())
    )
    if per_user.is_empty():
        return Recall(float("nan"), float("nan"), 0, 0, 0)
    n, hits = per_user["n"].to_numpy(), per_user["hits"].to_numpy()
    return Recall(
        macro=float(np.mean(hits / n)),
        micro=float(hits.sum() / n.sum()),
        users=len(n),
        positives=int(n.sum()),
        hits=int(hits.sum()),
    )


def _recent(articles: pl.DataFrame, now: datetime, window: timedelta | None) -> pl.DataFrame:
    """Posts published in (now - window, now); every post before `now` when window is None."""
    after = None if window is None else now - window
    return articles.filter(published_between(after, now, include_now=False)).select(
        "article_id", "author_id", "published_at"
    )


def _users(user_ids: np.ndarray | list[int]) -> pl.DataFrame:
    return pl.DataFrame({"user_id": np.asarray(user_ids, dtype=np.int64)}).unique()


def chronological_following_feed(
    articles: pl.DataFrame,
    follows: pl.DataFrame,
    user_ids: np.ndarray | list[int],
    now: datetime,
    k: int = 35,
    window: timedelta | None = DEFAULT_CANDIDATE_WINDOW,
) -> pl.DataFrame:
    """Per user the `k` newest posts of (now - window, now) by accounts followed before
    `now`, own posts excluded: (user_id, article_id, position). `window` is the world's
    candidate window (None = no age limit)."""
    followed = follows.filter(pl.col("followed_at") < now).select(
        pl.col("follower_id").cast(pl.Int64).alias("user_id"),
        pl.col("followee_id").cast(pl.Int64).alias("author_id"),
    )
    rows = (
        followed.join(_users(user_ids), on="user_id", how="semi")
        .unique()
        .join(_recent(articles, now, window), on="author_id")
        .filter(pl.col("author_id") != pl.col("user_id"))
        .sort(["user_id", "published_at", "article_id"], descending=[False, True, True])
    )
    return _first_k(rows, k)


def popularity_feed(
    articles: pl.DataFrame,
    engagements: pl.DataFrame,
    user_ids: np.ndarray | list[int],
    now: datetime,
    k: int = 35,
    window: timedelta | None = DEFAULT_CANDIDATE_WINDOW,
) -> pl.DataFrame:
    """Per user the `k` posts of (now - window, now) with the most positive engagements
    before `now` (ties: newer first), own posts excluded: (user_id, article_id, position).
    `window` is the world's candidate window (None = no age limit)."""
    counts = (
        engagements.filter((pl.col("engaged_at") < now) & _positive(engagements))
        .group_by("article_id")
        .agg(n=pl.len())
    )
    ranked = (
        _recent(articles, now, window)
        .join(counts, on="article_id", how="left")
        .with_columns(pl.col("n").fill_null(0))
        .sort(["n", "published_at", "article_id"], descending=[True, True, True])
    )
    # A user loses only their own posts from the global list: grow its head until k posts
    # remain even for the author with the most posts in it.
    n = k
    while True:
        head = ranked.head(n)
        own_max = int(head.group_by("author_id").len()["len"].max() or 0) if head.height else 0
        if n - own_max >= k or n >= ranked.height:
            break
        n = k + own_max
    rows = (
        _users(user_ids)
        .sort("user_id")
        .join(head.with_row_index("_rank"), how="cross")
        .filter(pl.col("author_id").ne_missing(pl.col("user_id")))
        .sort("user_id", "_rank")
    )
    return _first_k(rows, k)


def _first_k(rows: pl.DataFrame, k: int) -> pl.DataFrame:
    """The first `k` rows per user (rows sorted by user, best first) with 0-based position."""
    return (
        rows.with_columns(position=pl.int_range(pl.len(), dtype=pl.Int32).over("user_id"))
        .filter(pl.col("position") < k)
        .select(pl.col("user_id").cast(pl.Int64), pl.col("article_id").cast(pl.Int64), "position")
    )
