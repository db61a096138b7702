"""Candidate sources: in-network (followed accounts and topics) and out-of-network retrieval.

Both return frame(user_id, article_id, in_network, source_rank, retrieval_score), best
first per user; source_rank is 1-based within the source.
"""

from __future__ import annotations

import weakref
from datetime import datetime

import polars as pl

from feed_dagster.errors import DataValidationError
from feed_dagster.pipeline.config import SourceConfig
from feed_dagster.pipeline.protocols import RETRIEVED_SCHEMA, Retriever, component_name
from feed_dagster.pipeline.query import PAIR, Query
from feed_dagster.pipeline.tables import pair_key, published_between, rows_with, run_position

CANDIDATE_SCHEMA = {
    "user_id": pl.Int64,
    "article_id": pl.Int64,
    "in_network": pl.Boolean,
    "source_rank": pl.Int32,
    "retrieval_score": pl.Float64,
}
# Posts the reference keeps in a second, separately capped per-author list.
SECONDARY_KINDS = ("reply", "repost")
# A reply to one of these answers an original post directly.
ROOT_KINDS = ("original", "quote")


def published_after(now: datetime, cfg: SourceConfig) -> datetime | None:
    """Start of the candidate window (exclusive); None when there is no age limit."""
    return None if cfg.max_age is None else now - cfg.max_age


def recent_posts(articles: pl.DataFrame, now: datetime, cfg: SourceConfig) -> pl.DataFrame:
    """Posts published in (now - max_age, now]; every post up to `now` without an age limit."""
    return articles.filter(published_between(published_after(now, cfg), now))


# The capped recent posts of an articles frame (newest_capped), by the frame's id, with the
# (now, config) they were made for; an entry goes when its frame does.
_CAPPED: dict[int, tuple[tuple[datetime, SourceConfig], pl.DataFrame]] = {}


def newest_capped(articles: pl.DataFrame, now: datetime, cfg: SourceConfig) -> pl.DataFrame:
    """newest_per_author of the recent posts: the same for every batch of a feed run, which
    passes the same articles frame, so it is made once per (frame, now, config) and kept
    while the frame lives. At 1M users the window holds 1.43M posts, and joining and
    sorting them took a second of every 512-user batch. (Frames are not changed in place
    here: a frame is replaced, never edited.)"""
    key = (now, cfg)
    held = _CAPPED.get(id(articles))
    if held is not None and held[0] == key:
        return held[1]
    capped = newest_per_author(recent_posts(articles, now, cfg), articles, cfg)
    if held is None:
        weakref.finalize(articles, _CAPPED.pop, id(articles), None)
    _CAPPED[id(articles)] = (key, capped)
    return capped


def newest_per_author(
    posts: pl.DataFrame, articles: pl.DataFrame, cfg: SourceConfig
) -> pl.DataFrame:
    """The posts of `posts` that can still be in some user's in-network list after the caps.

    Without an age limit a followed author brings every post they ever wrote, so the join
    with the follows would grow with the catalog. The caps keep only each author's newest
    posts, and which ones survive depends on the user only through reply eligibility, so
    capping per group of posts a user sees all-or-nothing drops nothing a user could get:
    per author, the newest `per_author_originals` originals/quotes, the newest
    `per_author_replies` replies/reposts everyone may see, and the newest
    `per_author_replies` of the other replies per thread-root author (seen by the root
    author's followers only). Authorless posts are capped per topic at `in_network_max`.
    Replies no one may see (in a thread without a root author) are dropped.
    """
    parents = articles.select(
        pl.col("article_id").alias("parent_id"), pl.col("kind").alias("_parent_kind")
    )
    roots = articles.select(
        pl.col("article_id").alias("conversation_id"), pl.col("author_id").alias("_root")
    )
    rows = posts.join(parents, on="parent_id", how="left").join(
        roots, on="conversation_id", how="left"
    )
    for_all = (pl.col("kind") != "reply") | pl.col("_parent_kind").is_in(ROOT_KINDS).fill_null(
        False
    )
    # Group keys with -1 for "none" (ids are >= 0): run_position starts a new run at a null.
    rows = rows.filter(for_all | pl.col("_root").is_not_null()).with_columns(
        _author=pl.col("author_id").fill_null(-1),
        _topic=pl.when(pl.col("author_id").is_null()).then(pl.col("topic")).fill_null(-1),
        _secondary=pl.col("kind").is_in(SECONDARY_KINDS),
        _root=pl.when(for_all).then(-1).otherwise(pl.col("_root")),
    )
    keys = ["_author", "_topic", "_secondary", "_root"]
    rows = rows.sort(
        [*keys, "published_at", "article_id"],
        descending=[False] * len(keys) + [True, True],
        nulls_last=True,
    ).with_columns(_k=run_position(pl.struct(keys)))
    cap = (
        pl.when(pl.col("author_id").is_null())
        .then(cfg.in_network_max)
        .when(pl.col("_secondary"))
        .then(min(cfg.per_author_replies, cfg.in_network_max))
        .otherwise(min(cfg.per_author_originals, cfg.in_network_max))
    )
    return rows.filter(pl.col("_k") < cap).select(posts.columns)


