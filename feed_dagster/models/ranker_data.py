"""Ranker inputs: candidate groups of impressions with their labels, follow flags and the
long-term engagement profile.

One code path serves training, evaluation and serving: an impression is a (user, time,
candidates) triple, and at serving time the "impression" is (user, now, retrieved
candidates). Every feature of an impression is computed from rows timestamped strictly before
its time, so training inputs look exactly like serving inputs.

Everything is vectorised: polars joins for labels and flags, numpy scatter for padding. No
Python loop per impression.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from feed_dagster.data.schema import ACTIONS
from feed_dagster.models.catalog import (
    AUTHOR_TOPICS,
    US_PER_HOUR,
    FeatureConfig,
    ItemCatalog,
    _micros,
    age_bucket,
    to_micros,
)
from feed_dagster.models.counts import DistinctQueries, pair_key
from feed_dagster.models.engagement_log import EngagementLog, History

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
# "Recent" in log_post_recent: a post's engagement in the hours before the impression.
POST_RECENT_US = 6 * US_PER_HOUR


# Classic-peer inputs per candidate: ALS, item-kNN, EASE, all-time popularity, "present" flag
# (computed by models.peers.PeerFeatures, which must produce this many columns).
N_PEER_FEATURES = 8
# (user ids, article ids, impression times in us) -> float32 [n, N_PEER_FEATURES]
PeerScores = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


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
    user = np.asarray(user, dtype=np.int64)
    time_us = np.broadcast_to(np.asarray(time_us, dtype=np.int64), user.shape)
    topic, author = catalog.topic[item].astype(np.int64), catalog.author_id[item]
    user_topic = DistinctQueries(pair_key(user, topic), time_us)
    user_author = DistinctQueries(pair_key(user, author), time_us)
    users, posts = DistinctQueries(user, time_us), DistinctQueries(item, time_us)
    n_topic = user_topic.of(log.positive_topic.before_keys)
    n_author = user_author.of(log.positive_author.before_keys)
    n_total = users.of(lambda u, t: log.positive_total.before(u, np.zeros_like(u), t))
    # Everyone's engagement with the post so far: a fresh post's only quality signal before
    # its id is trained.
    n_post = posts.of(log.positives_before)
    n_post_recent = n_post - posts.of(lambda p, t: log.positives_before(p, t - POST_RECENT_US))
    shown_topic = shown_author = shown_post = np.zeros(len(user), dtype=np.float32)
    if log.exposures is not None:
        log.exposures.require(user)
        shown_topic = user_topic.of(log.shown_topic.before_keys)
        shown_author = user_author.of(log.shown_author.before_keys)
        shown_post = posts.of(log.exposures.shown_before)
    by_post = posts.of(lambda p, t: np.stack(log.author_counts(p, t), axis=1))
    author_engaged, author_shown = by_post[:, 0], by_post[:, 1]
    # The user's share of engagement on each of the author's main topics, weighted by how
    # much of the author's output the topic is.
    rows = catalog.author_row[item]
    topic_affinity = np.zeros(len(user), dtype=np.float32)
    for k in range(AUTHOR_TOPICS):
        t = catalog.author_topics[rows, k]
        n_k = DistinctQueries(pair_key(user, t), time_us).of(log.positive_topic.before_keys)
        topic_affinity += catalog.author_topic_share[rows, k] * n_k / (n_total + 1.0)
    # Unknown topics/authors (EBNeRD has no authors) carry no evidence: zero, not a match.
    known_topic, known_author = topic >= 0, author >= 0
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

    # Only the engagements of these slates' rows: grouping every engagement first held
    # 3.6 GB at 100k users (20.8M rows) for 6k validation slates.
    labels_df = (
        engagements.lazy()
        .select("impression_id", "article_id", *ACTIONS, "dwell_seconds")
        .join(
            imp.lazy().select("impression_id", "article_id").unique(),
            on=["impression_id", "article_id"],
            how="semi",
        )
        .group_by("impression_id", "article_id")
        .agg(
            *[pl.col(a).fill_null(False).any() for a in ACTIONS],
            pl.col("dwell_seconds").fill_null(0.0).sum(),
        )
        .collect()
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
    scope = log.exposures.users if log.exposures is not None else None
    if scope is not None:
        # Exposure counts were built for some users only (the training sample's): the
        # groups come from theirs, whose profile counts are complete.
        rows = rows[np.isin(log.user[rows], scope)]
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
