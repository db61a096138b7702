"""Filters before scoring. Each takes the hydrated candidates of a whole batch and returns
the rows it keeps together with how many it removed; spec.DEFAULT_SPEC runs each as a
FunctionFilter stage, whose removals the pipeline's stats report.

Candidates arrive ordered by user, in-network first, then by source rank, so "keep the
first" is deterministic and prefers in-network and better-ranked rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import polars as pl

from feed_dagster.pipeline.config import FilterConfig
from feed_dagster.pipeline.query import AUTHOR_PAIR, Query, normalise_text
from feed_dagster.pipeline.tables import pair_key, published_between, run_position


class FilterResult(NamedTuple):
    kept: pl.DataFrame
    removed: int


FilterFn = Callable[[pl.DataFrame, Query, FilterConfig], FilterResult]


def _result(before: pl.DataFrame, kept: pl.DataFrame) -> FilterResult:
    return FilterResult(kept, before.height - kept.height)


def drop_duplicates(c: pl.DataFrame, q: Query, cfg: FilterConfig) -> FilterResult:
    """One row per (user, post): the first one."""
    return _result(c, c.filter(pair_key(c, "user_id", "article_id").is_first_distinct()))


def drop_missing_core_data(c: pl.DataFrame, q: Query, cfg: FilterConfig) -> FilterResult:
    """Posts the article table does not know (no kind or publish time) cannot be shown."""
    ok = pl.col("published_at").is_not_null() & pl.col("kind").is_not_null()
    return _result(c, c.filter(ok))


def drop_deleted_posts(c: pl.DataFrame, q: Query, cfg: FilterConfig) -> FilterResult:
    """Deleted posts, and reposts of them (a repost shows the deleted content)."""
    if q.deleted.is_empty():
        return FilterResult(c, 0)
    gone = q.deleted["article_id"].implode()
    hit = pl.col("article_id").is_in(gone) | pl.col("original_id").is_in(gone).fill_null(False)
    return _result(c, c.filter(~hit))


def drop_too_old(c: pl.DataFrame, q: Query, cfg: FilterConfig) -> FilterResult:
    """Posts older than max_age at `now` (none when max_age is None), or published after it."""
    after = None if cfg.max_age is None else q.now - cfg.max_age
    return _result(c, c.filter(published_between(after, q.now)))


def drop_own_posts(c: pl.DataFrame, q: Query, cfg: FilterConfig) -> FilterResult:
    """The user's own posts, and reposts of them."""
    own = (pl.col("author_id") == pl.col("user_id")) | (
        pl.col("original_author_id") == pl.col("user_id")
    )
    return _result(c, c.filter(~own.fill_null(False)))


def drop_out_of_network_replies_reposts(
    c: pl.DataFrame, q: Query, cfg: FilterConfig
) -> FilterResult:
    """Out-of-network replies and reposts: without the followed context they make no sense."""
    bad = ~pl.col("in_network") & pl.col("kind").is_in(["reply", "repost"])
    return _result(c, c.filter(~bad.fill_null(False)))


def dedupe_reposts(c: pl.DataFrame, q: Query, cfg: FilterConfig) -> FilterResult:
    """A repost and its original count as one post: keep the first row per original."""
    return _result(c, c.filter(pair_key(c, "user_id", "original_id").is_first_distinct()))


def _drop_pairs(c: pl.DataFrame, pairs: pl.DataFrame) -> pl.DataFrame:
    """Rows whose post or reposted original is in `pairs` (user_id, article_id)."""
    c = c.join(pairs, on=["user_id", "article_id"], how="anti", maintain_order="left")
    # Only reposts have an original other than themselves: check just those rows.
    reposts = c.filter(pl.col("original_id") != pl.col("article_id"))
    orig = pairs.rename({"article_id": "original_id"})
    hit = reposts.join(orig, on=["user_id", "original_id"], how="semi").select(
        "user_id", "article_id"
    )
    if hit.is_empty():
        return c
    return c.join(hit, on=["user_id", "article_id"], how="anti", maintain_order="left")


def drop_previously_seen(c: pl.DataFrame, q: Query, cfg: FilterConfig) -> FilterResult:
    """Posts the user was already shown or engaged with (directly or as a repost)."""
    return _result(c, _drop_pairs(c, q.seen))


def drop_previously_served(c: pl.DataFrame, q: Query, cfg: FilterConfig) -> FilterResult:
    """Posts in the user's previously published feed."""
    return _result(c, _drop_pairs(c, q.served))