def with_reply_eligibility(
    rows: pl.DataFrame, articles: pl.DataFrame, follows: pl.DataFrame
) -> pl.DataFrame:
    """Rows (user_id, article_id, kind, parent_id, conversation_id, ...) plus `eligible`.

    A non-reply is always eligible. A reply is eligible when it answers an original post
    (or a quote, which starts its own thread), or when the user follows the author of the
    thread's root post: replies deep inside a stranger's thread are noise in a home feed.
    """
    parents = rows_with(articles, "article_id", rows["parent_id"]).select(
        pl.col("article_id").alias("parent_id"), pl.col("kind").alias("parent_kind")
    )
    roots = rows_with(articles, "article_id", rows["conversation_id"]).select(
        pl.col("article_id").alias("conversation_id"),
        pl.col("author_id").alias("root_author_id"),
    )
    followed_root = follows.select(
        "user_id", pl.col("author_id").alias("root_author_id"), pl.lit(True).alias("_fr")
    )
    out = (
        rows.join(parents, on="parent_id", how="left")
        .join(roots, on="conversation_id", how="left")
        .join(followed_root, on=["user_id", "root_author_id"], how="left")
    )
    eligible = (
        (pl.col("kind") != "reply")
        | pl.col("parent_kind").is_in(ROOT_KINDS).fill_null(False)
        | pl.col("_fr").fill_null(False)
    )
    return out.with_columns(eligible=eligible).drop("parent_kind", "root_author_id", "_fr")


def in_network_source(query: Query, articles: pl.DataFrame, cfg: SourceConfig) -> pl.DataFrame:
    """Recent posts by followed accounts, and authorless posts on followed topics.

    Newest first; at most `per_author_originals` originals/quotes and `per_author_replies`
    replies/reposts per author, replies only when eligible (see `with_reply_eligibility`),
    at most `in_network_max` per user.
    """
    cols = ["article_id", "author_id", "kind", "parent_id", "conversation_id", "published_at"]
    recent = newest_capped(articles, query.now, cfg)
    by_author = query.follows.join(
        recent.filter(pl.col("author_id").is_not_null()).select(cols), on="author_id"
    )
    # Sources without authors (EBNeRD news) reach the in-network feed through topics only.
    by_topic = query.topic_follows.join(
        recent.filter(pl.col("author_id").is_null()).select(*cols, "topic"), on="topic"
    ).drop("topic")
    rows = pl.concat([by_author, by_topic.select(by_author.columns)])
    rows = with_reply_eligibility(rows, articles, query.follows).filter(pl.col("eligible"))

    # Per-author caps: newest first within (user, author, primary/secondary list).
    rows = rows.with_columns(_secondary=pl.col("kind").is_in(SECONDARY_KINDS))
    rows = rows.filter(pair_key(rows, "user_id", "article_id").is_first_distinct())
    group = pl.struct("user_id", "author_id", "_secondary")
    rows = rows.sort(
        ["user_id", "author_id", "_secondary", "published_at", "article_id"],
        descending=[False, False, False, True, True],
        nulls_last=True,
    ).with_columns(_k=run_position(group))
    cap = pl.when(pl.col("_secondary")).then(cfg.per_author_replies)
    rows = rows.filter(
        pl.col("author_id").is_null() | (pl.col("_k") < cap.otherwise(cfg.per_author_originals))
    )
    return _ranked(
        rows.sort(["user_id", "published_at", "article_id"], descending=[False, True, True]),
        in_network=True,
        limit=cfg.in_network_max,
        score=None,
    )


