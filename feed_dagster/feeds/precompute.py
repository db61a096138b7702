"""One user shard's feeds, from the warehouse tables to the rows its shard file holds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from feed_dagster.artifacts import Location
from feed_dagster.data.warehouse import ENGAGEMENT_USERS, IMPRESSION_TOTALS, read_tables
from feed_dagster.feeds.build import OPTIONAL_TABLES, PIPELINE_TABLES, build_feeds
from feed_dagster.feeds.model_backends import ModelLocations, RankerScorer
from feed_dagster.feeds.shards import users_in_shard
from feed_dagster.models.compiled import compile_requested
from feed_dagster.models.train import torch_threads
from feed_dagster.pipeline.config import PipelineConfig, resolve_window
from feed_dagster.pipeline.stats import PipelineStats
from feed_dagster.pipeline.tables import Tables, candidate_window, published_between


@dataclass(frozen=True)
class ShardFeeds:
    """A shard's feeds, the pipeline's summed stats, the model and vector-table versions
    that built them, and the `now` they were built at."""

    feeds: pl.DataFrame
    stats: PipelineStats
    versions: dict[str, str]
    now: datetime


def read_shard_tables(
    path: Location,
    shard: int,
    n_shards: int,
    *,
    window_hours: float | None = None,
    no_window: bool = False,
) -> dict[str, pl.DataFrame]:
    """What one shard's feed build reads (the window as precompute_shard resolves it from
    `window_hours` and `no_window`): of the impression log (the largest table, 62.7M rows at
    100k users) only the shard's users' rows and the global count before `now`; of the
    engagements (20.8M rows) only theirs, what all users share coming from the warehouse
    (models.warehouse_engagements); of the follows, blocks, mutes and muted keywords only
    theirs; and with a candidate window, of the articles only the posts a feed of theirs
    can show or look up: the window's, their parents and thread roots, and the posts the
    users engaged with (their histories). At 1M users that is some 4M of 10M posts and
    0.9M of 57.6M follows a shard. The users table is read whole."""
    small = read_tables(path, ["users", "world_info"])
    users = users_in_shard(small["users"], shard, n_shards)
    window = resolve_window(candidate_window(small), window_hours, no_window)
    return read_users_tables(path, users, small["world_info"]["now"][0], window)


def read_users_tables(
    path: Location,
    users: np.ndarray,
    now: datetime,
    window: timedelta | None,
    totals_at: datetime | None = None,
) -> dict[str, pl.DataFrame]:
    """The pipeline tables as a feed build for `users` at `now` reads them (see
    read_shard_tables): their own rows of the per-user tables, and with a `window`, the
    posts published in it before `now` and those the feeds look up. `totals_at`: the time
    of the global impression count (default: the world's `now`)."""
    scopes = dict(_USERS_OWN_ROWS)
    if window is not None:
        scopes["articles"] = _WINDOW_ARTICLES.format(
            after=_timestamp(now - window), now=_timestamp(now)
        )
    return read_tables(
        path,
        PIPELINE_TABLES,
        OPTIONAL_TABLES,
        users=users,
        totals_at=totals_at,
        engagements_of_users=True,
        scopes=scopes,
    )


# A shard's own rows of the tables the pipeline reads per user (pipeline.query), sorted by
# their keys: a filtered read need not keep the table's order (nor can a bucket's Parquet).
_USERS_OWN_ROWS = {
    "follows": "select * from main.follows where follower_id in (select user_id from "
    "shard_users) order by follower_id, followee_id",
    "topic_follows": "select * from main.topic_follows where user_id in (select user_id "
    "from shard_users) order by user_id, topic",
    # Both ways: the authors a user blocked and those who blocked the user.
    "blocks": "select * from main.blocks where user_id in (select user_id from shard_users) "
    "or blocked_id in (select user_id from shard_users) order by user_id, blocked_id",
    "mutes": "select * from main.mutes where user_id in (select user_id from shard_users) "
    "order by user_id, muted_id",
    "muted_keywords": "select * from main.muted_keywords where user_id in (select user_id "
    "from shard_users) order by user_id, keyword",
}
# The posts a shard's feeds can hold or look up: the window's (candidates), the parents
# and thread roots of those (reply eligibility, reposts) and the posts in the users'
# histories (their authors and topics).
_WINDOW_ARTICLES = """
with window_posts as (
    select article_id, parent_id, conversation_id from main.articles
    where published_at > {after} and published_at <= {now}
)
select * from main.articles
where (published_at > {after} and published_at <= {now})
   or article_id in (select parent_id from window_posts)
   or article_id in (select conversation_id from window_posts)
   or article_id in (select article_id from shard_engagements)
order by article_id
"""


def _timestamp(moment: datetime) -> str:
    return f"timestamp '{moment.isoformat(sep=' ')}'"


def precompute_shard(
    tables: Tables,
    shard: int,
    n_shards: int,
    models: ModelLocations,
    *,
    warn: Callable[[str], None],
    served: pl.DataFrame | None = None,
    window_hours: float | None = None,
    no_window: bool = False,
    batch_size: int = 512,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
) -> ShardFeeds:
    """The feeds of the users of shard `shard` of `n_shards` at the warehouse's `now`: the
    promoted models (the table fallbacks, with a warning to `warn`, while there are none), the
    source's candidate window unless `window_hours` or `no_window` overrides it, posts in
    `served` left out, scored with `threads` torch threads.

    Raises NoCandidatesError when the window misses the data (see build_feeds)."""
    now = tables["world_info"]["now"][0]
    window = resolve_window(candidate_window(tables), window_hours, no_window)
    user_ids = users_in_shard(tables["users"], shard, n_shards)
    # Tables from read_shard_tables hold only this shard's impressions and engagements: the
    # models then take the exposure counts from the warehouse's whole log, and what every
    # user's engagements give from its engagements table (ModelLocations.load).
    scoped = user_ids if IMPRESSION_TOTALS in tables else None
    # The posts of the window, prepared once per refresh; without a window (a catalog of
    # long-lived items) only what retrieval brings is prepared, as it comes.
    posts = None
    if window is not None:
        in_window = tables["articles"].filter(published_between(now - window, now))
        posts = in_window["article_id"].to_numpy()
    retriever, scorer, versions = models.load(
        tables,
        warn,
        scoped,
        candidate_posts=posts,
        at=now,
        engagements_of_users=ENGAGEMENT_USERS in tables,
    )
    if isinstance(scorer, RankerScorer) and compile_requested():
        scorer.compile()
    with torch_threads(threads):
        feeds, stats = build_feeds(
            tables,
            user_ids,
            now,
            retriever,
            scorer,
            PipelineConfig().with_max_age(window),
            served=served,
            batch_size=batch_size,
            progress=progress,
        )
    return ShardFeeds(feeds, stats, versions, now)
