"""Candidate hydrators: join what later stages need onto (user, candidate) rows.

Text columns are joined too; polars stores strings as views, so a post repeated for many
users costs a 16-byte view per row, not a copy of its text.
"""

from __future__ import annotations

import polars as pl

from feed_dagster.pipeline.tables import rows_with

CORE_FIELDS: tuple[str, ...] = (
    "author_id",
    "kind",
    "parent_id",
    "conversation_id",
    "published_at",
    "topic",
    "topic_name",
    "title",
    "text",
)
ORIGINAL_FIELDS: tuple[str, ...] = ("original_id", "original_author_id")


def post_fields(articles: pl.DataFrame, only: pl.Series | None = None) -> pl.DataFrame:
    """Per post: CORE_FIELDS plus `original_id` / `original_author_id`, the reposted post
    and its author for a repost and the post itself otherwise (repost dedupe, seen/served
    and author filters look through a repost to the content it shows).

    Computed once per post so candidates need a single join; for the posts of `only`
    (article ids) alone when given, their parents still looked up among all `articles`.
    """
    posts = articles
    parents = articles
    if only is not None:
        posts = rows_with(articles, "article_id", only)
        parents = rows_with(articles, "article_id", posts["parent_id"])
    parents = parents.select(
        pl.col("article_id").alias("parent_id"), pl.col("author_id").alias("_parent_author")
    )
    is_repost = (pl.col("kind") == "repost") & pl.col("parent_id").is_not_null()
    return (
        posts.select("article_id", *CORE_FIELDS)
        .join(parents, on="parent_id", how="left")
        .with_columns(
            original_id=pl.when(is_repost)
            .then(pl.col("parent_id"))
            .otherwise(pl.col("article_id")),
            original_author_id=pl.when(is_repost)
            .then(pl.col("_parent_author"))
            .otherwise(pl.col("author_id")),
        )
        .drop("_parent_author")
    )


def hydrate_core_data(candidates: pl.DataFrame, articles: pl.DataFrame) -> pl.DataFrame:
    """Post fields (see `post_fields`) by article_id. A left join that keeps the candidate
    order: unknown posts keep null fields for the missing-core-data filter to drop. Only
    the candidates' posts get their fields: a batch's are tens of thousands of a news
    world's million."""
    fields = post_fields(articles, candidates["article_id"])
    return candidates.join(fields, on="article_id", how="left", maintain_order="left")


def hydrate_author_handles(feeds: pl.DataFrame, users: pl.DataFrame) -> pl.DataFrame:
    """Post-selection hydrator: the author's handle (null for authorless sources)."""
    handles = rows_with(users, "user_id", feeds["author_id"]).select(
        pl.col("user_id").alias("author_id"), pl.col("handle").alias("author_handle")
    )
    return feeds.join(handles, on="author_id", how="left", maintain_order="left")