def out_of_network_source(
    query: Query,
    retriever: Retriever,
    cfg: SourceConfig,
    in_network: pl.DataFrame,
    articles: pl.DataFrame,
) -> pl.DataFrame:
    """The retriever's top `out_of_network_max` posts per user that are not in-network.

    Posts already found in-network and posts by followed authors are dropped, so the two
    sources are disjoint and "out of network" means what it says.
    """
    exclude = pl.concat(
        [in_network.select(*PAIR), query.seen.select(*PAIR), query.served.select(*PAIR)]
    ).unique()
    got = retriever.retrieve(
        query.user_ids,
        query.now,
        cfg.out_of_network_max,
        published_after=published_after(query.now, cfg),
        exclude=exclude,
        exclude_authors=query.follows,
    )
    missing = [c for c in RETRIEVED_SCHEMA if c not in got.columns]
    if missing:
        raise DataValidationError(
            f"output of retriever {component_name(retriever)}",
            None,
            f"columns {list(RETRIEVED_SCHEMA)}",
            f"{got.columns} ({missing} missing)",
        )
    got = got.select([pl.col(c).cast(t) for c, t in RETRIEVED_SCHEMA.items()])
    authors = rows_with(articles, "article_id", got["article_id"]).select("article_id", "author_id")
    got = (
        got.join(query.users.select("user_id"), on="user_id", how="semi")
        .join(in_network.select(*PAIR), on=["user_id", "article_id"], how="anti")
        .join(authors, on="article_id", how="left")
        .join(query.follows, on=["user_id", "author_id"], how="anti")
    )
    got = got.filter(pair_key(got, "user_id", "article_id").is_first_distinct())
    if not is_best_first(got):
        got = got.sort(
            ["user_id", "retrieval_score", "article_id"], descending=[False, True, False]
        )
    return _ranked(got, in_network=False, limit=cfg.out_of_network_max, score="retrieval_score")


def is_best_first(rows: pl.DataFrame) -> bool:
    """Whether rows are ordered by user_id, retrieval_score descending, article_id: a
    linear check that saves re-sorting millions of rows a retriever already ordered."""
    u, s, a = pl.col("user_id"), pl.col("retrieval_score"), pl.col("article_id")
    pu, ps, pa = u.shift(1), s.shift(1), a.shift(1)
    ok = (pu < u) | ((pu == u) & ((ps > s) | ((ps == s) & (pa < a))))
    return bool(rows.select(ok.fill_null(True).all()).item())


def _ranked(rows: pl.DataFrame, *, in_network: bool, limit: int, score: str | None) -> pl.DataFrame:
    """Keep the first `limit` rows per user (rows come sorted best first) in CANDIDATE_SCHEMA."""
    return (
        rows.with_columns(source_rank=(run_position("user_id") + 1).cast(pl.Int32))
        .filter(pl.col("source_rank") <= limit)
        .select(
            "user_id",
            "article_id",
            pl.lit(in_network).alias("in_network"),
            "source_rank",
            (pl.col(score) if score else pl.lit(None)).cast(pl.Float64).alias("retrieval_score"),
        )
    )
