"""Query hydration: everything the later stages need to know about a batch of users.

Each hydrator reads the canonical tables for the whole batch at once and returns one small
frame keyed by user_id; `hydrate_query` runs them all and bundles the result in a `Query`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import polars as pl

from feed_dagster.data.schema import ACTIONS, World
from feed_dagster.pipeline.config import QueryConfig
from feed_dagster.pipeline.tables import (
    Tables,
    as_tables,
    naive_utc,
    rows_with,
    run_position,
    table,
    user_frame,
)

PAIR = {"user_id": pl.Int64, "article_id": pl.Int64}
AUTHOR_PAIR = {"user_id": pl.Int64, "author_id": pl.Int64}
ARTICLE_ID = {"article_id": pl.Int64}


@dataclass(frozen=True)
class Query:
    """The hydrated query of a batch of users (the scoring context handed to a Scorer).

    Every frame is keyed by user_id and holds only users of the batch.
    """

    now: datetime
    users: pl.DataFrame  # user_id, handle
    history: pl.DataFrame  # engagements before now + the post's author_id, topic
    follows: pl.DataFrame  # user_id, author_id
    topic_follows: pl.DataFrame  # user_id, topic
    blocks: pl.DataFrame  # user_id, author_id: the viewer blocked the author
    blocked_by: pl.DataFrame  # user_id, author_id: the author blocked the viewer
    mutes: pl.DataFrame  # user_id, author_id
    muted_keywords: pl.DataFrame  # user_id, keyword (lower case, whitespace-normalised)
    seen: pl.DataFrame  # user_id, article_id: impressed or engaged before now
    served: pl.DataFrame  # user_id, article_id: in the previously published feed
    # article_id of every deleted post (the same for all users of the batch)
    deleted: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=ARTICLE_ID))

    @property
    def user_ids(self) -> np.ndarray:
        return self.users["user_id"].to_numpy()


def hydrate_users(tables: Tables, batch: pl.DataFrame) -> pl.DataFrame:
    """The batch with each user's handle (null for ids the users table lacks)."""
    users = rows_with(table(tables, "users"), "user_id", batch["user_id"])
    return batch.join(users.select("user_id", "handle"), on="user_id", how="left")


def hydrate_history(
    tables: Tables, batch: pl.DataFrame, now: datetime, cfg: QueryConfig
) -> pl.DataFrame:
    """The newest `history_max` engagements of each user before `now`, oldest first."""
    eng = (
        table(tables, "engagements")
        .join(batch, on="user_id", how="semi")
        .filter(pl.col("engaged_at") < now)
        .select("user_id", "article_id", "engaged_at", *ACTIONS, "dwell_seconds")
    )
    recent = (
        eng.sort(["user_id", "engaged_at", "article_id"], descending=[False, True, False])
        .filter(run_position("user_id") < cfg.history_max)
        .sort(["user_id", "engaged_at", "article_id"])
    )
    articles = rows_with(table(tables, "articles"), "article_id", recent["article_id"])
    return recent.join(
        articles.select("article_id", "author_id", "topic"), on="article_id", how="left"
    )


def hydrate_follows(tables: Tables, batch: pl.DataFrame) -> pl.DataFrame:
    """Accounts each user follows."""
    return (
        table(tables, "follows")
        .select(pl.col("follower_id").alias("user_id"), pl.col("followee_id").alias("author_id"))
        .join(batch, on="user_id", how="semi")
        .unique()
        .sort(["user_id", "author_id"])
    )


def hydrate_topic_follows(tables: Tables, batch: pl.DataFrame) -> pl.DataFrame:
    """Topics each user follows."""
    return (
        table(tables, "topic_follows")
        .select("user_id", "topic")
        .join(batch, on="user_id", how="semi")
        .unique()
        .sort(["user_id", "topic"])
    )


