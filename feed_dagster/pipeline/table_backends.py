"""Table-only retriever and scorer: deterministic baselines and stand-ins for the models.

Neither learns anything. They use the user's engagement history (which topics and authors
they engaged with), whether the author is followed, post popularity and age, so the
pipeline runs end to end, and is tested, without trained models. Read their output as a
sensible baseline, not as calibrated predictions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import polars as pl

from feed_dagster.data.schema import ACTIONS, POSITIVE_ACTIONS, World
from feed_dagster.data.warehouse import IMPRESSION_TOTALS
from feed_dagster.pipeline.protocols import RETRIEVED_SCHEMA
from feed_dagster.pipeline.query import Query
from feed_dagster.pipeline.tables import (
    Tables,
    as_tables,
    excluded_pairs,
    naive_utc,
    published_between,
    table,
)
from feed_dagster.sorted_search import unique

NEGATIVE_ACTIONS: tuple[str, ...] = tuple(a for a in ACTIONS if a not in POSITIVE_ACTIONS)
NULL_TOPIC = -1  # stand-in key so posts without a topic still get a (prior) affinity


def positive_engagements(engagements: pl.DataFrame, now: datetime) -> pl.DataFrame:
    """Engagements before `now` with at least one positive action and no negative one."""
    pos = pl.any_horizontal([pl.col(a) for a in POSITIVE_ACTIONS])
    neg = pl.any_horizontal([pl.col(a) for a in NEGATIVE_ACTIONS])
    return engagements.filter((pl.col("engaged_at") < now) & pos & ~neg)


def topic_prior(pos: pl.DataFrame, articles: pl.DataFrame) -> pl.DataFrame:
    """Share of positive engagements per topic (add-one smoothed): frame(topic, prior)."""
    topics = articles.select(pl.col("topic").fill_null(NULL_TOPIC)).unique()
    counts = (
        pos.join(articles.select("article_id", "topic"), on="article_id")
        .select(pl.col("topic").fill_null(NULL_TOPIC))
        .group_by("topic")
        .len()
    )
    out = topics.join(counts, on="topic", how="left").with_columns(pl.col("len").fill_null(0) + 1)
    return out.select("topic", (pl.col("len") / pl.col("len").sum()).alias("prior")).sort("topic")


def topic_shares(
    pos: pl.DataFrame, articles: pl.DataFrame, prior: pl.DataFrame, smoothing: float
) -> pl.DataFrame:
    """Per (user, topic) share of the user's positive engagements, shrunk towards the prior:
    (n(u, t) + smoothing * prior(t)) / (n(u) + smoothing). Only pairs with n(u, t) > 0; any
    other pair's share is smoothing * prior(t) / (n(u) + smoothing)."""
    counts = (
        pos.join(articles.select("article_id", "topic"), on="article_id")
        .with_columns(pl.col("topic").fill_null(NULL_TOPIC))
        .group_by("user_id", "topic")
        .len("n")
    )
    totals = counts.group_by("user_id").agg(pl.col("n").sum().alias("n_user"))
    return (
        counts.join(totals, on="user_id")
        .join(prior, on="topic")
        .select(
            "user_id",
            "topic",
            ((pl.col("n") + smoothing * pl.col("prior")) / (pl.col("n_user") + smoothing)).alias(
                "share"
            ),
        )
    )


@dataclass(frozen=True)
class GlobalStats:
    """What the fallbacks derive from all users' engagements before `now`."""

    prior: pl.DataFrame  # topic, prior
    popularity: pl.DataFrame  # article_id, n: positive engagements with the post


def global_stats(articles: pl.DataFrame, engagements: pl.DataFrame, now: datetime) -> GlobalStats:
    pos = positive_engagements(engagements, now)
    return GlobalStats(topic_prior(pos, articles), pos.group_by("article_id").len("n"))


