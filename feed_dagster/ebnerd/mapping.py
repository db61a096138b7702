"""Mapping validated EBNeRD frames into the canonical tables, with the derived candidate
window and topic follows. See `load.py` for what maps to what.
"""

from __future__ import annotations

import math
from datetime import timedelta

import polars as pl

from feed_dagster.data.schema import DEFAULT_CANDIDATE_WINDOW, TABLE_SCHEMAS, World, conform
from feed_dagster.ebnerd.validation import EbnerdFrames


def to_world(
    frames: EbnerdFrames,
    *,
    topic_follow_min_share: float = 0.15,
    topic_follow_min_reads: int = 3,
) -> World:
    """Map validated EBNeRD frames into the canonical tables (rules in the module doc)."""
    beh = frames.behaviors
    if not beh["is_heldout"].any():
        raise ValueError(f"{frames.layout.location}: no held-out impressions to evaluate on")

    articles = frames.articles.select(
        pl.col("article_id"),
        pl.col("published_time").alias("published_at"),
        pl.lit("original").alias("kind"),
        pl.col("article_id").alias("conversation_id"),
        pl.col("category").alias("topic"),
        pl.col("category_str").alias("topic_name"),
        pl.col("title"),
        pl.concat_str(
            [pl.col("subtitle").fill_null(""), pl.col("body").fill_null("")], separator=" "
        )
        .str.strip_chars()
        .alias("text"),
    )

    clicks = beh.select(
        "impression_id",
        "user_id",
        pl.col("article_ids_clicked").alias("article_id"),
        pl.col("impression_time").alias("engaged_at"),
        pl.col("read_time").alias("dwell_seconds"),
    ).explode("article_id")

    reads = (
        pl.concat(
            [
                h.select(
                    "user_id",
                    pl.col("article_id_fixed").alias("article_id"),
                    pl.col("impression_time_fixed").alias("engaged_at"),
                    pl.col("read_time_fixed").alias("dwell_seconds"),
                ).explode("article_id", "engaged_at", "dwell_seconds")
                for h in frames.history.values()
            ],
            how="vertical",
        )
        .unique(["user_id", "article_id", "engaged_at"], keep="first", maintain_order=True)
        .join(clicks, on=["user_id", "article_id", "engaged_at"], how="anti")
        .with_columns(impression_id=pl.lit(None, dtype=pl.UInt32))
    )
    engagements = (
        pl.concat([reads.select(clicks.columns), clicks], how="vertical")
        .with_columns(click=pl.lit(True))
        .sort("engaged_at", "user_id", "article_id", nulls_last=True, maintain_order=True)
    )

    impressions = (
        beh.select(
            "impression_id",
            "user_id",
            pl.col("article_ids_inview").alias("article_id"),
            pl.int_ranges(pl.col("article_ids_inview").list.len(), dtype=pl.Int32).alias(
                "position"
            ),
            pl.col("impression_time").alias("shown_at"),
            "is_heldout",
        )
        .explode("article_id", "position")
        .sort("shown_at", "impression_id", "position")
    )

    seen = pl.concat(
        [
            reads.select("user_id", pl.col("engaged_at").alias("t")),
            beh.select("user_id", pl.col("impression_time").alias("t")),
        ]
    )
    users = (
        seen.group_by("user_id")
        .agg(pl.col("t").min().alias("created_at"))
        .with_columns(handle=pl.format("user{}", pl.col("user_id")))
        .sort("user_id")
    )

    topic_follows = derive_topic_follows(
        reads, articles, min_share=topic_follow_min_share, min_reads=topic_follow_min_reads
    )

    candidate_window = derive_candidate_window(impressions, articles)
    window_start = seen["t"].min()
    heldout_start = beh.filter("is_heldout")["impression_time"].min()
    now = beh["impression_time"].max()
    empty = {
        name: pl.DataFrame(schema=TABLE_SCHEMAS[name])
        for name in ("impression_truth", "follows", "blocks", "mutes", "muted_keywords")
    }
    return World(
        users=conform("users", users),
        articles=conform("articles", articles),
        engagements=conform("engagements", engagements),
        impressions=conform("impressions", impressions),
        topic_follows=conform("topic_follows", topic_follows),
        window_start=window_start,  # type: ignore[arg-type]
        heldout_start=heldout_start,  # type: ignore[arg-type]
        now=now,  # type: ignore[arg-type]
        candidate_window=candidate_window,
        **empty,
    )


# The candidate window covers the ages at which EBNeRD's own platform showed articles: the
# WINDOW_QUANTILE of (impression time - published time) over every inview article, rounded
# up to whole hours, never below the news default of 48 h. A high quantile rather than the
# maximum, so a handful of very old articles in some slates do not open the window to the
# whole archive; at least 48 h, so a sample of fresh news keeps the usual window.
WINDOW_QUANTILE = 0.95


def derive_candidate_window(
    impressions: pl.DataFrame,
    articles: pl.DataFrame,
    quantile: float = WINDOW_QUANTILE,
    minimum: timedelta = DEFAULT_CANDIDATE_WINDOW,
) -> timedelta:
    """The candidate window of an EBNeRD world (rule above). `impressions` needs article_id
    and shown_at, `articles` article_id and published_at. Ages below zero (an article shown
    before its stated publication) are ignored; with no usable age the window is `minimum`."""
    ages = (
        impressions.select("article_id", "shown_at")
        .join(articles.select("article_id", "published_at"), on="article_id")
        .select(
            ((pl.col("shown_at") - pl.col("published_at")).dt.total_seconds() / 3600).alias("h")
        )
        .filter(pl.col("h") >= 0)
    )
    if ages.is_empty():
        return minimum
    hours = math.ceil(float(ages["h"].quantile(quantile, interpolation="higher")))  # type: ignore[arg-type]
    return max(minimum, timedelta(hours=hours))


def derive_topic_follows(
    reads: pl.DataFrame,
    articles: pl.DataFrame,
    *,
    min_share: float = 0.15,
    min_reads: int = 3,
) -> pl.DataFrame:
    """Topics a user follows: >= `min_share` of their reads and >= `min_reads` reads.

    `reads` needs user_id and article_id; `articles` needs article_id and topic.
    """
    per_topic = (
        reads.select("user_id", "article_id")
        .join(articles.select("article_id", "topic"), on="article_id", how="inner")
        .filter(pl.col("topic").is_not_null())
        .group_by("user_id", "topic")
        .agg(pl.len().alias("n"))
        .with_columns(share=pl.col("n") / pl.col("n").sum().over("user_id"))
    )
    return (
        per_topic.filter((pl.col("share") >= min_share) & (pl.col("n") >= min_reads))
        .select("user_id", "topic")
        .sort("user_id", "topic")
    )
