"""The candidate pipeline for a batch of users: one loop over the stages of a PipelineSpec

query hydrator -> sources -> candidate hydrators -> filters -> scorers -> selector ->
post-selection stages -> served feed rows

that times each stage, counts its rows and holds it to its kind's contract (stages.py).
"""

from __future__ import annotations

import time
from datetime import datetime

import numpy as np
import polars as pl

from feed_dagster.data.schema import World
from feed_dagster.pipeline.candidate_sources import CANDIDATE_SCHEMA
from feed_dagster.pipeline.config import PipelineConfig
from feed_dagster.pipeline.protocols import Retriever, Scorer, component_name
from feed_dagster.pipeline.selection import IN_NETWORK
from feed_dagster.pipeline.spec import DEFAULT_SPEC
from feed_dagster.pipeline.stages import (
    FILTER,
    HYDRATOR,
    POST_SELECTION,
    QUERY_HYDRATOR,
    SCORER,
    SOURCE,
    Batch,
    CandidateStage,
    PipelineSpec,
    Request,
    label,
)
from feed_dagster.pipeline.stats import PipelineStats, window_hours
from feed_dagster.pipeline.tables import Tables, as_tables, candidate_window, table

__all__ = ["run_pipeline"]

# Kinds that must keep every row, and kinds that may only drop rows.
KEEPS_ROWS = (HYDRATOR, SCORER)
ONLY_DROPS = (FILTER, POST_SELECTION)


def run_pipeline(
    tables: World | Tables,
    user_ids: np.ndarray | list[int],
    now: datetime,
    retriever: Retriever,
    scorer: Scorer,
    config: PipelineConfig | None = None,
    served: pl.DataFrame | None = None,
    spec: PipelineSpec | None = None,
) -> tuple[pl.DataFrame, PipelineStats]:
    """Feeds for the batch `user_ids` at `now`, through the stages of `spec` (DEFAULT_SPEC
    unless given).

    Returns (feeds, stats). feeds has FEED_SCHEMA columns, ordered by user_id, position
    (whatever the last post-selection stage returns; DEFAULT_SPEC ends with spec.Serve).
    Without `config` the sources and the age filter use the world's candidate window
    (World.candidate_window, or the world_info table among `tables`).
    `served` (user_id, article_id) is the previously published feed, whose posts are not
    served again.
    """
    # The world's own candidate window unless the caller configured one.
    cfg = config or PipelineConfig().with_max_age(candidate_window(tables))
    spec = spec or DEFAULT_SPEC
    tables = as_tables(tables)
    stats = PipelineStats(
        retriever=component_name(retriever),
        scorer=component_name(scorer),
        candidate_window_hours=window_hours(cfg.sources.max_age),
    )

    t0 = time.perf_counter()
    query = spec.query_hydrator.run(Request(tables, user_ids, now, cfg, served))
    stats.record(
        label(QUERY_HYDRATOR, spec.query_hydrator), query.users.height, time.perf_counter() - t0
    )
    batch = Batch(query, cfg, table(tables, "articles"), table(tables, "users"), retriever, scorer)

    rows = pl.DataFrame(schema=CANDIDATE_SCHEMA)
    sourced = rows
    for kind, stage in spec.stages():
        if not stage.enabled(batch):
            continue
        t0 = time.perf_counter()
        out = stage.run(rows, batch)
        if kind == SOURCE:
            # Only the candidate columns, in their types, so any source's rows stack. In-network
            # first, then by source rank: "keep the first" filters prefer these rows.
            found = out.select([pl.col(c).cast(t) for c, t in CANDIDATE_SCHEMA.items()])
            sourced = pl.concat([rows, found]).sort(
                ["user_id", "in_network", "source_rank"], descending=[False, True, False]
            )
            new = sourced
        else:
            check_contract(kind, stage, rows, out)
            new = out
        stats.record(label(kind, stage), out.height, time.perf_counter() - t0)
        if kind == FILTER:
            stats.removed[stage.name] = rows.height - out.height
        rows = new
    feeds = rows

    # Users with any engagement before now, and how many of them the sources found posts
    # for: the feed build refuses a run where most of them got none.
    active = query.history.select("user_id").unique()
    stats.active_users = active.height
    stats.active_users_with_candidates = (
        sourced.select("user_id").unique().join(active, on="user_id").height
    )
    stats.users = query.users.height
    stats.users_with_feed = feeds["user_id"].n_unique()
    stats.feed_rows = feeds.height
    stats.in_network_rows = int((feeds["source"] == IN_NETWORK).sum())
    return feeds, stats


def check_contract(
    kind: str, stage: CandidateStage, before: pl.DataFrame, after: pl.DataFrame
) -> None:
    """Raise ValueError naming the stage when it broke its kind's row contract."""
    name = label(kind, stage)
    if kind in KEEPS_ROWS and after.height != before.height:
        raise ValueError(
            f"stage {name}: a {kind} must keep every row; got {after.height} rows "
            f"for {before.height}"
        )
    if kind in ONLY_DROPS and after.height > before.height:
        raise ValueError(
            f"stage {name}: a {kind} stage may only drop rows; got {after.height} rows "
            f"from {before.height}"
        )
