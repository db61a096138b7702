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


def _kth_best(candidates: pl.DataFrame, k: int, name: str) -> pl.DataFrame:
    """Each user's k-th best score (the lowest of the top k) as column `name`."""
    return candidates.group_by("user_id").agg(pl.col("score").top_k(k).min().alias(name))


def run_count(flag: pl.Expr, key: str) -> pl.Expr:
    """Running count of true `flag` rows (this one included) within each run of equal
    consecutive `key` values; like run_position, without a window over many small groups."""
    flag = flag.cast(pl.Int64)
    total = flag.cum_sum()
    new_run = (pl.col(key) != pl.col(key).shift(1)).fill_null(True)
    return total - pl.when(new_run).then(total - flag).otherwise(None).forward_fill()


def keep_first(rows: pl.DataFrame, n: int, reserve: int) -> pl.DataFrame:
    """The first n rows per user (rows come best first, grouped by user), of which up to
    `reserve` are the user's best out-of-network rows when it has them: the rest of the
    slots go to the best of the others."""
    if reserve <= 0:
        return rows.filter(run_position("user_id") < n)
    reserved = ~pl.col("in_network") & (run_count(~pl.col("in_network"), "user_id") <= reserve)
    marked = rows.with_columns(_reserved=reserved)
    n_reserved = pl.col("_reserved").sum().over("user_id")
    others = run_count(~pl.col("_reserved"), "user_id")
    return marked.filter(pl.col("_reserved") | (others <= n - n_reserved)).drop("_reserved")


def select_top_k(candidates: pl.DataFrame, k: int, reserve: int = 0) -> pl.DataFrame:
    """The k best-scoring candidates per user, best first (ties: lower article_id first),
    with up to `reserve` of them the user's best out-of-network candidates (keep_first)."""
    cols, desc = BEST_FIRST
    # Cut to rows scoring at least each user's k-th best (or, for the reserved slots, its
    # reserve-th best out-of-network score) before sorting: sorting the few survivors is
    # much cheaper than sorting every candidate.
    survivors = candidates.join(_kth_best(candidates, k, "_all"), on="user_id")
    keep = pl.col("score") >= pl.col("_all")
    if reserve > 0:
        oon = _kth_best(candidates.filter(~pl.col("in_network")), reserve, "_oon")
        survivors = survivors.join(oon, on="user_id", how="left")
        keep = keep | (~pl.col("in_network") & (pl.col("score") >= pl.col("_oon")))
    survivors = survivors.filter(keep).drop("_all", "_oon", strict=False)
    return keep_first(survivors.sort(cols, descending=desc), k, reserve)


def dedupe_conversations(selected: pl.DataFrame) -> pl.DataFrame:
    """The best post per conversation root per user (rows must come best first).

    Posts without a conversation id are their own conversation.
    """
    root = pl.coalesce(pl.col("conversation_id"), pl.col("article_id")).alias("_root")
    with_root = selected.with_columns(root)
    first = pair_key(with_root, "user_id", "_root").is_first_distinct()
    return with_root.filter(first).drop("_root")


def serve(selected: pl.DataFrame, n: int, reserve: int = 0) -> pl.DataFrame:
    """The first n rows per user (rows come best first; up to `reserve` of them
    out-of-network, see keep_first) with a 1-based `position`."""
    kept = keep_first(selected, n, reserve)
    return kept.with_columns(position=(run_position("user_id") + 1).cast(pl.Int32))


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
