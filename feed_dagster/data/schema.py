"""Canonical tables every source (synthetic world, EBNeRD, parquet drop) maps into.

Everything downstream (warehouse assets, embeddings, models, the candidate pipeline) reads
only these tables, so a new data source is a new mapper, never a change downstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta

import polars as pl

# The multi-action engagement vocabulary of the reference feed system. Sources that lack an
# action (EBNeRD only has clicks and read time) leave its column False.
ACTIONS: tuple[str, ...] = (
    "favorite",
    "reply",
    "repost",
    "quote",
    "share",
    "click",
    "not_interested",
    "block_author",
    "mute_author",
    "report",
)
# Actions that count as a positive engagement (a "liked" item for baselines, peers, feed
# quality and the models' retrieval positives); the rest of ACTIONS are negative feedback.
POSITIVE_ACTIONS: tuple[str, ...] = ("favorite", "reply", "repost", "quote", "share", "click")
POST_KINDS: tuple[str, ...] = ("original", "reply", "repost", "quote")

TS = pl.Datetime("us")

USERS = {
    "user_id": pl.Int64,
    "handle": pl.String,
    "created_at": TS,
}

# A post (social world) or a news article (EBNeRD). author_id is null when the source has no
# authors; in-network retrieval then comes from followed topics only.
ARTICLES = {
    "article_id": pl.Int64,
    "author_id": pl.Int64,
    "published_at": TS,
    "kind": pl.String,  # one of POST_KINDS
    "parent_id": pl.Int64,  # replied-to / reposted / quoted post, null for originals
    "conversation_id": pl.Int64,  # thread root; equals article_id for originals
    "topic": pl.Int32,
    "topic_name": pl.String,
    "title": pl.String,
    "text": pl.String,
}

# One row per (user, article, impression) with at least one action. impression_id is null
# for engagements that happened outside a logged slate (e.g. EBNeRD reading history).
ENGAGEMENTS = {
    "user_id": pl.Int64,
    "article_id": pl.Int64,
    "impression_id": pl.Int64,
    "engaged_at": TS,
    **{a: pl.Boolean for a in ACTIONS},
    "dwell_seconds": pl.Float32,
}

# One row per article shown in a slate (position 0 = top).
IMPRESSIONS = {
    "impression_id": pl.Int64,
    "user_id": pl.Int64,
    "article_id": pl.Int64,
    "position": pl.Int32,
    "shown_at": TS,
    "is_heldout": pl.Boolean,
}

# The hidden ground-truth probability of each action for every held-out impression row of
# the synthetic world (empty for real data), so evaluation can compute an oracle upper bound.
# Kept apart from impressions so the large training period carries no null columns.
IMPRESSION_TRUTH = {
    "impression_id": pl.Int64,
    "article_id": pl.Int64,
    **{f"true_p_{a}": pl.Float32 for a in ACTIONS},
    "true_dwell_seconds": pl.Float32,
}

FOLLOWS = {"follower_id": pl.Int64, "followee_id": pl.Int64, "followed_at": TS}
TOPIC_FOLLOWS = {"user_id": pl.Int64, "topic": pl.Int32}
BLOCKS = {"user_id": pl.Int64, "blocked_id": pl.Int64}
MUTES = {"user_id": pl.Int64, "muted_id": pl.Int64}
MUTED_KEYWORDS = {"user_id": pl.Int64, "keyword": pl.String}
# Tombstones: posts their author (or moderation) deleted. The rows of `articles` stay, so
# engagement history and evaluation keep their meaning; feeds and readers never show them.
DELETED_POSTS = {"article_id": pl.Int64, "deleted_at": TS}

DEFAULT_CANDIDATE_WINDOW = timedelta(hours=48)

TABLE_SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    "users": USERS,
    "articles": ARTICLES,
    "engagements": ENGAGEMENTS,
    "impressions": IMPRESSIONS,
    "impression_truth": IMPRESSION_TRUTH,
    "follows": FOLLOWS,
    "topic_follows": TOPIC_FOLLOWS,
    "blocks": BLOCKS,
    "mutes": MUTES,
    "muted_keywords": MUTED_KEYWORDS,
    "deleted_posts": DELETED_POSTS,
}

# One predicted probability column per action, in ACTIONS order: scorers fill them, served
# feeds carry them.
ACTION_COLUMNS: tuple[str, ...] = tuple(f"p_{a}" for a in ACTIONS)
# A served feed row: what the pipeline's selector returns, a shard file holds and the serving
# file publishes. It lives here, beside the tables, so that the pipeline and serving both read
# it without serving depending on the pipeline.
FEED_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.Int64(),
    "position": pl.Int32(),
    "article_id": pl.Int64(),
    "author_id": pl.Int64(),
    "score": pl.Float64(),
    "source": pl.String(),
    **{c: pl.Float32() for c in ACTION_COLUMNS},
    "dwell_seconds": pl.Float32(),
    "reason": pl.String(),
}


@dataclass(frozen=True)
class World:
    """One consistent snapshot of every canonical table plus the time frame it covers.

    `now` is the moment feeds are computed for; impressions at or after `heldout_start`
    are the evaluation period.
    """

    users: pl.DataFrame
    articles: pl.DataFrame
    engagements: pl.DataFrame
    impressions: pl.DataFrame
    impression_truth: pl.DataFrame
    follows: pl.DataFrame
    topic_follows: pl.DataFrame
    blocks: pl.DataFrame
    mutes: pl.DataFrame
    muted_keywords: pl.DataFrame
    window_start: datetime
    heldout_start: datetime
    now: datetime
    # How old a post may be and still be a feed candidate: news lives hours to days, a
    # catalog's items do not age (None = no limit). Sources and the age filter follow it.
    candidate_window: timedelta | None = DEFAULT_CANDIDATE_WINDOW
    # Sources know no deletions; only ingested batches (replayed on a rebuild) bring them.
    deleted_posts: pl.DataFrame = field(
        default_factory=lambda: pl.DataFrame(schema=TABLE_SCHEMAS["deleted_posts"])
    )

    def tables(self) -> dict[str, pl.DataFrame]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in TABLE_SCHEMAS}


def conform(name: str, df: pl.DataFrame) -> pl.DataFrame:
    """Select and cast a frame to the canonical schema of table `name`, in canonical order.

    Missing nullable columns are added as nulls (action columns as False) so mappers only
    need to provide what their source has.
    """
    schema = TABLE_SCHEMAS[name]
    exprs = []
    for col, dtype in schema.items():
        if col in df.columns:
            exprs.append(pl.col(col).cast(dtype))
        elif col in ACTIONS:
            exprs.append(pl.lit(False, dtype=pl.Boolean).alias(col))
        else:
            exprs.append(pl.lit(None, dtype=dtype).alias(col))
    return df.select(exprs)
