"""The candidate pipeline for a batch of users, stage by stage:

query hydrators -> sources -> candidate hydrators -> filters -> scorers -> selector ->
post-selection filters -> served feed rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import numpy as np
import polars as pl

from feed_dagster.data.schema import World
from feed_dagster.pipeline.config import PipelineConfig
from feed_dagster.pipeline.filters import PRE_SCORING_FILTERS
from feed_dagster.pipeline.hydrators import (
    hydrate_author_handles,
    hydrate_core_data,
)
from feed_dagster.pipeline.protocols import ACTION_COLUMNS, Retriever, Scorer, component_name
from feed_dagster.pipeline.query import hydrate_query
from feed_dagster.pipeline.scoring import (
    apply_author_diversity,
    apply_out_of_network_factor,
    predict,
    weighted_score,
    with_reason,
)
from feed_dagster.pipeline.selection import dedupe_conversations, select_top_k, serve
from feed_dagster.pipeline.sources import in_network_source, out_of_network_source
from feed_dagster.pipeline.tables import Tables, as_tables, candidate_window, table

IN_NETWORK, OUT_OF_NETWORK = "in_network", "out_of_network"
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


class _Stages:
    """Rows out of and seconds spent in each stage, in run order."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, int]]:
        out: dict[str, int] = {}
        t0 = time.perf_counter()
        yield out
        self.seconds[name] = time.perf_counter() - t0
        self.rows[name] = out.get("rows", 0)


def run_pipeline(
    tables: World | Tables,
    user_ids: np.ndarray | list[int],
    now: datetime,
    retriever: Retriever,
    scorer: Scorer,
    config: PipelineConfig | None = None,
    served: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Feeds for the batch `user_ids` at `now`.

    Returns (feeds, stats). feeds has FEED_SCHEMA columns, ordered by user_id, position.
    stats: users, users_with_feed, active_users (with engagements before now),
    active_users_with_candidates, rows (rows out of each stage), seconds (per stage),
    removed (rows each filter removed), retriever, scorer.
    Without `config` the sources and the age filter use the world's candidate window
    (World.candidate_window, or the world_info table among `tables`).
    `served` (user_id, article_id) is the previously published feed, whose posts are not
    served again.
    """
    # The world's own candidate window unless the caller configured one.
    cfg = config or PipelineConfig().with_max_age(candidate_window(tables))
    tables = as_tables(tables)
    articles = table(tables, "articles")
    st = _Stages()

    with st.stage("query_hydration") as out:
        query = hydrate_query(tables, user_ids, now, cfg.query, served=served)
        out["rows"] = query.users.height
    with st.stage("source.in_network") as out:
        in_net = in_network_source(query, articles, cfg.sources)
        out["rows"] = in_net.height
    with st.stage("source.out_of_network") as out:
        oon = out_of_network_source(query, retriever, cfg.sources, in_net, articles)
        out["rows"] = oon.height
    with st.stage("candidate_hydration") as out:
        # In-network first, then by source rank: "keep the first" filters prefer these rows.
        cands = pl.concat([in_net, oon]).sort(
            ["user_id", "in_network", "source_rank"], descending=[False, True, False]
        )
        cands = hydrate_core_data(cands, articles)
        out["rows"] = cands.height
    # Users with any engagement before now, and how many of them the sources found posts
    # for: the feed build refuses a run where most of them got none.
    active = query.history.select("user_id").unique()
    active_with_candidates = cands.select("user_id").unique().join(active, on="user_id").height
    removed: dict[str, int] = {}
    for name, fn in PRE_SCORING_FILTERS:
        with st.stage(f"filter.{name}") as out:
            cands, removed[name] = fn(cands, query, cfg.filters)
            out["rows"] = cands.height
    with st.stage("scorer.model") as out:
        cands = predict(cands, scorer, query)
        out["rows"] = cands.height
    with st.stage("scorer.weighted") as out:
        cands = weighted_score(cands, cfg.scoring)
        out["rows"] = cands.height
    with st.stage("scorer.author_diversity") as out:
        cands = apply_author_diversity(cands, cfg.scoring)
        out["rows"] = cands.height
    with st.stage("scorer.out_of_network_factor") as out:
        cands = apply_out_of_network_factor(cands, cfg.scoring)
        out["rows"] = cands.height
    with st.stage("selector.top_k") as out:
        selected = select_top_k(cands, cfg.selection.top_k)
        out["rows"] = selected.height
    with st.stage("post_selection.conversation_dedupe") as out:
        selected = dedupe_conversations(selected)
        out["rows"] = selected.height
    with st.stage("post_selection.serve") as out:
        feeds = finalise(serve(selected, cfg.selection.served), table(tables, "users"), cfg)
        out["rows"] = feeds.height

    stats: dict[str, Any] = {
        "users": query.users.height,
        "users_with_feed": feeds["user_id"].n_unique(),
        "feed_rows": feeds.height,
        "in_network_rows": int((feeds["source"] == IN_NETWORK).sum()),
        "active_users": active.height,
        "active_users_with_candidates": active_with_candidates,
        "retriever": component_name(retriever),
        "scorer": component_name(scorer),
        "rows": st.rows,
        "seconds": st.seconds,
        "removed": removed,
    }
    return feeds, stats


def finalise(served: pl.DataFrame, users: pl.DataFrame, cfg: PipelineConfig) -> pl.DataFrame:
    """Served rows in FEED_SCHEMA: author handle and top reason hydrated, ordered."""
    rows = hydrate_author_handles(served, users)
    rows = with_reason(rows, cfg.scoring.weights).with_columns(
        source=pl.when(pl.col("in_network"))
        .then(pl.lit(IN_NETWORK))
        .otherwise(pl.lit(OUT_OF_NETWORK))
    )
    return rows.select([pl.col(c).cast(t) for c, t in FEED_SCHEMA.items()]).sort(
        ["user_id", "position"]
    )
