"""Held-out quality of served feeds against the classic feeds, all through one pipeline.

A feed is judged by the recall@k of later positives (`quality.later_positives`): feeds are
built at a cut time from data strictly before it, and a hit is a post in a user's first k
served posts that the user engaged with positively at or after the cut.

Computed beside the pipeline (as `quality.chronological_following_feed` and
`quality.popularity_feed` do), the classic feeds skip its exclusions and can "recall" a
post the user had already seen or engaged with, which a served feed never shows. Here every
feed runs through the same candidate pipeline (same window, filters, selection and served
count); only the sources and the scorer differ:

- each learned feed: the retriever and scorer given (models or table fallbacks);
- chronological following: the in-network source alone, a recency scorer;
- popularity: the in-network source plus the most-engaged recent posts, a popularity scorer.

The classic feeds run with author diversity and the out-of-network factor switched off, as
those adjustments would reorder them away from what their names promise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

import numpy as np
import polars as pl

from feed_dagster.artifacts import Location
from feed_dagster.data.schema import FEED_SCHEMA, POSITIVE_ACTIONS, World
from feed_dagster.data.warehouse import connect_read_only, read_tables
from feed_dagster.feeds.precompute import read_users_tables
from feed_dagster.feeds.quality import later_positives, recall_at_k
from feed_dagster.metrics.classic import positive_rows_sql
from feed_dagster.pipeline.config import PipelineConfig, resolve_window
from feed_dagster.pipeline.protocols import RETRIEVED_SCHEMA, Retriever, Scorer, component_name
from feed_dagster.pipeline.query import Query
from feed_dagster.pipeline.run import run_pipeline
from feed_dagster.pipeline.table_backends import NEGATIVE_ACTIONS, positive_engagements
from feed_dagster.pipeline.tables import (
    Tables,
    as_tables,
    candidate_window,
    excluded_pairs,
    naive_utc,
    published_between,
    run_position,
    table,
    user_frame,
)
from feed_dagster.sorted_search import unique

LEARNED, CHRONOLOGICAL, POPULARITY = "learned", "chronological_following", "popularity"
CLASSIC_FEEDS = (CHRONOLOGICAL, POPULARITY)
DEFAULT_SAMPLE = 1_000
# What read_evaluation_tables adds from the whole tables to the sampled users' rows:
# each post's positive engagements before the cut (article_id, n, now), and how many users
# have a held-out positive (users).
POST_POSITIVES = "post_positives"
HELDOUT_ELIGIBLE = "heldout_eligible"
# Builds a feed's retriever and scorer from the tables as known at the cut, so a model's
# serving context (histories, popularity counts) cannot see anything after it.
FeedFactory = Callable[[Tables], tuple[Retriever, Scorer]]

RESULT_SCHEMA: dict[str, pl.DataType] = {
    "feed": pl.String(),
    "retriever": pl.String(),
    "scorer": pl.String(),
    "k": pl.Int32(),
    "recall_macro": pl.Float64(),
    "recall_micro": pl.Float64(),
    "hits": pl.Int64(),
    "positives": pl.Int64(),
    "users": pl.Int64(),
    "eligible_users": pl.Int64(),
    "posts_per_user": pl.Float64(),
    "seconds": pl.Float64(),
    "cut": pl.Datetime("us"),
}


def tables_before(tables: World | Tables, cut: datetime) -> dict[str, pl.DataFrame]:
    """The tables as known just before `cut`: timestamped rows strictly before it (posts
    published at or before it, as the pipeline's sources allow). Blocks, mutes, muted
    keywords, topic follows and users carry no event time and are kept whole; the hidden
    impression truth is dropped."""
    cut = naive_utc(cut)
    out = {name: df for name, df in as_tables(tables).items() if name != "impression_truth"}
    cuts = {
        "engagements": pl.col("engaged_at") < cut,
        "impressions": pl.col("shown_at") < cut,
        "follows": pl.col("followed_at") < cut,
        "articles": pl.col("published_at") <= cut,
    }
    for name, keep in cuts.items():
        if name in out:
            out[name] = out[name].filter(keep)
    return out


def read_evaluation_tables(
    path: Location, sample_size: int = DEFAULT_SAMPLE, seed: int = 0
) -> tuple[dict[str, pl.DataFrame], np.ndarray, datetime]:
    """(tables, users, cut) for `evaluate_feeds` at the warehouse's held-out start, read as
    a feed shard reads its users' (feeds.precompute.read_users_tables, at the cut): the
    sampled users' own rows of every per-user table (their engagements before and after the
    cut among them) and the posts a feed at the cut can show or look up. From the whole
    tables only what every user shares, computed in the warehouse: who has a held-out
    positive (the sample's pool and HELDOUT_ELIGIBLE), each post's positive engagements
    before the cut (POST_POSITIVES, the popularity feed's) and the impressions before it.
    At 1M users the whole tables would be 165M engagement rows and 10M posts. `users` is
    the sample `evaluate_feeds` would draw itself from the whole tables."""
    small = read_tables(path, ["users", "world_info"])
    info = small["world_info"]
    cut = naive_utc(info["heldout_start"][0])
    eligible, counts = _shared_at_cut(path, cut)
    users = sample_users(eligible, sample_size, seed)
    window = resolve_window(candidate_window(small))
    tables = read_users_tables(path, users, cut, window, totals_at=cut)
    tables[POST_POSITIVES] = counts
    tables[HELDOUT_ELIGIBLE] = pl.DataFrame(
        {"users": [eligible.height]}, schema={"users": pl.Int64}
    )
    return tables, users, cut


def _shared_at_cut(path: Location, cut: datetime) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(user_id of every user with a later positive, as `later_positives` finds them;
    article_id, n, now: positive engagements before the cut per post published by then, as
    `positive_engagements` counts them), from the whole tables in the warehouse."""
    con = connect_read_only(path)
    try:
        columns = {r[0] for r in con.execute("describe main.engagements").fetchall()}
        positive = positive_rows_sql(columns) or "false"
        eligible = con.execute(
            "select distinct e.user_id::bigint as user_id from main.engagements e "
            "join main.articles a using (article_id) "
            f"where e.engaged_at >= $cut and a.published_at < $cut and ({positive}) "
            "order by user_id",
            {"cut": cut},
        ).pl()
        # Three-valued, as polars' any_horizontal: a null action with no true one drops the row.
        pos = " or ".join(f'"{a}"' for a in POSITIVE_ACTIONS)
        neg = " or ".join(f'"{a}"' for a in NEGATIVE_ACTIONS) or "false"
        counts = con.execute(
            "select e.article_id, count(*)::bigint as n, $cut::timestamp as now "
            "from main.engagements e join main.articles a using (article_id) "
            f"where e.engaged_at < $cut and a.published_at <= $cut and ({pos}) and not ({neg}) "
            "group by e.article_id order by e.article_id",
            {"cut": cut},
        ).pl()
    finally:
        con.close()
    return eligible, counts


def sample_users(positives: pl.DataFrame, size: int = DEFAULT_SAMPLE, seed: int = 0) -> np.ndarray:
    """A seeded random sample of at most `size` users with a held-out positive, sorted.

    The sample depends only on the set of eligible users, the size and the seed, so two
    runs over the same data evaluate the same users.
    """
    if size < 1:
        raise ValueError(f"sample size must be >= 1, got {size}")
    eligible = unique(positives["user_id"].cast(pl.Int64).to_numpy())
    if len(eligible) <= size:
        return eligible
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(eligible, size=size, replace=False))


def _probabilities(candidates: pl.DataFrame, key: pl.Expr) -> pl.DataFrame:
    """Scorer output whose weighted score orders rows by `key` (a value in [0, 1]): the
    click probability carries it and every other action is 0, so no negative weight can
    reorder it."""
    return candidates.select("user_id", "article_id", key.clip(0.0, 1.0).alias("p_click"))


def _freshness(now: datetime, scale_hours: float) -> pl.Expr:
    """scale / (scale + age) in (0, 1], strictly decreasing with age. Hyperbolic rather than
    exponential so it never underflows: the scorer's probabilities are float32, and without
    an age limit (catalogs) posts can be years old; float32 still tells apart ages a minute
    apart at ten years."""
    age_h = (pl.lit(now) - pl.col("published_at")).dt.total_seconds() / 3600.0
    return scale_hours / (scale_hours + age_h.clip(0.0, None))


@dataclass
class RecencyScorer:
    """Newest first: the score falls with the post's age at `now`."""

    scale_hours: float = 24.0
    name: str = "recency"

    def score(self, candidates: pl.DataFrame, context: Query) -> pl.DataFrame:
        return _probabilities(candidates, _freshness(context.now, self.scale_hours))


def _popularity(
    articles: pl.DataFrame,
    engagements: pl.DataFrame,
    now: datetime,
    counts: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """(article_id, author_id, published_at, n): posts published at or before `now` with
    their positive engagements before it; from `counts` (POST_POSITIVES) when given, which
    must be at `now`."""
    if counts is None:
        counts = positive_engagements(engagements, now).group_by("article_id").len("n")
    else:
        counts = _counts_at(counts, now)
    return (
        articles.filter(pl.col("published_at") <= now)
        .select("article_id", "author_id", "published_at")
        .join(counts.select("article_id", "n"), on="article_id", how="left")
        .with_columns(pl.col("n").fill_null(0).cast(pl.Int64))
    )


def _counts_at(counts: pl.DataFrame, now: datetime) -> pl.DataFrame:
    """POST_POSITIVES, checked to be the counts at `now`."""
    at = counts["now"].unique().to_list()
    if at and at != [naive_utc(now)]:
        raise ValueError(f"post positives were counted before {at[0]}, not before {now}")
    return counts


@dataclass
class PopularityScorer:
    """Most positive engagements before `now` first, newer first among equal counts.

    score = (n + freshness / 2) / (n_max + 1), with freshness in (0, 1] and n_max the largest
    count of any post at `now`: a post with one more engagement always ranks higher, and
    the scale is a property of the tables and `now`, never of the batch.
    """

    articles: pl.DataFrame
    engagements: pl.DataFrame
    scale_hours: float = 24.0
    name: str = "popularity"
    counts: pl.DataFrame | None = None  # POST_POSITIVES, when the engagements are some users'
    _cache: dict[datetime, tuple[pl.DataFrame, int]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def from_tables(cls, source: World | Tables, **kwargs: float) -> PopularityScorer:
        counts = as_tables(source).get(POST_POSITIVES)
        return cls(table(source, "articles"), table(source, "engagements"), counts=counts, **kwargs)  # type: ignore[arg-type]

    def counts_at(self, now: datetime) -> tuple[pl.DataFrame, int]:
        if now not in self._cache:
            pop = _popularity(self.articles, self.engagements, now, self.counts)
            # The largest count of any post, read from every post's when the articles are
            # some users' posts only.
            n = pop["n"] if self.counts is None else self.counts["n"]
            self._cache[now] = (pop.select("article_id", "n"), int(n.max() or 0))
        return self._cache[now]

    def score(self, candidates: pl.DataFrame, context: Query) -> pl.DataFrame:
        counts, n_max = self.counts_at(context.now)
        rows = candidates.join(counts, on="article_id", how="left", maintain_order="left")
        key = (pl.col("n").fill_null(0) + 0.5 * _freshness(context.now, self.scale_hours)) / (
            n_max + 1.0
        )
        return _probabilities(rows, key)


@dataclass
class NoRetriever:
    """No out-of-network candidates: the feed is whatever the in-network source finds."""

    name: str = "none"

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
        return pl.DataFrame(schema=RETRIEVED_SCHEMA)


@dataclass
class MostEngagedRetriever:
    """The same global list for everyone: recent posts by positive engagements before
    `now`, newer first among equals; each user's excluded posts and authors are skipped so
    the k returned are usable."""

    articles: pl.DataFrame
    engagements: pl.DataFrame
    name: str = "most_engaged"
    counts: pl.DataFrame | None = None  # POST_POSITIVES, when the engagements are some users'
    _cache: dict[datetime, pl.DataFrame] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def from_tables(cls, source: World | Tables) -> MostEngagedRetriever:
        counts = as_tables(source).get(POST_POSITIVES)
        return cls(table(source, "articles"), table(source, "engagements"), counts=counts)

    def ranked(self, now: datetime) -> pl.DataFrame:
        if now not in self._cache:
            pop = _popularity(self.articles, self.engagements, now, self.counts)
            self._cache[now] = pop.sort(
                ["n", "published_at", "article_id"], descending=[True, True, False]
            )
        return self._cache[now]

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
        users = user_frame(user_ids)
        recent = self.ranked(now).filter(published_between(after, now)).with_row_index("_rank")
        if users.is_empty() or recent.is_empty() or k <= 0:
            return pl.DataFrame(schema=RETRIEVED_SCHEMA)
        excluded = excluded_pairs(exclude, exclude_authors, recent).join(
            users, on="user_id", how="semi"
        )
        # Only the head of the global list can reach anyone's k: k plus the most posts any
        # one user has excluded from it.
        most_excluded = int(excluded.group_by("user_id").len()["len"].max() or 0)
        head = recent.head(k + most_excluded)
        return (
            users.select("user_id")
            .join(head.select("_rank", "article_id", "n"), how="cross")
            .join(excluded, on=["user_id", "article_id"], how="anti")
            .sort("user_id", "_rank")
            .filter(run_position("user_id") < k)
            .select("user_id", "article_id", pl.col("n").cast(pl.Float64).alias("retrieval_score"))
        )


def classic_config(config: PipelineConfig) -> PipelineConfig:
    """`config` with author diversity and the out-of-network factor neutral, so a classic
    feed keeps its own order, and every candidate scored (the out-of-network budget assumes
    in-network posts rank first); sources and selection are unchanged."""
    scoring = replace(config.scoring, author_diversity_floor=1.0, out_of_network_factor=1.0)
    filters = replace(config.filters, out_of_network_scored=None, out_of_network_scored_short=None)
    return replace(config, scoring=scoring, filters=filters)


def classic_feeds() -> dict[str, FeedFactory]:
    """The two classic feeds every learned feed must beat."""
    return {
        CHRONOLOGICAL: lambda known: (NoRetriever(), RecencyScorer()),
        POPULARITY: lambda known: (
            MostEngagedRetriever.from_tables(known),
            PopularityScorer.from_tables(known),
        ),
    }


@dataclass(frozen=True)
class ComparedFeed:
    """One feed built at the cut: its served rows (user_id, position, article_id, ...)."""

    name: str
    retriever: str
    scorer: str
    rows: pl.DataFrame
    seconds: float


def _feed_rows(
    known: Tables,
    users: np.ndarray,
    cut: datetime,
    retriever: Retriever,
    scorer: Scorer,
    config: PipelineConfig,
    batch_size: int,
) -> pl.DataFrame:
    """The served rows of `users`, batch by batch through `run_pipeline`.

    Not `build_feeds`: it refuses a run where most active users got no candidate, which
    guards a publish but would hide a result here; a chronological feed is empty for users
    who follow no one, and that emptiness is what it scores.
    """
    parts = [
        run_pipeline(known, users[i : i + batch_size], cut, retriever, scorer, config)[0]
        for i in range(0, len(users), batch_size)
    ]
    return pl.concat(parts) if parts else pl.DataFrame(schema=FEED_SCHEMA)


def build_compared_feeds(
    tables: World | Tables,
    cut: datetime,
    users: np.ndarray,
    learned: Mapping[str, FeedFactory],
    *,
    config: PipelineConfig | None = None,
    batch_size: int = 512,
) -> list[ComparedFeed]:
    """Each feed of `learned`, then the two classic feeds, for `users` at `cut` from
    `tables_before(tables, cut)`, all through the candidate pipeline with the same window,
    filters, selection and served count (the classic ones with `classic_config`). The
    window is the world's (`candidate_window`) unless `config` says otherwise."""
    cut = naive_utc(cut)
    cfg = config or PipelineConfig().with_max_age(candidate_window(tables))
    clash = set(learned) & set(CLASSIC_FEEDS)
    if clash:
        raise ValueError(f"feed names {sorted(clash)} are reserved for the classic feeds")
    known = tables_before(tables, cut)
    users = unique(np.asarray(users, dtype=np.int64))
    specs = [(name, factory, cfg) for name, factory in learned.items()]
    specs += [(name, factory, classic_config(cfg)) for name, factory in classic_feeds().items()]
    out = []
    for name, factory, feed_cfg in specs:
        t0 = time.perf_counter()
        retriever, scorer = factory(known)
        rows = _feed_rows(known, users, cut, retriever, scorer, feed_cfg, batch_size)
        out.append(
            ComparedFeed(
                name,
                component_name(retriever),
                component_name(scorer),
                rows,
                time.perf_counter() - t0,
            )
        )
    return out


def evaluate_feeds(
    tables: World | Tables,
    cut: datetime,
    learned: Mapping[str, FeedFactory],
    users: np.ndarray | None = None,
    *,
    sample_size: int = DEFAULT_SAMPLE,
    seed: int = 0,
    config: PipelineConfig | None = None,
    batch_size: int = 512,
    progress: Callable[[str], None] | None = None,
) -> pl.DataFrame:
    """Recall@served of each feed in `learned` and of the two classic feeds, built at `cut`.

    `tables` are the full tables: the feeds see only `tables_before(tables, cut)` (each
    factory in `learned` builds its retriever and scorer from those), the positives come
    from everything at or after the cut. `users` defaults to `sample_users(positives,
    sample_size, seed)`. Returns one row per feed (the learned ones first) in RESULT_SCHEMA;
    recall is over the users with a positive, posts_per_user over every evaluated user.
    """
    cut = naive_utc(cut)
    cfg = config or PipelineConfig().with_max_age(candidate_window(tables))
    full = as_tables(tables)
    positives = later_positives(table(full, "engagements"), table(full, "articles"), cut)
    # Tables of some users only (read_evaluation_tables) say how many are eligible in all.
    counted = full.get(HELDOUT_ELIGIBLE)
    eligible = positives["user_id"].n_unique() if counted is None else int(counted["users"][0])
    if users is None:
        users = sample_users(positives, sample_size, seed)
    users = unique(np.asarray(users, dtype=np.int64))
    positives = positives.join(user_frame(users), on="user_id", how="semi")
    k = cfg.selection.served
    feeds = build_compared_feeds(full, cut, users, learned, config=cfg, batch_size=batch_size)
    rows = []
    for feed in feeds:
        r = recall_at_k(feed.rows, positives, k)
        rows.append(
            {
                "feed": feed.name,
                "retriever": feed.retriever,
                "scorer": feed.scorer,
                "k": k,
                "recall_macro": r.macro,
                "recall_micro": r.micro,
                "hits": r.hits,
                "positives": r.positives,
                "users": r.users,
                "eligible_users": eligible,
                "posts_per_user": feed.rows.height / len(users) if len(users) else math.nan,
                "seconds": feed.seconds,
                "cut": cut,
            }
        )
        if progress:
            progress(
                f"{feed.name}: recall@{k} {r.macro:.3f} over {r.users:,} users, "
                f"{feed.seconds:.1f} s"
            )
    return pl.DataFrame(rows, schema=RESULT_SCHEMA)


def beats_classics(result: pl.DataFrame, feed: str) -> bool:
    """Whether `feed`'s macro recall is above that of every other classic feed in `result`."""
    recall = dict(zip(result["feed"], result["recall_macro"], strict=True))
    if feed not in recall:
        raise KeyError(f"no feed {feed!r} in the evaluation (feeds: {sorted(recall)})")
    return all(recall[feed] > recall[c] for c in CLASSIC_FEEDS if c in recall and c != feed)