def _top_k_lowest_index_on_ties(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, the column indices of the k highest scores, ascending; among scores tied at
    the k-th place, the lowest indices. np.argpartition alone picks any of the tied ones,
    and which depends on the CPU's SIMD path (AVX-512 or not): the same data retrieved
    different posts on two machines."""
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
    better = scores > kth
    tied = scores == kth
    room = k - better.sum(axis=1, keepdims=True)
    take = better | (tied & (np.cumsum(tied, axis=1) <= room))
    return np.nonzero(take)[1].reshape(len(scores), k)


@dataclass
class PopularityRetriever:
    """Fallback out-of-network retrieval: recent posts ranked by topic-weighted popularity.

    score(u, p) = share(u, topic(p)) * log(2 + positive engagements with p before now),
    with share the user's smoothed topic share (see `topic_shares`). Users without history
    get the global topic prior, i.e. plain popularity. Scores are computed as a dense
    (users x recent posts) numpy matrix in chunks of users, which is exact and fast while
    recent posts number in the tens of thousands. Without an age limit
    (`published_after=None`) every post up to `now` is scored, in more, smaller chunks.
    """

    articles: pl.DataFrame
    engagements: pl.DataFrame
    smoothing: float = 5.0
    max_cells: int = 8_000_000  # matrix cells per chunk of users
    name: str = "popularity"
    # Per-`now` global statistics: every shard of a run shares them, so compute them once.
    _stats: dict[datetime, GlobalStats] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def stats(self, now: datetime) -> GlobalStats:
        if now not in self._stats:
            self._stats[now] = global_stats(self.articles, self.engagements, now)
        return self._stats[now]

    @classmethod
    def from_tables(cls, source: World | Tables, **kwargs: object) -> PopularityRetriever:
        tables = as_tables(source)
        return cls(table(tables, "articles"), table(tables, "engagements"), **kwargs)  # type: ignore[arg-type]

    def retrieve(
        self,
        user_ids: np.ndarray,
        now: datetime,
        k: int,
        *,
        published_after: datetime | None,
        exclude: pl.DataFrame | None = None,
        exclude_authors: pl.DataFrame | None = None,
    ) -> pl.DataFrame:
        now = naive_utc(now)
        after = None if published_after is None else naive_utc(published_after)
        users = unique(np.asarray(user_ids, dtype=np.int64))
        recent = self.articles.filter(published_between(after, now)).sort("article_id")
        if users.size == 0 or recent.is_empty() or k <= 0:
            return pl.DataFrame(schema=RETRIEVED_SCHEMA)

        pos = positive_engagements(self.engagements, now).join(
            pl.DataFrame({"user_id": users}), on="user_id", how="semi"
        )
        stats = self.stats(now)
        prior = stats.prior
        topics = prior["topic"].to_numpy()
        shares = topic_shares(pos, self.articles, prior, self.smoothing)

        # Dense user x topic affinity: the prior-only share, overwritten where there is data.
        n_user = (
            pos.group_by("user_id")
            .len("n")
            .join(pl.DataFrame({"user_id": users}), on="user_id", how="right")
        )
        n_user = n_user.sort("user_id")["n"].fill_null(0).to_numpy().astype(np.float64)
        aff = (self.smoothing / (n_user + self.smoothing))[:, None] * prior["prior"].to_numpy()[
            None, :
        ]
        if shares.height:
            ui = np.searchsorted(users, shares["user_id"].to_numpy())
            ti = np.searchsorted(topics, shares["topic"].to_numpy())
            aff[ui, ti] = shares["share"].to_numpy()

        popularity = (
            recent.select("article_id")
            .join(stats.popularity, on="article_id", how="left")
            .sort("article_id")["n"]
            .fill_null(0)
            .to_numpy()
        )
        post_value = np.log(2.0 + popularity)
        post_ids = recent["article_id"].to_numpy()
        post_topic = np.searchsorted(topics, recent["topic"].fill_null(NULL_TOPIC).to_numpy())

        blocked_cells = self._excluded_cells(users, post_ids, recent, exclude, exclude_authors)
        k = min(k, len(post_ids))
        chunk = max(1, self.max_cells // len(post_ids))
        parts = []
        for lo in range(0, len(users), chunk):
            hi = min(len(users), lo + chunk)
            scores = aff[lo:hi][:, post_topic] * post_value[None, :]
            sel = (blocked_cells[0] >= lo) & (blocked_cells[0] < hi)
            scores[blocked_cells[0][sel] - lo, blocked_cells[1][sel]] = -np.inf
            if k < len(post_ids):
                top = _top_k_lowest_index_on_ties(scores, k)
            else:
                top = np.broadcast_to(np.arange(len(post_ids)), (hi - lo, len(post_ids)))
            # Best first within each user, ties by article id, as the source wants them.
            top_scores = np.take_along_axis(scores, top, axis=1)
            order = np.argsort(-top_scores, axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            top_scores = np.take_along_axis(top_scores, order, axis=1)
            keep = np.isfinite(top_scores)
            rows = np.broadcast_to(np.arange(lo, hi)[:, None], top.shape)[keep]
            parts.append(
                pl.DataFrame(
                    {
                        "user_id": users[rows],
                        "article_id": post_ids[top[keep]],
                        "retrieval_score": top_scores[keep].astype(np.float64),
                    }
                )
            )
        return pl.concat(parts) if parts else pl.DataFrame(schema=RETRIEVED_SCHEMA)

    @staticmethod
    def _excluded_cells(
        users: np.ndarray,
        post_ids: np.ndarray,
        recent: pl.DataFrame,
        exclude: pl.DataFrame | None,
        exclude_authors: pl.DataFrame | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(user index, post index) of every excluded (user, recent post) pair."""
        cells = excluded_pairs(exclude, exclude_authors, recent).join(
            pl.DataFrame({"user_id": users}), on="user_id", how="semi"
        )
        return (
            np.searchsorted(users, cells["user_id"].to_numpy()),
            np.searchsorted(post_ids, cells["article_id"].to_numpy()),
        )


@dataclass
class TopicAffinityScorer:
    """Fallback ranker from the tables: base action rates scaled by topic match, follow,
    author affinity, popularity and age.

    For action a with base rate r_a (share of impressions before now with that action):
      match   = lift / (1 + lift), lift = share(u, topic) / prior(topic)   (0.5 = average)
      p_a     = r_a * 2 * match * follow * author * popularity * freshness   (positive a)
      p_a     = r_a * 2 * (1 - match)                                      (negative a)
      follow  = follow_boost for in-network rows, else 1
      author  = 1 + n(u, author) / (n(u, author) + 2)     (past positive engagements)
      popularity = 1 + popularity_weight * log1p(positive engagements with the post)
                   / mean of that log over all posts published before now
      freshness  = 0.5 ** (age_hours / half_life_hours)
      dwell_seconds = p_click * mean dwell of past clicks
    all clipped to [0, 1]. The history comes from the query (the newest history_max
    engagements); base rates and popularity from the tables before `now`.
    """

    articles: pl.DataFrame
    engagements: pl.DataFrame
    impressions: pl.DataFrame
    impression_totals: pl.DataFrame | None = None  # data.warehouse.IMPRESSION_TOTALS
    smoothing: float = 5.0
    follow_boost: float = 1.5
    popularity_weight: float = 0.25
    half_life_hours: float = 36.0
    default_dwell_seconds: float = 30.0
    name: str = "topic_affinity"
    # Per-`now` statistics shared by every shard of a run.
    _cache: dict[datetime, tuple[GlobalStats, dict[str, float], float, float]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def stats(self, now: datetime) -> tuple[GlobalStats, dict[str, float], float, float]:
        """(global stats, base rates, popularity scale, mean dwell) at `now`, cached."""
        if now not in self._cache:
            self._cache[now] = (
                global_stats(self.articles, self.engagements, now),
                self.base_rates(now),
                self.popularity_scale(now),
                self.mean_dwell(now),
            )
        return self._cache[now]

    @classmethod
    def from_tables(cls, source: World | Tables, **kwargs: object) -> TopicAffinityScorer:
        tables = as_tables(source)
        return cls(
            table(tables, "articles"),
            table(tables, "engagements"),
            table(tables, "impressions"),
            tables.get(IMPRESSION_TOTALS),
            **kwargs,  # type: ignore[arg-type]
        )

    def base_rates(self, now: datetime) -> dict[str, float]:
        """Share of impressions before `now` with each action (engagements if none logged)."""
        eng = self.engagements.filter(pl.col("engaged_at") < now)
        n_imp = self.impressions_before(now) or eng.height or 1
        sums = eng.select([pl.col(a).sum() for a in ACTIONS]).row(0)
        return {a: min(1.0, float(s or 0) / n_imp) for a, s in zip(ACTIONS, sums, strict=True)}

    def impressions_before(self, now: datetime) -> int:
        """Impressions anyone was shown before `now`: from the totals a feed shard reads in
        place of the whole log (its `impressions` are its own users'), else counted."""
        totals = self.impression_totals
        if totals is not None and totals.height and totals["now"][0] == now:
            return int(totals["shown"][0])
        return self.impressions.filter(pl.col("shown_at") < now).height

    def mean_dwell(self, now: datetime) -> float:
        clicks = self.engagements.filter(
            (pl.col("engaged_at") < now) & pl.col("click") & (pl.col("dwell_seconds") > 0)
        )
        value = clicks["dwell_seconds"].mean() if clicks.height else None
        return float(value) if value is not None else self.default_dwell_seconds  # type: ignore[arg-type]

    def popularity_scale(self, now: datetime) -> float:
        """Mean log1p(positive engagements) over posts published before now (1 if none).

        A property of the tables and `now`, not of the batch: a user's scores must not
        depend on which other users share their shard.
        """
        published = self.articles.filter(pl.col("published_at") <= now).select("article_id")
        counts = positive_engagements(self.engagements, now).group_by("article_id").len("n")
        logs = published.join(counts, on="article_id", how="left").select(
            pl.col("n").fill_null(0).cast(pl.Float64).log1p().mean()
        )
        value = logs.item()
        return float(value) if value else 1.0

    def score(self, candidates: pl.DataFrame, context: Query) -> pl.DataFrame:
        now = context.now
        stats, rates, scale, dwell = self.stats(now)
        prior = stats.prior
        history = positive_engagements(context.history, now)
        shares = topic_shares(history, self.articles, prior, self.smoothing)
        n_user = history.group_by("user_id").len("n_user")
        by_author = (
            history.join(self.articles.select("article_id", "author_id"), on="article_id")
            .filter(pl.col("author_id").is_not_null())
            .group_by("user_id", "author_id")
            .len("n_author")
        )
        popularity = stats.popularity.rename({"n": "n_pop"})

        c = candidates.select(
            "user_id", "article_id", "author_id", "in_network", "published_at", "topic"
        )
        c = (
            c.with_columns(pl.col("topic").fill_null(NULL_TOPIC))
            .join(prior, on="topic", how="left", maintain_order="left")
            .join(shares, on=["user_id", "topic"], how="left", maintain_order="left")
            .join(n_user, on="user_id", how="left", maintain_order="left")
            .join(by_author, on=["user_id", "author_id"], how="left", maintain_order="left")
            .join(popularity, on="article_id", how="left", maintain_order="left")
        )
        prior_col = pl.col("prior").fill_null(pl.col("prior").mean()).fill_null(1.0)
        share = pl.col("share").fill_null(
            self.smoothing * prior_col / (pl.col("n_user").fill_null(0) + self.smoothing)
        )
        lift = share / prior_col
        match = lift / (1.0 + lift)
        n_author = pl.col("n_author").fill_null(0).cast(pl.Float64)
        log_pop = pl.col("n_pop").fill_null(0).cast(pl.Float64).log1p()
        popularity_f = 1.0 + self.popularity_weight * log_pop / scale
        age_h = (pl.lit(now) - pl.col("published_at")).dt.total_seconds() / 3600.0
        freshness = pl.lit(0.5).pow(age_h.clip(0.0, None) / self.half_life_hours)
        follow = pl.when(pl.col("in_network")).then(self.follow_boost).otherwise(1.0)
        author = 1.0 + n_author / (n_author + 2.0)
        # Two shared factors as columns first, so the ten probabilities reuse them
        # instead of each re-evaluating the whole expression.
        c = c.select(
            "user_id",
            "article_id",
            (2.0 * match * follow * author * popularity_f * freshness).alias("_pos"),
            (2.0 * (1.0 - match)).alias("_neg"),
        )
        probs = [
            (rates[a] * pl.col("_pos" if a in POSITIVE_ACTIONS else "_neg"))
            .clip(0.0, 1.0)
            .alias(f"p_{a}")
            for a in ACTIONS
        ]
        out = c.select("user_id", "article_id", *probs)
        return out.with_columns(dwell_seconds=pl.col("p_click") * dwell)
