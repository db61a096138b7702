"""Selector and post-selection stages: top k per user, conversation dedupe, the served cut
and the served rows' final shape."""

from __future__ import annotations

import polars as pl

from feed_dagster.data.schema import FEED_SCHEMA
from feed_dagster.pipeline.config import PipelineConfig
from feed_dagster.pipeline.hydrators import hydrate_author_handles
from feed_dagster.pipeline.scoring import with_reason
from feed_dagster.pipeline.tables import pair_key, run_position

IN_NETWORK, OUT_OF_NETWORK = "in_network", "out_of_network"

BEST_FIRST = (["user_id", "score", "article_id"], [False, True, False])


def select_top_k(candidates: pl.DataFrame, k: int) -> pl.DataFrame:
    """The k best-scoring candidates per user, best first (ties: lower article_id first)."""
    cols, desc = BEST_FIRST
    # Cut to rows scoring at least each user's k-th best before sorting: sorting the
    # few survivors (k per user, plus ties) is much cheaper than sorting every candidate.
    threshold = candidates.group_by("user_id").agg(
        pl.col("score").top_k(k).min().alias("_threshold")
    )
    survivors = candidates.join(threshold, on="user_id").filter(
        pl.col("score") >= pl.col("_threshold")
    )
    return (
        survivors.drop("_threshold").sort(cols, descending=desc).filter(run_position("user_id") < k)
    )


def dedupe_conversations(selected: pl.DataFrame) -> pl.DataFrame:
    """The best post per conversation root per user (rows must come best first).

    Posts without a conversation id are their own conversation.
    """
    root = pl.coalesce(pl.col("conversation_id"), pl.col("article_id")).alias("_root")
    with_root = selected.with_columns(root)
    first = pair_key(with_root, "user_id", "_root").is_first_distinct()
    return with_root.filter(first).drop("_root")


def serve(selected: pl.DataFrame, n: int) -> pl.DataFrame:
    """The first n rows per user (rows come best first) with a 1-based `position`."""
    position = (run_position("user_id") + 1).cast(pl.Int32)
    return selected.with_columns(position=position).filter(pl.col("position") <= n)


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