def hydrate_blocks(tables: Tables, batch: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(authors each user blocked, authors who blocked each user)."""
    blocks = table(tables, "blocks")
    blocked = (
        blocks.select("user_id", pl.col("blocked_id").alias("author_id"))
        .join(batch, on="user_id", how="semi")
        .unique()
    )
    blocked_by = (
        blocks.select(pl.col("blocked_id").alias("user_id"), pl.col("user_id").alias("author_id"))
        .join(batch, on="user_id", how="semi")
        .unique()
    )
    return blocked.sort(["user_id", "author_id"]), blocked_by.sort(["user_id", "author_id"])


def hydrate_mutes(tables: Tables, batch: pl.DataFrame) -> pl.DataFrame:
    """Authors each user muted."""
    return (
        table(tables, "mutes")
        .select("user_id", pl.col("muted_id").alias("author_id"))
        .join(batch, on="user_id", how="semi")
        .unique()
        .sort(["user_id", "author_id"])
    )


def normalise_text(expr: pl.Expr) -> pl.Expr:
    """Lower-case word tokens joined by single spaces and padded with one space each side.

    A keyword normalised the same way is a whole-word (or whole-phrase) match exactly when
    it is a substring of the normalised text, with no regex escaping of user input.
    """
    # Every run of non-word characters becomes one space: the words joined by single
    # spaces, as extracting them and joining would give, without a list per post (a third
    # less time on 150k posts of synthetic:l).
    words = expr.fill_null("").str.to_lowercase().str.replace_all(r"\W+", " ").str.strip_chars(" ")
    return pl.lit(" ") + words + pl.lit(" ")


def hydrate_muted_keywords(tables: Tables, batch: pl.DataFrame) -> pl.DataFrame:
    """Muted keywords per user, normalised (see `normalise_text`); empty keywords dropped."""
    kw = (
        table(tables, "muted_keywords")
        .join(batch, on="user_id", how="semi")
        .select("user_id", normalise_text(pl.col("keyword")).alias("keyword"))
        .filter(pl.col("keyword").str.strip_chars().str.len_chars() > 0)
    )
    return kw.unique().sort(["user_id", "keyword"])


def hydrate_seen(tables: Tables, batch: pl.DataFrame, now: datetime) -> pl.DataFrame:
    """Posts each user was shown or engaged with before `now`.

    Engagements count too: a source such as EBNeRD's reading history has engagements
    without logged impressions, and a post already read is as seen as one shown.
    """
    shown = (
        table(tables, "impressions")
        .join(batch, on="user_id", how="semi")
        .filter(pl.col("shown_at") < now)
        .select("user_id", "article_id")
    )
    engaged = (
        table(tables, "engagements")
        .join(batch, on="user_id", how="semi")
        .filter(pl.col("engaged_at") < now)
        .select("user_id", "article_id")
    )
    return pl.concat([shown, engaged]).unique().sort(["user_id", "article_id"])


def hydrate_served(served: pl.DataFrame | None, batch: pl.DataFrame) -> pl.DataFrame:
    """Posts in each user's previously published feed (empty on the first publish)."""
    if served is None:
        return pl.DataFrame(schema=PAIR)
    return (
        served.select(pl.col("user_id").cast(pl.Int64), pl.col("article_id").cast(pl.Int64))
        .join(batch, on="user_id", how="semi")
        .unique()
        .sort(["user_id", "article_id"])
    )


def hydrate_deleted(tables: Tables) -> pl.DataFrame:
    """Ids of deleted posts (tombstones): never served to anyone, whoever follows the author."""
    return table(tables, "deleted_posts").select(pl.col("article_id").cast(pl.Int64)).unique()


def hydrate_query(
    tables: World | Tables,
    user_ids: np.ndarray | list[int],
    now: datetime,
    cfg: QueryConfig | None = None,
    served: pl.DataFrame | None = None,
) -> Query:
    """Run every query hydrator for the batch `user_ids` at time `now`."""
    cfg = cfg or QueryConfig()
    tables = as_tables(tables)
    now = naive_utc(now)
    batch = user_frame(user_ids)
    blocks, blocked_by = hydrate_blocks(tables, batch)
    return Query(
        now=now,
        users=hydrate_users(tables, batch),
        history=hydrate_history(tables, batch, now, cfg),
        follows=hydrate_follows(tables, batch),
        topic_follows=hydrate_topic_follows(tables, batch),
        blocks=blocks,
        blocked_by=blocked_by,
        mutes=hydrate_mutes(tables, batch),
        muted_keywords=hydrate_muted_keywords(tables, batch),
        seen=hydrate_seen(tables, batch, now),
        served=hydrate_served(served, batch),
        deleted=hydrate_deleted(tables),
    )
