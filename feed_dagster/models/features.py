"""Model inputs built from the canonical tables: item catalog, histories and candidate groups.

One code path serves training, evaluation and serving: an impression is a (user, time,
candidates) triple, and at serving time the "impression" is (user, now, retrieved
candidates). Every feature of an impression is computed from rows timestamped strictly before
its time, so training inputs look exactly like serving inputs (and nothing leaks from the
future).

Everything is vectorised: polars joins for labels and flags, one sort-merge of engagement and
query events for histories, numpy scatter for padding. No Python loop per impression.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from feed_dagster.data.schema import ACTIONS
from feed_dagster.embeddings.hashing import hash_ints

# Age of a post (hours) at the moment it is shown or engaged with. Fine steps over the first
# two days, where a feed's posts live and freshness matters most, then coarse ones for the
# older news articles of EBNeRD. Bucket 0 is padding.
AGE_EDGES_HOURS: tuple[float, ...] = (
    0.25, 0.5, 1, 2, 3, 4, 6, 8, 10, 12, 15, 18, 21, 24, 30, 36, 42, 48,
    72, 96, 168, 336, 720,
)  # fmt: skip
N_AGE_BUCKETS = len(AGE_EDGES_HOURS) + 2
N_ACTIONS = len(ACTIONS)
# Actions that count as a positive engagement (a retrieval positive, a "liked" history item).
POSITIVE_ACTIONS: tuple[str, ...] = ("favorite", "reply", "repost", "quote", "share", "click")
US_PER_HOUR = 3_600_000_000
# "Never": the first-engagement time of an item or user nobody has engaged with yet.
NEVER_US = np.iinfo(np.int64).max
# Long-term engagement profile of (user, candidate): positive engagements before the impression
# on the candidate's topic, with its author, and in total, as log counts and shares.
PROFILE_FEATURES: tuple[str, ...] = (
    "log_topic",
    "log_author",
    "log_total",
    "topic_share",
    "author_share",
    "log_post",
    "log_post_recent",
    "log_shown_topic",
    "log_shown_author",
    "log_shown_post",
    "log_author_everyone",
    "log_author_everyone_shown",
    "author_topic_affinity",
)
# The exposure counts (log_shown_*) next to the engagement counts let the ranker read a
# click-through rate (log engaged - log shown): how often this user clicks this topic or
# author when shown it, and how often anyone clicks this post, rather than how much of each
# happened to be shown. The author's counts over everyone (engaged, shown) are the same rate
# for the author's whole output: a quality signal that reaches an author's brand-new posts.
# author_topic_affinity is how much of the user's engagement went to the topics the
# candidate's author writes about: sum over the author's AUTHOR_TOPICS main topics of
# (share of the author's posts) x (share of the user's positive engagements), before the
# impression. A user's taste for an author is mostly a taste for what the author covers.
# Rankers stored before these existed read the first seven only.
PROFILE_FEATURES_V1: tuple[str, ...] = PROFILE_FEATURES[:7]
AUTHOR_TOPICS = 3
# "Recent" in log_post_recent: a post's engagement in the hours before the impression.
POST_RECENT_US = 6 * US_PER_HOUR


# Classic-peer inputs per candidate: ALS, item-kNN, EASE, all-time popularity, "present" flag
# (computed by models.peers.PeerFeatures, which must produce this many columns).
N_PEER_FEATURES = 8
# (user ids, article ids, impression times in us) -> float32 [n, N_PEER_FEATURES]
PeerScores = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


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
    order = np.lexsort((times_us, keys))
    k, t = keys[order], np.asarray(times_us, dtype=np.int64)[order]
    pos = np.searchsorted(k, queries).clip(0, len(k) - 1)
    return np.where(k[pos] == queries, t[pos], NEVER_US).astype(np.int64)


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
    rows = item_row[known & use]
    order = np.argsort(rows, kind="stable")
    rows, vecs = rows[order], content[known & use][order]
    if len(rows):
        starts = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
        sums[rows[starts]] = np.add.reduceat(vecs.astype(np.float64), starts, axis=0)
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
    ) -> ItemCatalog:
        """Catalog of `articles`; `content_vectors[i]` is the vector of `articles` row i.

        `engagements` give each post's first engagement time (without them no post counts
        as engaged, and models score by content, author and topic only). Author profiles
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
        content[1:] = vectors[order]
        author_p = padded(author, -1)
        topic_p = padded(topic, -1)
        topic_bucket = np.where(topic_p < 0, 0, topic_p % (cfg.topic_buckets - 1) + 1)
        ids_p = np.concatenate([[-1], ids])
        first = np.full(len(ids_p), NEVER_US, dtype=np.int64)
        if engagements is not None and engagements.height:
            first[1:] = first_engaged(
                engagements["article_id"].to_numpy(), _micros(engagements["engaged_at"]), ids
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
        pos = np.searchsorted(self.article_ids, ids).clip(0, max(len(self.article_ids) - 1, 0))
        found = self.article_ids[pos] == ids if len(self.article_ids) else np.zeros(0, bool)
        if not found.all():
            missing = np.unique(ids[~found])[:5].tolist()
            raise ValueError(f"{what}: ids not in the articles table, e.g. {missing}")
        return (pos + 1).astype(np.int32)


@dataclass(frozen=True)
class History:
    """The last H engagements of each query (user, time), oldest first, left-padded."""

    item: np.ndarray  # int32 [Q, H] catalog rows, 0 = padding
    actions: np.ndarray  # int16 [Q, H] bit a set <=> ACTIONS[a] happened
    dwell: np.ndarray  # float32 [Q, H] log1p(seconds)
    age: np.ndarray  # int16 [Q, H] age bucket of the post when engaged with, 0 = padding
    time_us: np.ndarray  # int64 [Q] the query time the history was taken before
    user_bucket: np.ndarray  # int32 [Q, id_hashes] hashed user id
    # The user's first engagement (NEVER_US if none): the user-id embedding is used only for
    # users who had engaged before the query time and the model's training cut.
    user_first_us: np.ndarray  # int64 [Q]

    @property
    def mask(self) -> np.ndarray:
        return self.item > 0

    def take(self, idx: np.ndarray) -> History:
        return History(*(getattr(self, f.name)[idx] for f in fields(self)))


def _time_keys(item: np.ndarray, time_us: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """(sorted keys, time origin, time resolution, step) of events keyed item * step + time:
    one sorted array answers "how many events of this item before t"."""
    item = np.asarray(item, dtype=np.int64)
    t0 = int(time_us.min()) if time_us.size else 0
    span = int(time_us.max()) - t0 + 2 if time_us.size else 2
    # Coarser time steps when item * span would overflow int64. Counting floor(e / r) <
    # floor(t / r) still counts only events strictly before t (it may miss a few in the same
    # step), so no future event leaks in.
    n_items = int(item.max()) + 2 if item.size else 2
    resolution = 1
    while n_items * (span // resolution + 2) >= 2**62:
        resolution *= 2
    step = span // resolution + 2
    keys = np.sort(item * step + (time_us - t0) // resolution)
    return keys, t0, resolution, step


def _count_before(
    index: tuple[np.ndarray, int, int, int], item: np.ndarray, time_us: np.ndarray
) -> np.ndarray:
    """Events of `item` strictly before `time_us` (element-wise) in a `_time_keys` index."""
    keys, t0, resolution, step = index
    if keys.size == 0:
        return np.zeros(len(item), dtype=np.float32)
    item = np.asarray(item, dtype=np.int64)
    # Times before the index's start count nothing; later ones are capped inside the item.
    rel = np.clip((np.asarray(time_us, dtype=np.int64) - t0) // resolution, 0, step - 1)
    first = np.searchsorted(keys, item * step, side="left")
    upto = np.searchsorted(keys, item * step + rel, side="left")
    return (upto - first).astype(np.float32)


@dataclass(frozen=True)
class ExposureLog:
    """Logged impressions (who was shown which catalog row when), for exposure counts."""

    user: np.ndarray  # int64 [N]
    item: np.ndarray  # int32 [N] catalog rows
    time_us: np.ndarray  # int64 [N]

    @classmethod
    def build(cls, impressions: pl.DataFrame, catalog: ItemCatalog) -> ExposureLog:
        return cls(
            user=impressions["user_id"].to_numpy().astype(np.int64),
            item=catalog.rows(impressions["article_id"].to_numpy(), "impressions.article_id"),
            time_us=_micros(impressions["shown_at"]),
        )

    @functools.cached_property
    def _item_index(self) -> tuple[np.ndarray, int, int, int]:
        return _time_keys(self.item, self.time_us)

    def shown_before(self, item: np.ndarray, time_us: np.ndarray) -> np.ndarray:
        """How often catalog row `item` was shown (to anyone) strictly before `time_us`."""
        return _count_before(self._item_index, item, time_us)

    def pair_counter(self, of_item: np.ndarray) -> PairCounter:
        """Counts of (user, of_item[item]) exposures, e.g. of_item = the catalog's topics;
        values < 0 (unknown) are not counted."""
        key = of_item[self.item].astype(np.int64)
        known = key >= 0
        return PairCounter.build(self.user[known], key[known], self.time_us[known])


@dataclass(frozen=True)
class PairCounter:
    """How many (a, b) events happened strictly before a time: the pairs get dense ids, so
    one sorted (pair, time) key array answers every query with two binary searches."""

    pairs: np.ndarray  # int64 sorted unique a * 2**31 + b
    index: tuple[np.ndarray, int, int, int]

    @classmethod
    def build(cls, a: np.ndarray, b: np.ndarray, time_us: np.ndarray) -> PairCounter:
        key = np.asarray(a, np.int64) * 2**31 + np.asarray(b, np.int64)
        pairs, dense = np.unique(key, return_inverse=True)
        return cls(pairs, _time_keys(dense, np.asarray(time_us, np.int64)))

    def before(self, a: np.ndarray, b: np.ndarray, time_us: np.ndarray) -> np.ndarray:
        key = np.asarray(a, np.int64) * 2**31 + np.asarray(b, np.int64)
        if self.pairs.size == 0:
            return np.zeros(len(key), dtype=np.float32)
        pos = np.searchsorted(self.pairs, key).clip(0, self.pairs.size - 1)
        found = (self.pairs[pos] == key) & (np.asarray(b) >= 0)
        return np.where(found, _count_before(self.index, pos, time_us), 0.0).astype(np.float32)


@dataclass(frozen=True)
class EngagementLog:
    """Engagements sorted by (user, time) with the per-row features history tokens need."""

    user: np.ndarray  # int64 [E]
    time_us: np.ndarray  # int64 [E]
    item: np.ndarray  # int32 [E] catalog rows
    actions: np.ndarray  # int16 [E] action bitmask
    dwell: np.ndarray  # float32 [E] log1p(seconds)
    age: np.ndarray  # int16 [E]
    # Logged impressions, when the source has them: exposure counts for the profile.
    exposures: ExposureLog | None = None
    # The catalog's topic and author per row, for the exposure counters.
    catalog_topic: np.ndarray | None = None
    catalog_author: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        engagements: pl.DataFrame,
        catalog: ItemCatalog,
        impressions: pl.DataFrame | None = None,
    ) -> EngagementLog:
        # Ties are broken by article id so the history order never depends on input order.
        e = engagements.sort(["user_id", "engaged_at", "article_id"])
        item = catalog.rows(e["article_id"].to_numpy(), "engagements.article_id")
        bits = np.zeros(e.height, dtype=np.int16)
        for a, name in enumerate(ACTIONS):
            bits |= e[name].fill_null(False).to_numpy().astype(np.int16) << a
        time_us = _micros(e["engaged_at"])
        return cls(
            user=e["user_id"].to_numpy().astype(np.int64),
            time_us=time_us,
            item=item,
            actions=bits,
            dwell=np.log1p(e["dwell_seconds"].fill_null(0.0).to_numpy().clip(0)).astype(np.float32),
            age=age_bucket(time_us - catalog.published_us[item]),
            exposures=None if impressions is None else ExposureLog.build(impressions, catalog),
            catalog_topic=catalog.topic,
            catalog_author=catalog.author_id,
        )

    @functools.cached_property
    def shown_topic(self) -> PairCounter:
        """(user, topic) exposures; needs `exposures` and the catalog the log was built on."""
        assert self.exposures is not None and self.catalog_topic is not None
        return self.exposures.pair_counter(self.catalog_topic)

    @functools.cached_property
    def shown_author(self) -> PairCounter:
        assert self.exposures is not None and self.catalog_author is not None
        return self.exposures.pair_counter(self.catalog_author)

    @functools.cached_property
    def positive_topic(self) -> PairCounter:
        """(user, topic) positive engagements."""
        assert self.catalog_topic is not None
        pos = self.positive()
        topic = self.catalog_topic[self.item[pos]].astype(np.int64)
        known = topic >= 0
        return PairCounter.build(self.user[pos][known], topic[known], self.time_us[pos][known])

    @functools.cached_property
    def _author_positives(self) -> tuple[np.ndarray, int, int, int]:
        assert self.catalog_author is not None
        author = self.catalog_author[self.item]
        keep = self.positive() & (author >= 0)
        return _time_keys(author[keep], self.time_us[keep])

    @functools.cached_property
    def _author_shown(self) -> tuple[np.ndarray, int, int, int]:
        assert self.exposures is not None and self.catalog_author is not None
        author = self.catalog_author[self.exposures.item]
        keep = author >= 0
        return _time_keys(author[keep], self.exposures.time_us[keep])

    def author_counts(self, item: np.ndarray, time_us: np.ndarray) -> tuple[np.ndarray, ...]:
        """(everyone's positives, everyone's exposures) of the author of catalog row `item`
        strictly before `time_us`; zeros for unknown authors and without exposures."""
        assert self.catalog_author is not None
        author = self.catalog_author[item]
        known = author >= 0
        a = np.maximum(author, 0)
        engaged = np.where(known, _count_before(self._author_positives, a, time_us), 0.0)
        shown = np.zeros(len(a), dtype=np.float32)
        if self.exposures is not None:
            shown = np.where(known, _count_before(self._author_shown, a, time_us), 0.0)
        return engaged.astype(np.float32), shown.astype(np.float32)

    @functools.cached_property
    def _item_positives(self) -> tuple[np.ndarray, int, int, int]:
        pos = self.positive()
        return _time_keys(self.item[pos], self.time_us[pos])

    def positives_before(self, item: np.ndarray, time_us: np.ndarray) -> np.ndarray:
        """Everyone's positive engagements with catalog row `item` strictly before `time_us`
        (element-wise), as float32 counts."""
        return _count_before(self._item_positives, item, time_us)

    def positive(self) -> np.ndarray:
        bits = sum(1 << ACTIONS.index(a) for a in POSITIVE_ACTIONS)
        return (self.actions & bits) != 0

    def history(self, users: np.ndarray, times_us: np.ndarray, cfg: FeatureConfig) -> History:
        """Last `cfg.history_len` engagements of each user strictly before each time.

        A sort-merge: query events sort before engagement events at the same (user, time),
        so the running count of engagements at a query is the end of its window in the
        engagement order, and "strictly before" holds by construction.
        """
        length = cfg.history_len
        users = np.asarray(users, dtype=np.int64)
        times_us = np.asarray(times_us, dtype=np.int64)
        q = len(users)
        ev_user = np.concatenate([self.user, users])
        ev_time = np.concatenate([self.time_us, times_us])
        ev_is_eng = np.concatenate([np.ones(len(self.user), np.int8), np.zeros(q, np.int8)])
        order = np.lexsort((ev_is_eng, ev_time, ev_user))
        n_before = np.cumsum(ev_is_eng[order]) - ev_is_eng[order]
        end = np.empty(q, dtype=np.int64)
        is_query = order >= len(self.user)
        end[order[is_query] - len(self.user)] = n_before[is_query]
        start = np.searchsorted(self.user, users, side="left")
        idx = end[:, None] - length + np.arange(length)[None, :]
        valid = idx >= start[:, None]
        idx = np.where(valid, idx, 0)
        if len(self.user) == 0:
            valid[:] = False

        def gather(values: np.ndarray, fill: float | int) -> np.ndarray:
            if len(values) == 0:
                return np.full((q, length), fill, dtype=values.dtype)
            return np.where(valid, values[idx], fill).astype(values.dtype)

        # The log is sorted by (user, time): a user's first engagement sits at `start`.
        user_first = np.full(q, NEVER_US, dtype=np.int64)
        if len(self.user):
            pos = start.clip(0, len(self.user) - 1)
            user_first = np.where(self.user[pos] == users, self.time_us[pos], NEVER_US)
        return History(
            item=gather(self.item, 0),
            actions=gather(self.actions, 0),
            dwell=gather(self.dwell, 0.0),
            age=gather(self.age, 0),
            time_us=times_us,
            user_bucket=hash_buckets(users, cfg.user_buckets, 2, cfg.id_hashes),
            user_first_us=user_first.astype(np.int64),
        )


@dataclass(frozen=True)
class RankerData:
    """Candidate groups: one (user, time) context with up to C candidates each.

    An impression with more than C candidates spans several groups (`group_impression`
    repeats). Arrays are numpy; the model gathers content vectors from the catalog per
    mini-batch so the full dataset never holds [G, C, dim] floats.
    """

    group_impression: np.ndarray  # int64 [G]
    group_user: np.ndarray  # int64 [G]
    group_time_us: np.ndarray  # int64 [G]
    # 1 for a logged slate (and always at evaluation and serving), 0 for a group built from
    # an engagement and sampled negatives: the model calibrates the two apart.
    group_logged: np.ndarray  # int8 [G]
    history: History  # [G, H], with the user's hashed id and first engagement
    cand_article: np.ndarray  # int64 [G, C], -1 = padding
    cand_item: np.ndarray  # int32 [G, C] catalog rows, 0 = padding
    cand_age: np.ndarray  # int16 [G, C]
    cand_in_network: np.ndarray  # int8 [G, C]
    cand_topic_follow: np.ndarray  # int8 [G, C]
    cand_profile: np.ndarray  # float32 [G, C, len(PROFILE_FEATURES)]
    # Classic peers' scores fitted before the impression (models.peers), zeros when absent.
    cand_peer: np.ndarray  # float32 [G, C, N_PEER_FEATURES]
    cand_position: np.ndarray  # int32 [G, C] slate position (evaluation only, never an input)
    labels: np.ndarray  # bool [G, C, N_ACTIONS] over schema.ACTIONS
    dwell: np.ndarray  # float32 [G, C] log1p(seconds)

    @property
    def cand_mask(self) -> np.ndarray:
        return self.cand_item > 0

    def __len__(self) -> int:
        return len(self.group_impression)

    def take(self, idx: np.ndarray) -> RankerData:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.take(idx) if isinstance(v, History) else v[idx]
        return RankerData(**out)

    @staticmethod
    def concat(parts: list[RankerData]) -> RankerData:
        """Groups of every part in order, candidate slots padded to the widest part."""
        c = max(p.cand_item.shape[1] for p in parts)
        pad_fill = {"cand_article": -1, "cand_position": -1}
        out = {}
        for f in fields(RankerData):
            values = [getattr(p, f.name) for p in parts]
            if f.name == "history":
                out[f.name] = History(
                    *(np.concatenate([getattr(h, g.name) for h in values]) for g in fields(History))
                )
            elif f.name.startswith("cand_") or f.name in ("labels", "dwell"):
                widened = []
                for v in values:
                    width = [(0, 0)] * v.ndim
                    width[1] = (0, c - v.shape[1])
                    widened.append(np.pad(v, width, constant_values=pad_fill.get(f.name, 0)))
                out[f.name] = np.concatenate(widened)
            else:
                out[f.name] = np.concatenate(values)
        return RankerData(**out)

    def rows(self) -> pl.DataFrame:
        """One row per real candidate, in group order: the keys scores are reported against."""
        m = self.cand_mask
        g = np.nonzero(m)[0]
        return pl.DataFrame(
            {
                "impression_id": self.group_impression[g],
                "user_id": self.group_user[g],
                "article_id": self.cand_article[m],
                "position": self.cand_position[m],
                **{a: self.labels[..., i][m] for i, a in enumerate(ACTIONS)},
                "dwell_log1p": self.dwell[m],
            }
        )


def _follow_flags(
    pairs: pl.DataFrame, follows: pl.DataFrame, topic_follows: pl.DataFrame
) -> pl.DataFrame:
    """In-network and followed-topic flags of (row, user_id, author_id, topic, time_us) pairs.

    A follow counts only if it happened strictly before the impression; topic follows carry
    no time and are taken as they are.
    """
    f = (
        follows.select(
            pl.col("follower_id").alias("user_id"),
            pl.col("followee_id").alias("author_id"),
            pl.col("followed_at").cast(pl.Datetime("us")).dt.epoch("us").alias("followed_us"),
        )
        .group_by("user_id", "author_id")
        .agg(pl.col("followed_us").min())
    )
    tf = topic_follows.select("user_id", pl.col("topic").cast(pl.Int64)).unique()
    out = (
        pairs.join(f, on=["user_id", "author_id"], how="left")
        .join(tf.with_columns(pl.lit(1, pl.Int8).alias("tf")), on=["user_id", "topic"], how="left")
        .select(
            "row",
            (
                pl.col("followed_us").is_not_null()
                & (pl.col("followed_us").fill_null(0) < pl.col("time_us"))
            )
            .cast(pl.Int8)
            .alias("in_network"),
            pl.col("tf").fill_null(0).cast(pl.Int8).alias("topic_follow"),
        )
        .sort("row")
    )
    return out


def _prior_counts(events: pl.DataFrame, queries: pl.DataFrame, by: list[str]) -> np.ndarray:
    """For each query row (row, *by, time_us): how many events with the same `by` keys have
    time_us strictly before the query's. Events: (*by, time_us)."""
    if events.height == 0 or queries.height == 0:
        return np.zeros(queries.height, dtype=np.float32)
    cum = (
        events.group_by(*by, "time_us")
        .agg(pl.len().alias("n"))
        .sort("time_us")
        .with_columns(pl.col("n").cum_sum().over(by))
        .rename({"time_us": "t"})
    )
    joined = queries.sort("time_us").join_asof(
        cum,
        left_on="time_us",
        right_on="t",
        by=by,
        strategy="backward",
        allow_exact_matches=False,  # strictly before: nothing at the impression time counts
        check_sortedness=False,
    )
    return joined.sort("row")["n"].fill_null(0).to_numpy().astype(np.float32)


def engagement_profile(
    log: EngagementLog,
    catalog: ItemCatalog,
    user: np.ndarray,
    item: np.ndarray,
    time_us: np.ndarray,
) -> np.ndarray:
    """[n, len(PROFILE_FEATURES)] long-term profile of each (user, candidate item, time).

    The 32-item history only covers a few days of an active user; these counts cover every
    earlier positive engagement, so the model sees a user's lasting topic and author tastes.
    """
    pos = log.positive()
    ev = pl.DataFrame(
        {
            "user_id": log.user[pos],
            "topic": catalog.topic[log.item[pos]].astype(np.int64),
            "author_id": catalog.author_id[log.item[pos]],
            "time_us": log.time_us[pos],
        }
    )
    q = pl.DataFrame(
        {
            "row": np.arange(len(user)),
            "user_id": np.asarray(user, dtype=np.int64),
            "topic": catalog.topic[item].astype(np.int64),
            "author_id": catalog.author_id[item],
            "time_us": np.asarray(time_us, dtype=np.int64),
        }
    )
    n_topic = _prior_counts(ev.filter(pl.col("topic") >= 0), q, ["user_id", "topic"])
    n_author = _prior_counts(ev.filter(pl.col("author_id") >= 0), q, ["user_id", "author_id"])
    n_total = _prior_counts(ev, q, ["user_id"])
    # Everyone's engagement with the post so far: a fresh post's only quality signal before
    # its id is trained.
    n_post = log.positives_before(item, time_us)
    n_post_recent = n_post - log.positives_before(item, np.asarray(time_us) - POST_RECENT_US)
    shown_topic = shown_author = shown_post = np.zeros(len(q), dtype=np.float32)
    if log.exposures is not None:
        ex, user = log.exposures, np.asarray(user, dtype=np.int64)
        shown_topic = log.shown_topic.before(user, catalog.topic[item], time_us)
        shown_author = log.shown_author.before(user, catalog.author_id[item], time_us)
        shown_post = ex.shown_before(item, time_us)
    author_engaged, author_shown = log.author_counts(item, time_us)
    # The user's share of engagement on each of the author's main topics, weighted by how
    # much of the author's output the topic is.
    rows = catalog.author_row[item]
    user64 = np.asarray(user, dtype=np.int64)
    topic_affinity = np.zeros(len(q), dtype=np.float32)
    for k in range(AUTHOR_TOPICS):
        t = catalog.author_topics[rows, k]
        n_k = log.positive_topic.before(user64, t, time_us)
        topic_affinity += catalog.author_topic_share[rows, k] * n_k / (n_total + 1.0)
    # Unknown topics/authors (EBNeRD has no authors) carry no evidence: zero, not a match.
    known_topic, known_author = q["topic"].to_numpy() >= 0, q["author_id"].to_numpy() >= 0
    n_topic, shown_topic = (np.where(known_topic, x, 0.0) for x in (n_topic, shown_topic))
    n_author, shown_author = (np.where(known_author, x, 0.0) for x in (n_author, shown_author))
    return np.stack(
        [
            np.log1p(n_topic),
            np.log1p(n_author),
            np.log1p(n_total),
            n_topic / (n_total + 1.0),
            n_author / (n_total + 1.0),
            np.log1p(n_post),
            np.log1p(n_post_recent),
            np.log1p(shown_topic),
            np.log1p(shown_author),
            np.log1p(shown_post),
            np.log1p(author_engaged),
            np.log1p(author_shown),
            topic_affinity,
        ],
        axis=1,
    ).astype(np.float32)


def build_ranker_data(
    impressions: pl.DataFrame,
    engagements: pl.DataFrame,
    follows: pl.DataFrame,
    topic_follows: pl.DataFrame,
    catalog: ItemCatalog,
    cfg: FeatureConfig,
    log: EngagementLog | None = None,
    history_until: datetime | None = None,
    logged: bool = True,
    peers: PeerScores | None = None,
) -> RankerData:
    """Candidate groups for impression rows (impression_id, user_id, article_id, position,
    shown_at), with labels joined from `engagements` on (impression_id, article_id).

    `log` (the engagement log, built once and reused) must come from the same `engagements`.
    `history_until` caps histories at a fixed time (a batch system that scores a whole period
    with the histories of its start); by default each impression sees everything before it.
    `peers` gives each row's classic-peer features (see models.peers); without it they are
    zeros ("absent").
    """
    log = log if log is not None else EngagementLog.build(engagements, catalog)
    imp = impressions.select("impression_id", "user_id", "article_id", "position", "shown_at").sort(
        ["impression_id", "position", "article_id"]
    )
    n = imp.height
    imp_id = imp["impression_id"].to_numpy().astype(np.int64)
    user = imp["user_id"].to_numpy().astype(np.int64)
    time_us = _micros(imp["shown_at"])
    item = catalog.rows(imp["article_id"].to_numpy(), "impressions.article_id")

    # Rank inside the impression, then cut into groups of max_candidates.
    starts = np.r_[0, np.flatnonzero(np.diff(imp_id)) + 1] if n else np.zeros(0, np.int64)
    run_len = np.diff(np.r_[starts, n])
    rank = np.arange(n) - np.repeat(starts, run_len)
    # Pad to the longest slate present (at most max_candidates): no compute on empty slots.
    c = int(min(cfg.max_candidates, run_len.max())) if n else 1
    chunk = rank // c
    new_group = np.ones(n, dtype=bool)
    if n:
        new_group[1:] = (imp_id[1:] != imp_id[:-1]) | (chunk[1:] != chunk[:-1])
    group = np.cumsum(new_group) - 1
    g_first = np.flatnonzero(new_group)
    slot = rank % c
    n_groups = len(g_first)

    labels_df = (
        engagements.filter(pl.col("impression_id").is_not_null())
        .group_by("impression_id", "article_id")
        .agg(
            *[pl.col(a).fill_null(False).any() for a in ACTIONS],
            pl.col("dwell_seconds").fill_null(0.0).sum(),
        )
    )
    joined = imp.select("impression_id", "article_id").join(
        labels_df, on=["impression_id", "article_id"], how="left", maintain_order="left"
    )
    labels = np.stack([joined[a].fill_null(False).to_numpy() for a in ACTIONS], axis=1).astype(bool)
    dwell = np.log1p(joined["dwell_seconds"].fill_null(0.0).to_numpy().clip(0)).astype(np.float32)

    flags = _follow_flags(
        pl.DataFrame(
            {
                "row": np.arange(n),
                "user_id": user,
                "author_id": catalog.author_id[item],
                "topic": catalog.topic[item].astype(np.int64),
                "time_us": time_us,
            }
        ),
        follows,
        topic_follows,
    )

    def scatter(values: np.ndarray, fill: float | int, dtype: type) -> np.ndarray:
        out = np.full((n_groups, c) + values.shape[1:], fill, dtype=dtype)
        out[group, slot] = values
        return out

    g_time = time_us[g_first]
    hist_time = g_time if history_until is None else np.minimum(g_time, to_micros(history_until))
    run_len_g = np.diff(np.r_[g_first, n])
    return RankerData(
        group_impression=imp_id[g_first],
        group_user=user[g_first],
        group_time_us=g_time,
        group_logged=np.full(n_groups, 1 if logged else 0, dtype=np.int8),
        history=log.history(user[g_first], hist_time, cfg),
        cand_article=scatter(imp["article_id"].to_numpy(), -1, np.int64),
        cand_item=scatter(item, 0, np.int32),
        cand_age=scatter(age_bucket(time_us - catalog.published_us[item]), 0, np.int16),
        cand_in_network=scatter(flags["in_network"].to_numpy(), 0, np.int8),
        cand_topic_follow=scatter(flags["topic_follow"].to_numpy(), 0, np.int8),
        cand_profile=scatter(
            engagement_profile(log, catalog, user, item, np.repeat(hist_time, run_len_g)),
            0.0,
            np.float32,
        ),
        cand_peer=scatter(
            peers(user, imp["article_id"].to_numpy(), time_us)
            if peers is not None
            else np.zeros((n, N_PEER_FEATURES), np.float32),
            0.0,
            np.float32,
        ),
        cand_position=scatter(imp["position"].fill_null(0).to_numpy(), -1, np.int32),
        labels=scatter(labels, False, bool),
        dwell=scatter(dwell, 0.0, np.float32),
    )


def sampled_slates(
    log: EngagementLog,
    catalog: ItemCatalog,
    start: datetime | None,
    end: datetime | None,
    n_groups: int,
    negatives: int,
    popularity_alpha: float,
    window: timedelta | None,
    seed: int = 0,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Groups of one positive engagement and `negatives` sampled posts: (impression rows,
    their label rows), ready for `build_ranker_data(..., logged=False)`.

    Positives are engagements with a positive action in [start, end), `n_groups` of them
    drawn at random (all when fewer). Negatives are posts published before the engagement
    (and within `window` of it, when the source has a candidate window), drawn with
    probability proportional to (positives + 1) ** popularity_alpha: popular posts are
    negatives often enough that popularity alone does not separate the classes, as logged
    slates (full of popular posts) do not let it either. Impression ids are negative, so
    they never collide with logged ones.
    """
    rng = np.random.default_rng(seed)
    pos = log.positive()
    if start is not None:
        pos &= log.time_us >= to_micros(start)
    if end is not None:
        pos &= log.time_us < to_micros(end)
    # Popularity of every catalog row among the positives of the period.
    counts = np.bincount(log.item[pos], minlength=len(catalog) + 1).astype(np.float64)
    rows = np.flatnonzero(pos)
    if len(rows) > n_groups:
        rows = np.sort(rng.choice(rows, size=n_groups, replace=False))
    t = log.time_us[rows]
    # Catalog rows by publish time, with cumulative sampling weights over that order.
    by_pub = np.argsort(catalog.published_us[1:], kind="stable") + 1
    pub = catalog.published_us[by_pub]
    weights = (counts[by_pub] + 1.0) ** popularity_alpha
    cum = np.concatenate([[0.0], np.cumsum(weights)])
    hi = np.searchsorted(pub, t, side="left")  # published strictly before the engagement
    lo = (
        np.zeros_like(hi)
        if window is None
        else np.searchsorted(pub, t - int(window.total_seconds() * 1e6), side="left")
    )
    ok = hi - lo >= 2
    rows, t, lo, hi = rows[ok], t[ok], lo[ok], hi[ok]
    g = len(rows)
    u = cum[lo][:, None] + rng.random((g, negatives)) * (cum[hi] - cum[lo])[:, None]
    k = (np.searchsorted(cum, u, side="right") - 1).clip(lo[:, None], hi[:, None] - 1)
    neg = by_pub[k]
    # A draw of the positive itself becomes its neighbour in publish order.
    same = neg == log.item[rows][:, None]
    neighbour = np.where(k + 1 < hi[:, None], k + 1, k - 1)
    neg = np.where(same, by_pub[neighbour], neg)
    imp_id = -(np.arange(g, dtype=np.int64) + 1)
    items = np.concatenate([log.item[rows][:, None], neg], axis=1)
    aid = catalog.article_ids[items - 1]
    impressions = pl.DataFrame(
        {
            "impression_id": np.repeat(imp_id, negatives + 1),
            "user_id": np.repeat(log.user[rows], negatives + 1),
            "article_id": aid.reshape(-1),
            "position": np.tile(np.arange(negatives + 1, dtype=np.int32), g),
            "shown_at": np.repeat(t, negatives + 1),
        }
    ).with_columns(pl.col("shown_at").cast(pl.Datetime("us")))
    # Two draws of the same negative in one group would be one candidate twice.
    impressions = impressions.unique(["impression_id", "article_id"], maintain_order=True)
    bits = log.actions[rows]
    labels = pl.DataFrame(
        {
            "impression_id": imp_id,
            "article_id": aid[:, 0],
            **{a: (bits >> i) & 1 == 1 for i, a in enumerate(ACTIONS)},
            "dwell_seconds": np.expm1(log.dwell[rows]),
        }
    )
    return impressions, labels


def serving_impressions(candidates: pl.DataFrame, now: datetime) -> pl.DataFrame:
    """Impression rows for serving: each user's candidates form one slate shown at `now`.

    `candidates` has (user_id, article_id); row order inside a user is kept as the position.
    The impression id is the user id, so scores map back to users directly.
    """
    return candidates.select(
        pl.col("user_id").cast(pl.Int64), pl.col("article_id").cast(pl.Int64)
    ).with_columns(
        pl.col("user_id").alias("impression_id"),
        pl.int_range(pl.len()).over("user_id").cast(pl.Int32).alias("position"),
        pl.lit(now).cast(pl.Datetime("us")).alias("shown_at"),
    )


def build_serving_data(
    candidates: pl.DataFrame,
    now: datetime,
    engagements: pl.DataFrame,
    follows: pl.DataFrame,
    topic_follows: pl.DataFrame,
    catalog: ItemCatalog,
    cfg: FeatureConfig,
    log: EngagementLog | None = None,
    peers: PeerScores | None = None,
) -> RankerData:
    """Ranker inputs for (user_id, article_id) candidate rows scored at time `now`.

    The same tensors training uses: histories and follows strictly before `now`; the labels
    are whatever engagements exist for impression id = user id (normally none) and unused.
    """
    no_labels = engagements.clear()
    return build_ranker_data(
        serving_impressions(candidates, now),
        no_labels,
        follows,
        topic_follows,
        catalog,
        cfg,
        log=log if log is not None else EngagementLog.build(engagements, catalog),
        peers=peers,
    )


def user_histories(
    user_ids: np.ndarray,
    now: datetime,
    engagements: pl.DataFrame,
    catalog: ItemCatalog,
    cfg: FeatureConfig,
    log: EngagementLog | None = None,
) -> History:
    """Serving-time histories of users at `now` (the two-tower user tower's input)."""
    log = log if log is not None else EngagementLog.build(engagements, catalog)
    users = np.asarray(user_ids, dtype=np.int64)
    return log.history(users, np.full(len(users), to_micros(now), np.int64), cfg)


@dataclass(frozen=True)
class RetrievalExamples:
    """Positive (history, engaged item) pairs for the two-tower model."""

    user: np.ndarray  # int64 [P]
    time_us: np.ndarray  # int64 [P], the engagement time; the history is taken before it
    item: np.ndarray  # int32 [P] catalog rows
    history: History  # [P, H]

    def __len__(self) -> int:
        return len(self.user)

    def take(self, idx: np.ndarray) -> RetrievalExamples:
        return replace(
            self,
            user=self.user[idx],
            time_us=self.time_us[idx],
            item=self.item[idx],
            history=self.history.take(idx),
        )


def positive_mask(engagements: pl.DataFrame, actions: tuple[str, ...]) -> pl.Expr:
    present = [a for a in actions if a in engagements.columns]
    return pl.any_horizontal([pl.col(a).fill_null(False) for a in present])


def build_retrieval_examples(
    engagements: pl.DataFrame,
    catalog: ItemCatalog,
    cfg: FeatureConfig,
    start: datetime | None = None,
    end: datetime | None = None,
    log: EngagementLog | None = None,
    positive_actions: tuple[str, ...] = POSITIVE_ACTIONS,
    max_examples: int | None = None,
    seed: int = 0,
) -> RetrievalExamples:
    """Positives = engagements with a positive action and engaged_at in [start, end), each
    with the user's history strictly before it: what retrieval would have had to find.

    Engagements outside any logged slate count too (EBNeRD's reading history is most of its
    positives); a repeat of the same (user, article) counts once, at its first time. With
    `max_examples`, a seeded uniform sample of that many positives (in time order) is kept
    before any history is gathered.
    """
    log = log if log is not None else EngagementLog.build(engagements, catalog)
    rows = engagements.filter(positive_mask(engagements, positive_actions))
    if start is not None:
        rows = rows.filter(pl.col("engaged_at") >= start)
    if end is not None:
        rows = rows.filter(pl.col("engaged_at") < end)
    rows = (
        rows.group_by("user_id", "article_id")
        .agg(pl.col("engaged_at").min())
        .sort(["engaged_at", "user_id", "article_id"])
    )
    users = rows["user_id"].to_numpy().astype(np.int64)
    times = _micros(rows["engaged_at"])
    items = catalog.rows(rows["article_id"].to_numpy(), "engagements.article_id")
    # An engagement with a post before it was published is a source error, not a positive.
    ok = catalog.published_us[items] <= times
    users, times, items = users[ok], times[ok], items[ok]
    if max_examples is not None and len(users) > max_examples:
        keep = np.sort(np.random.default_rng(seed).choice(len(users), max_examples, replace=False))
        users, times, items = users[keep], times[keep], items[keep]
    return RetrievalExamples(
        user=users,
        time_us=times,
        item=items,
        history=log.history(users, times, cfg),
    )


@dataclass(frozen=True)
class Split:
    """Temporal split of a world's impressions: train < valid_start <= valid < heldout."""

    train: pl.DataFrame
    valid: pl.DataFrame
    heldout: pl.DataFrame


def temporal_split(
    impressions: pl.DataFrame, valid_fraction: float = 0.1, valid_start: datetime | None = None
) -> Split:
    """Held-out impressions (is_heldout) are the test set; the last `valid_fraction` of the
    remaining time span is the validation set used for early stopping (from `valid_start`
    when given: a sample of the impressions is split where the whole log was).

    Whole impressions go to one side: the cut is on impression time, and all rows of an
    impression share one shown_at.
    """
    held = impressions.filter(pl.col("is_heldout"))
    rest = impressions.filter(~pl.col("is_heldout"))
    if rest.height == 0 or (valid_fraction <= 0 and valid_start is None):
        return Split(rest, rest.clear(), held)
    t0, t1 = rest["shown_at"].min(), rest["shown_at"].max()
    cut = valid_start if valid_start is not None else t0 + (t1 - t0) * (1.0 - valid_fraction)
    return Split(
        rest.filter(pl.col("shown_at") < cut), rest.filter(pl.col("shown_at") >= cut), held
    )
