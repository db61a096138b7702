"""Build the feeds of many users by running the candidate pipeline over user batches."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import numpy as np
import polars as pl

from feed_dagster.data.schema import FEED_SCHEMA
from feed_dagster.errors import NoCandidatesError
from feed_dagster.pipeline.candidate_sources import published_after
from feed_dagster.pipeline.config import PipelineConfig
from feed_dagster.pipeline.protocols import Retriever, Scorer, component_name
from feed_dagster.pipeline.run import run_pipeline
from feed_dagster.pipeline.stages import PipelineSpec
from feed_dagster.pipeline.stats import PipelineStats, window_hours
from feed_dagster.pipeline.tables import (
    Tables,
    as_tables,
    batch_tables,
    candidate_window,
    published_between,
    sorted_by_user,
    table,
)

# The warehouse tables a feed build reads (the served feeds and their held-out evaluation).
PIPELINE_TABLES = [
    "world_info",
    "users",
    "articles",
    "engagements",
    "impressions",
    "follows",
    "topic_follows",
    "blocks",
    "mutes",
    "muted_keywords",
    "deleted_posts",
]
# Warehouses built before tombstones existed have no deleted_posts table: read as empty.
OPTIONAL_TABLES = ("deleted_posts",)


def build_feeds(
    tables: Tables,
    user_ids: np.ndarray,
    now: datetime,
    retriever: Retriever,
    scorer: Scorer,
    config: PipelineConfig | None = None,
    served: pl.DataFrame | None = None,
    batch_size: int = 512,
    progress: Callable[[str], None] | None = None,
    spec: PipelineSpec | None = None,
) -> tuple[pl.DataFrame, PipelineStats]:
    """Feeds for `user_ids` in batches of `batch_size` users through the stages of `spec`
    (run.DEFAULT_SPEC unless given); stats summed over batches.

    Without `config` the candidate window is the world's (the `world_info` table among
    `tables`; the news default of 48 h when absent). Raises NoCandidatesError, before
    returning anything, when more than half of the users with engagements got no candidate:
    the window and the data disagree, and empty feeds must not replace working ones.
    """
    config = config or PipelineConfig().with_max_age(candidate_window(tables))
    parts: list[pl.DataFrame] = []
    total = PipelineStats(
        retriever=component_name(retriever),
        scorer=component_name(scorer),
        candidate_window_hours=window_hours(config.sources.max_age),
    )
    by_user = sorted_by_user(as_tables(tables))
    for start in range(0, len(user_ids), batch_size):
        batch = user_ids[start : start + batch_size]
        feeds, stats = run_pipeline(
            batch_tables(by_user, batch), batch, now, retriever, scorer, config, served, spec
        )
        parts.append(feeds)
        total += stats
        if progress:
            progress(f"{min(start + batch_size, len(user_ids)):,}/{len(user_ids):,} users")
    check_candidates(tables, now, config, total)
    feeds = pl.concat(parts) if parts else pl.DataFrame(schema=FEED_SCHEMA)
    return feeds, total


def check_candidates(
    tables: Tables, now: datetime, config: PipelineConfig, stats: PipelineStats
) -> None:
    """Raise NoCandidatesError when more than half of the users with engagements (stats
    active_users, active_users_with_candidates) got no candidate."""
    active = stats.active_users
    without = active - stats.active_users_with_candidates
    if 2 * without <= active:
        return
    articles = table(tables, "articles")
    published = pl.col("published_at")
    lo, hi = articles.select(published.min().alias("lo"), published.max().alias("hi")).row(0)
    window = published_between(published_after(now, config.sources), now)
    raise NoCandidatesError(
        window=config.sources.max_age,
        now=now,
        published_min=lo,
        published_max=hi,
        in_window=articles.filter(window).height,
        active_users=active,
        without_candidates=without,
    )
