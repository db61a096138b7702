"""Selector and post-selection filters: top k per user, conversation dedupe, the served cut."""

from __future__ import annotations

import polars as pl

from feed_dagster.pipeline.tables import pair_key, run_position

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