def drop_muted_keywords(c: pl.DataFrame, q: Query, cfg: FilterConfig) -> FilterResult:
    """Posts whose title or text contains one of the user's muted keywords as whole words.

    Works per distinct post rather than per (user, post) row: each post's text is
    normalised once and searched for every keyword of the batch's users in one pass
    (Aho-Corasick, `str.extract_many`); only the few (post, keyword) hits are joined to the
    users who muted them. Text and keywords are normalised alike (space-padded words,
    `normalise_text`), so a substring hit is a whole-word or whole-phrase match.
    """
    if q.muted_keywords.is_empty() or c.is_empty():
        return FilterResult(c, 0)
    kw = q.muted_keywords.join(c.select("user_id").unique(), on="user_id", how="semi")
    if kw.is_empty():
        return FilterResult(c, 0)
    keywords = pl.lit(kw["keyword"].unique().implode())
    text = pl.concat_str([pl.col("title"), pl.col("text")], separator=" ", ignore_nulls=True)
    # Only the candidates of users who muted something are searched: a third of the users
    # at 1M (synthetic:l), whose filter took 2.1 ms a user searching every candidate's
    # text, 0.9 ms after.
    muting = c.join(kw.select("user_id").unique(), on="user_id", how="semi")
    # Overlapping: " new york " and " york " both count in " new york city ".
    found = (
        muting.select("article_id", "title", "text")
        .unique("article_id")
        .select(
            "article_id",
            normalise_text(text).str.extract_many(keywords, overlapping=True).alias("keyword"),
        )
        .explode("keyword")
        .drop_nulls("keyword")
    )
    hits = found.join(kw, on="keyword").select("user_id", "article_id").unique()
    kept = c.join(hits, on=["user_id", "article_id"], how="anti", maintain_order="left")
    return _result(c, kept)


def drop_blocked_muted_authors(c: pl.DataFrame, q: Query, cfg: FilterConfig) -> FilterResult:
    """Posts by (or reposting) authors the user blocked or muted, or who blocked the user."""
    parts = [q.blocks.select(*AUTHOR_PAIR), q.mutes.select(*AUTHOR_PAIR)]
    if cfg.drop_blocked_by:
        parts.append(q.blocked_by.select(*AUTHOR_PAIR))
    banned = pl.concat(parts).unique()
    kept = c.join(banned, on=["user_id", "author_id"], how="anti", maintain_order="left")
    kept = kept.join(
        banned.rename({"author_id": "original_author_id"}),
        on=["user_id", "original_author_id"],
        how="anti",
        maintain_order="left",
    )
    return _result(c, kept)


def keep_out_of_network_budget(
    c: pl.DataFrame, budget: int | None, top_k: int, short_budget: int | None = None
) -> FilterResult:
    """Every candidate, except that a user with at least `top_k` in-network candidates keeps
    only the first `budget` out-of-network ones (in source rank order: the retriever's best),
    and any other user the first `short_budget` (None: all of them).

    In-network posts outrank out-of-network ones (ScoringConfig.out_of_network_factor), so
    a user whose in-network candidates fill the top-k is shown out-of-network posts only in
    SelectionConfig.out_of_network_slots: scoring hundreds to fill five costs the ranker
    most of its time at 1M users and changed nothing measurable (docs/SCALING.md). Users
    with fewer in-network candidates are served many out-of-network posts: a budget of 50
    for them cost recall, a larger one barely (`short_budget`, docs/SCALING.md)."""
    if budget is None and short_budget is None:
        return FilterResult(c, 0)
    inn = pl.col("in_network")
    n_in = inn.cast(pl.Int64).sum().over("user_id")
    # Rows come by user, in-network first, then by source rank: an out-of-network row's
    # place among the user's out-of-network rows is its place after the in-network ones.
    position = run_position("user_id") + 1 - n_in
    full = n_in >= top_k
    keep_full = pl.lit(True) if budget is None else position <= budget
    keep_short = pl.lit(True) if short_budget is None else position <= short_budget
    return _result(c, c.filter(inn | pl.when(full).then(keep_full).otherwise(keep_short)))


# The reference order (structural checks first, per-user state last), with the
# out-of-network reply/repost filter ahead of repost dedupe: an out-of-network repost must
# not displace its original and then be dropped itself.
PRE_SCORING_FILTERS: tuple[tuple[str, FilterFn], ...] = (
    ("duplicates", drop_duplicates),
    ("missing_core_data", drop_missing_core_data),
    ("deleted_posts", drop_deleted_posts),
    ("too_old", drop_too_old),
    ("own_posts", drop_own_posts),
    ("out_of_network_replies_reposts", drop_out_of_network_replies_reposts),
    ("repost_dedupe", dedupe_reposts),
    ("previously_seen", drop_previously_seen),
    ("previously_served", drop_previously_served),
    ("muted_keywords", drop_muted_keywords),
    ("blocked_muted_authors", drop_blocked_muted_authors),
)
