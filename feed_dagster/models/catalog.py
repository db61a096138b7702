"""The item catalog and the input vocabulary: per-article features aligned by row, the
feature sizes every model stores (FeatureConfig), hashed id buckets, post-age buckets, the
author profiles, and the time helpers the other model inputs share.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime

import numpy as np
import polars as pl

from feed_dagster.embeddings.hashing import hash_ints
from feed_dagster.sorted_search import search_sorted, unique

# Age of a post (hours) at the moment it is shown or engaged with. Fine steps over the first
# two days, where a feed's posts live and freshness matters most, then coarse ones for the
# older news articles of EBNeRD. Bucket 0 is padding.
AGE_EDGES_HOURS: tuple[float, ...] = (
    0.25, 0.5, 1, 2, 3, 4, 6, 8, 10, 12, 15, 18, 21, 24, 30, 36, 42, 48,
    72, 96, 168, 336, 720,
)  # fmt: skip
N_AGE_BUCKETS = len(AGE_EDGES_HOURS) + 2
US_PER_HOUR = 3_600_000_000
# "Never": the first-engagement time of an item or user nobody has engaged with yet.
NEVER_US = np.iinfo(np.int64).max
# Main topics kept per author (ItemCatalog.author_topics, the ranker's author_topic_affinity).
AUTHOR_TOPICS = 3


# The columns of the articles table a catalog reads (ItemCatalog.build).
CATALOG_COLUMNS = ["article_id", "author_id", "published_at", "topic"]


@dataclass(frozen=True)
class FeatureConfig:
    """Sizes of the input vocabulary; stored with every model so serving builds the same inputs."""

    history_len: int = 32
    # Longer slates are cut into groups of this many candidates; scores do not change because
    # candidates never see each other (candidate isolation), only the padding does.
    max_candidates: int = 16
    author_buckets: int = 16_384
    topic_buckets: int = 512
    user_buckets: int = 16_384
    post_buckets: int = 65_536
    # Hash functions per id: an id's embedding is the sum of this many rows of one table, so
    # two ids share their whole embedding only when every one of their hashes collides.
    id_hashes: int = 2

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> FeatureConfig:
        return cls(**{f.name: int(d[f.name]) for f in fields(cls) if f.name in d})


def age_bucket(age_us: np.ndarray) -> np.ndarray:
    """Bucket index (1..N_AGE_BUCKETS-1) of ages in microseconds; 0 stays free for padding."""
    hours = np.maximum(np.asarray(age_us, dtype=np.float64), 0.0) / US_PER_HOUR
    return (np.searchsorted(np.asarray(AGE_EDGES_HOURS), hours, side="right") + 1).astype(np.int16)


def hash_bucket(ids: np.ndarray, buckets: int, seed: int) -> np.ndarray:
    """Hashed embedding row of ids in 1..buckets-1; negative ids (our null marker) map to 0."""
    ids = np.asarray(ids, dtype=np.int64)
    rows = (hash_ints(ids, seed=seed) % np.uint64(buckets - 1)).astype(np.int64) + 1
    return np.where(ids < 0, 0, rows).astype(np.int32)


def hash_buckets(ids: np.ndarray, buckets: int, seed: int, hashes: int) -> np.ndarray:
    """int32 [len(ids), hashes]: one row per hash function (seeds seed*1000 + j)."""
    return np.stack([hash_bucket(ids, buckets, seed * 1000 + j) for j in range(hashes)], axis=-1)


def first_engaged(keys: np.ndarray, times_us: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Earliest time of each query key among (keys, times_us) events; NEVER_US if none."""
    keys = np.asarray(keys, dtype=np.int64)
    queries = np.asarray(queries, dtype=np.int64)
    if len(keys) == 0:
        return np.full(len(queries), NEVER_US, dtype=np.int64)
    # One minimum per key (a hash aggregation) rather than a sort of every event: the
    # engagements of a news world run to tens of millions of rows.
    firsts = (
        pl.DataFrame({"k": keys, "t": np.asarray(times_us, dtype=np.int64)})
        .group_by("k")
        .agg(pl.col("t").min())
        .sort("k")
    )
    k, t = firsts["k"].to_numpy(), firsts["t"].to_numpy()
    pos = np.searchsorted(k, queries).clip(0, len(k) - 1)
    return np.where(k[pos] == queries, t[pos], NEVER_US).astype(np.int64)


# Authors whose posts' vectors are summed at once in author_profiles.
_AUTHORS_PER_BLOCK = 4096


def author_profiles(
    author: np.ndarray, content: np.ndarray, use: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(row of every item's author, normalised mean content per author) over the items
    where `use` holds; row 0 (zeros) for unknown authors and authors with no used item."""
    known = author >= 0
    authors, row = np.unique(author[known], return_inverse=True)
    item_row = np.zeros(len(author), dtype=np.int32)
    item_row[known] = row + 1
    sums = np.zeros((len(authors) + 1, content.shape[1]), dtype=np.float64)
    used = np.flatnonzero(known & use)
    order = np.argsort(item_row[used], kind="stable")
    used = used[order]
    rows = item_row[used]
    if len(rows):
        starts = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
        # Whole authors at a time, so each author's sum adds the same rows in the same
        # order, without copies of every post's vector (1 GiB at 1M posts of 64 floats).
        bounds = np.r_[starts[::_AUTHORS_PER_BLOCK], len(rows)]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            block = starts[(starts >= lo) & (starts < hi)]
            vecs = content[used[lo:hi]].astype(np.float64)
            sums[rows[block]] = np.add.reduceat(vecs, block - lo, axis=0)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    profile = np.where(norms > 0, sums / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
    profile[0] = 0.0
    return item_row, profile


def author_topic_profiles(
    author_row: np.ndarray, topic: np.ndarray, use: np.ndarray, n_authors: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each author row's AUTHOR_TOPICS most frequent topics over the items where `use` holds
    (ties to the smaller topic id) and their shares of those items; -1 and 0 fill the rest,
    and row 0 (no author) has none."""
    topics = np.full((n_authors, AUTHOR_TOPICS), -1, dtype=np.int64)
    share = np.zeros((n_authors, AUTHOR_TOPICS), dtype=np.float32)
    pick = use & (author_row > 0) & (topic >= 0)
    if not pick.any():
        return topics, share
    counts = (
        pl.DataFrame({"a": author_row[pick].astype(np.int64), "t": topic[pick].astype(np.int64)})
        .group_by("a", "t")
        .agg(pl.len().alias("n"))
        .with_columns((pl.col("n") / pl.col("n").sum().over("a")).alias("share"))
        .sort(["a", "n", "t"], descending=[False, True, False])
        .with_columns(pl.int_range(pl.len()).over("a").alias("k"))
        .filter(pl.col("k") < AUTHOR_TOPICS)
    )
    a, k = counts["a"].to_numpy(), counts["k"].to_numpy()
    topics[a, k] = counts["t"].to_numpy()
    share[a, k] = counts["share"].to_numpy()
    return topics, share


def _micros(s: pl.Series) -> np.ndarray:
    return s.cast(pl.Datetime("us")).dt.epoch("us").fill_null(0).to_numpy().astype(np.int64)


def post_firsts(engagements: pl.DataFrame) -> pl.DataFrame:
    """(article_id, first_us): each engaged post's earliest engagement in microseconds,
    0 when any of its times is missing (as _micros reads a missing time). One minimum per
    post, so no array (or column) of every engagement is made."""
    return engagements.group_by("article_id").agg(
        pl.when(pl.col("engaged_at").null_count() > 0)
        .then(0)
        .otherwise(pl.col("engaged_at").min().cast(pl.Datetime("us")).dt.epoch("us"))
        .cast(pl.Int64)
        .alias("first_us")
    )


def to_micros(t: datetime) -> int:
    """Microseconds since the epoch of a (naive UTC) datetime, as the tables store them."""
    return int(pl.Series([t]).cast(pl.Datetime("us")).dt.epoch("us")[0])


@dataclass(frozen=True)
class ItemCatalog:
    """Per-article features aligned by row; row 0 is the padding item (all zeros)."""

    article_ids: np.ndarray  # int64 [n], sorted ascending; article row i+1 <-> article_ids[i]
    content: np.ndarray  # float32 [n+1, dim]
    post_bucket: np.ndarray  # int32 [n+1, id_hashes], hashed post id (row 0: padding)
    # First engagement with the post (NEVER_US if none): a post's id embedding is used only
    # for posts engaged with before the scoring time and before the model's training cut, so
    # a post the model never saw ranks by content alone, never by an untrained hash row.
    first_engaged_us: np.ndarray  # int64 [n+1]
    author_id: np.ndarray  # int64 [n+1], -1 when unknown
    author_bucket: np.ndarray  # int32 [n+1, id_hashes]
    topic: np.ndarray  # int32 [n+1], -1 when unknown
    topic_bucket: np.ndarray  # int32 [n+1]
    published_us: np.ndarray  # int64 [n+1]
    # The author's profile: the normalised mean content of the author's posts published
    # before `profile_before` (row 0: zeros, for unknown authors and authors with no posts
    # then). What an author writes about is how a ranker tells a user's affinity to them.
    author_row: np.ndarray  # int32 [n+1] row of author_content
    author_content: np.ndarray  # float32 [authors+1, dim]
    # The author's AUTHOR_TOPICS main topics (-1: none) and their shares of the author's
    # posts before `profile_before`, by author_row.
    author_topics: np.ndarray  # int64 [authors+1, AUTHOR_TOPICS]
    author_topic_share: np.ndarray  # float32 [authors+1, AUTHOR_TOPICS]

    @property
    def dim(self) -> int:
        return int(self.content.shape[1])

    def __len__(self) -> int:
        return len(self.article_ids)

    @classmethod
    def build(
        cls,
        articles: pl.DataFrame,
        content_vectors: np.ndarray,
        cfg: FeatureConfig,
        engagements: pl.DataFrame | None = None,
        profile_before: datetime | None = None,
        firsts: pl.DataFrame | None = None,
    ) -> ItemCatalog:
        """Catalog of `articles`; `content_vectors[i]` is the vector of `articles` row i.

        `engagements` give each post's first engagement time (without them no post counts
        as engaged, and models score by content, author and topic only); or `firsts` gives
        those times, as `post_firsts` makes them from a frame (or the warehouse from its
        table: models.warehouse_engagements). Author profiles
        read only posts published before `profile_before` (all posts when None), so an
        evaluation never sees what an author writes later."""
        vectors = np.asarray(content_vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != articles.height:
            raise ValueError(
                f"content_vectors: expected shape [{articles.height}, dim] aligned with the "
                f"articles table, got {vectors.shape}"
            )
        ids = articles["article_id"].to_numpy().astype(np.int64)
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        if len(ids) > 1 and (np.diff(ids) == 0).any():
            dup = ids[1:][np.diff(ids) == 0][:5].tolist()
            raise ValueError(f"articles.article_id: expected unique ids, duplicates {dup}")

        def padded(values: np.ndarray, fill: int) -> np.ndarray:
            return np.concatenate([np.array([fill], dtype=values.dtype), values[order]])

        author = articles["author_id"].fill_null(-1).to_numpy().astype(np.int64)
        topic = articles["topic"].fill_null(-1).to_numpy().astype(np.int64)
        content = np.zeros((len(ids) + 1, vectors.shape[1]), dtype=np.float32)
        np.take(vectors, order, axis=0, out=content[1:])
        author_p = padded(author, -1)
        topic_p = padded(topic, -1)
        topic_bucket = np.where(topic_p < 0, 0, topic_p % (cfg.topic_buckets - 1) + 1)
        ids_p = np.concatenate([[-1], ids])
        first = np.full(len(ids_p), NEVER_US, dtype=np.int64)
        if firsts is None and engagements is not None:
            firsts = post_firsts(engagements)
        if firsts is not None and firsts.height:
            first[1:] = first_engaged(
                firsts["article_id"].to_numpy(), firsts["first_us"].to_numpy(), ids
            )
        published = padded(_micros(articles["published_at"]), 0)
        limit = NEVER_US if profile_before is None else to_micros(profile_before)
        author_row, author_content = author_profiles(author_p, content, published < limit)
        author_topics, author_topic_share = author_topic_profiles(
            author_row, topic_p, published < limit, len(author_content)
        )
        return cls(
            article_ids=ids,
            content=content,
            post_bucket=hash_buckets(ids_p, cfg.post_buckets, 3, cfg.id_hashes),
            first_engaged_us=first,
            author_id=author_p,
            author_bucket=hash_buckets(author_p, cfg.author_buckets, 1, cfg.id_hashes),
            topic=topic_p.astype(np.int32),
            topic_bucket=topic_bucket.astype(np.int32),
            published_us=published,
            author_row=author_row,
            author_content=author_content,
            author_topics=author_topics,
            author_topic_share=author_topic_share,
        )

    def rows(self, article_ids: np.ndarray, what: str = "article_id") -> np.ndarray:
        """Catalog rows (>= 1) of article ids; raises naming the first unknown ids."""
        ids = np.asarray(article_ids, dtype=np.int64)
        pos = search_sorted(self.article_ids, ids).clip(0, max(len(self.article_ids) - 1, 0))
        found = self.article_ids[pos] == ids if len(self.article_ids) else np.zeros(0, bool)
        if not found.all():
            missing = unique(ids[~found])[:5].tolist()
            raise ValueError(f"{what}: ids not in the articles table, e.g. {missing}")
        return (pos + 1).astype(np.int32)
