"""Non-learned rankers that score canonical impression rows, for comparison with models.

Every baseline sees only what was known strictly before each impression's `shown_at`:
engagements earlier than it, the article's publish time, follows made before it. Each has
the signature `f(impressions, engagements, articles, follows=None) -> impressions + score`
and keeps the input row order.

* random: uniform scores from a seeded generator.
* popularity: positive engagements (favorite, reply, repost, quote, share or click) on the
  article in the trailing window [shown_at - window, shown_at), default 24 h.
* recency: newest first, score = -(age of the article at shown_at in seconds).
* read_time: mean dwell_seconds of the article's earlier engagements (the mean over all
  earlier engagements for an article nobody has read yet).
* chronological_following: articles by authors the user followed before the impression,
  newest first, then all others newest first (the classic following timeline).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from feed_dagster.artifacts import Location
from feed_dagster.data.schema import POSITIVE_ACTIONS, World
from feed_dagster.data.warehouse import connect_read_only, scan_batches
from feed_dagster.metrics.ranking import evaluate_scores
from feed_dagster.sorted_search import unique

SCORE = "score"
# Larger than any age in seconds, so the followed block always outranks the rest.
_FOLLOWED_BONUS = 1e12

Baseline = Callable[..., pl.DataFrame]


def _as_of(
    impressions: pl.DataFrame,
    events: pl.DataFrame,
    at: pl.Expr,
    value_cols: list[str],
    by_article: bool = True,
) -> pl.DataFrame:
    """For each impression row, running totals of events strictly before `at`.

    `events` has t and cumulative value columns, one row per t (and per article_id when
    `by_article`). Returns value_cols aligned with the impression rows, 0 when nothing
    happened before.
    """
    left = impressions.select(
        pl.int_range(pl.len()).alias("_row"), "article_id", at.alias("_at")
    ).sort("_at")
    joined = left.join_asof(
        events.sort("t"),
        left_on="_at",
        right_on="t",
        by="article_id" if by_article else None,
        strategy="backward",
        allow_exact_matches=False,  # strictly before: the impression's own click never counts
        check_sortedness=False,  # both sides are sorted on the time key just above
    )
    return joined.sort("_row").select(pl.col(value_cols).fill_null(0))


def _cumulative(
    events: pl.DataFrame, sums: dict[str, pl.Expr], by_article: bool = True
) -> pl.DataFrame:
    """Cumulative totals of `sums` up to and including each time (per article, or overall)."""
    keys = ["article_id", "t"] if by_article else ["t"]
    return (
        events.group_by(keys)
        .agg(**sums)
        .sort(keys)
        .with_columns(
            pl.col(list(sums)).cum_sum().over("article_id")
            if by_article
            else pl.col(list(sums)).cum_sum()
        )
    )


def random_scores(
    impressions: pl.DataFrame,
    engagements: pl.DataFrame | None = None,
    articles: pl.DataFrame | None = None,
    follows: pl.DataFrame | None = None,
    *,
    seed: int = 0,
) -> pl.DataFrame:
    """Uniform random scores (the chance level every other ranker must beat)."""
    rng = np.random.default_rng(seed)
    return impressions.with_columns(pl.Series(SCORE, rng.random(impressions.height)))


def _on_shown_articles(impressions: pl.DataFrame, engagements: pl.DataFrame) -> pl.LazyFrame:
    """The engagements on the impressions' articles only, lazily: a per-article count can
    only be asked of those, and a held-out sample shows a fraction of the catalog (at 100k
    users, grouping all 20.8M engagements per article and time held over 3 GiB at once)."""
    shown = impressions.select(pl.col("article_id").cast(engagements["article_id"].dtype)).unique()
    return engagements.lazy().join(shown.lazy(), on="article_id", how="semi")


def _totals_before(
    times: pl.Series,
    events: Iterable[pl.DataFrame],
    columns: dict[str, pl.Expr],
    where: pl.Expr,
) -> dict[str, pl.Series]:
    """For each of `times`, the sum of each of `columns` (expressions over the events) over
    the events that pass `where` and whose `engaged_at` is strictly before it.

    Each event is put in the interval between two consecutive distinct query times it
    falls in, a slice of `events` at a time: the memory follows a slice and the query
    times, not a sort or a group-by of every event (20.8M at 100k users)."""
    at = times.cast(pl.Datetime("us")).dt.epoch("us").to_numpy()
    grid = unique(at)
    sums = {name: np.zeros(len(grid) + 1) for name in columns}
    for part in events:
        part = part.filter(where & pl.col("engaged_at").is_not_null())
        t = part["engaged_at"].cast(pl.Datetime("us")).dt.epoch("us").to_numpy()
        # bin = number of query times at or before the event: the event is strictly before
        # grid[i] exactly when bin <= i.
        bins = np.searchsorted(grid, t, side="right")
        values = part.select(**columns)
        for name in columns:
            weights = values[name].cast(pl.Float64).to_numpy()
            sums[name] += np.bincount(bins, weights=weights, minlength=len(grid) + 1)
    slot = np.searchsorted(grid, at)  # each time's place in the grid
    return {name: pl.Series(name, np.cumsum(total)).gather(slot) for name, total in sums.items()}


def popularity_scores(
    impressions: pl.DataFrame,
    engagements: pl.DataFrame,
    articles: pl.DataFrame | None = None,
    follows: pl.DataFrame | None = None,
    *,
    window: timedelta = timedelta(hours=24),
) -> pl.DataFrame:
    """Positive engagements on the article in [shown_at - window, shown_at)."""
    positive = pl.any_horizontal([pl.col(a) for a in POSITIVE_ACTIONS if a in engagements.columns])
    events = _cumulative(
        _on_shown_articles(impressions, engagements)
        .filter(positive)
        .select("article_id", pl.col("engaged_at").alias("t"))
        .collect(),
        {"n": pl.len().cast(pl.Float64)},
    )
    upto_now = _as_of(impressions, events, pl.col("shown_at"), ["n"])["n"]
    upto_start = _as_of(impressions, events, pl.col("shown_at") - window, ["n"])["n"]
    return impressions.with_columns((upto_now - upto_start).alias(SCORE))


def _age_seconds(impressions: pl.DataFrame, articles: pl.DataFrame) -> pl.Series:
    published = impressions.select("article_id").join(
        articles.select("article_id", "published_at"),
        on="article_id",
        how="left",
        maintain_order="left",
    )["published_at"]
    age = (impressions["shown_at"] - published).dt.total_microseconds() / 1e6
    # Unknown publish time: treat as the oldest article of the frame.
    oldest = age.max()
    return age.fill_null(0.0 if oldest is None else oldest + 1.0)


def recency_scores(
    impressions: pl.DataFrame,
    engagements: pl.DataFrame | None = None,
    articles: pl.DataFrame | None = None,
    follows: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Newest first: minus the article's age in seconds at shown_at."""
    if articles is None:
        raise ValueError("recency_scores needs the articles table (published_at)")
    return impressions.with_columns((-_age_seconds(impressions, articles)).alias(SCORE))


def read_time_scores(
    impressions: pl.DataFrame,
    engagements: pl.DataFrame,
    articles: pl.DataFrame | None = None,
    follows: pl.DataFrame | None = None,
    *,
    every: Callable[[], Iterable[pl.DataFrame]] | None = None,
) -> pl.DataFrame:
    """Mean dwell of the article's engagements strictly before shown_at.

    An article nobody has read yet gets the mean dwell of all earlier engagements, so the
    score ranks depth of reading, not merely having been read (that is popularity). Those
    are `engagements`, or, given `every`, the slices it returns (with engaged_at and
    dwell_seconds): every user's, where `engagements` holds the shown posts' rows only.
    """
    has_dwell = pl.col("dwell_seconds").is_not_null()
    timed = (
        _on_shown_articles(impressions, engagements)
        .filter(has_dwell)
        .select("article_id", pl.col("engaged_at").alias("t"), "dwell_seconds")
        .collect()
    )
    sums = {"dwell": pl.col("dwell_seconds").cast(pl.Float64).sum(), "n": pl.len().cast(pl.Float64)}
    own = _as_of(impressions, _cumulative(timed, sums), pl.col("shown_at"), ["dwell", "n"])
    # Every article's engagements, for the fallback, summed per interval between impressions.
    every_before = _totals_before(
        impressions["shown_at"],
        engagements.iter_slices(1 << 21) if every is None else every(),
        {"dwell": pl.col("dwell_seconds"), "n": pl.lit(1.0)},
        where=has_dwell,
    )
    score = (
        pl.when(own["n"] > 0)
        .then(own["dwell"] / own["n"])
        .when(every_before["n"] > 0)
        .then(every_before["dwell"] / every_before["n"])
        .otherwise(0.0)
    )
    return impressions.with_columns(score.alias(SCORE))


def chronological_following_scores(
    impressions: pl.DataFrame,
    engagements: pl.DataFrame | None = None,
    articles: pl.DataFrame | None = None,
    follows: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Followed authors' articles newest first, then every other article newest first.

    A follow counts when followed_at is before shown_at (or unknown). Without follows or
    authors this is the recency baseline.
    """
    if articles is None:
        raise ValueError("chronological_following_scores needs the articles table")
    age = _age_seconds(impressions, articles)
    if follows is None or follows.height == 0:
        return impressions.with_columns((-age).alias(SCORE))
    rows = impressions.select(
        pl.int_range(pl.len()).alias("_row"), "user_id", "article_id", "shown_at"
    ).join(articles.select("article_id", "author_id"), on="article_id", how="left")
    followed = (
        rows.join(
            follows.select("follower_id", "followee_id", "followed_at"),
            left_on=["user_id", "author_id"],
            right_on=["follower_id", "followee_id"],
            how="inner",
        )
        .filter(pl.col("followed_at").is_null() | (pl.col("followed_at") < pl.col("shown_at")))
        .select("_row")
        .unique()
    )
    is_followed = pl.DataFrame({"_row": np.arange(impressions.height)}).with_columns(
        pl.col("_row").is_in(followed["_row"].implode()).alias("f")
    )["f"]
    score = is_followed.cast(pl.Float64) * _FOLLOWED_BONUS - age
    return impressions.with_columns(score.alias(SCORE))


BASELINES: dict[str, Baseline] = {
    "random": random_scores,
    "popularity": popularity_scores,
    "recency": recency_scores,
    "read_time": read_time_scores,
    "chronological_following": chronological_following_scores,
}


def label_impressions(
    impressions: pl.DataFrame, engagements: pl.DataFrame, action: str = "click"
) -> pl.DataFrame:
    """Impressions with a boolean `label`: the user did `action` on that article in that
    impression (an engagement row with the same impression_id and article_id)."""
    positives = (
        engagements.filter(pl.col("impression_id").is_not_null() & pl.col(action))
        .select("impression_id", "article_id")
        .unique()
        .with_columns(label=pl.lit(True))
    )
    return impressions.join(
        positives, on=["impression_id", "article_id"], how="left", maintain_order="left"
    ).with_columns(pl.col("label").fill_null(False))


def evaluate_baselines(
    world: World,
    heldout_only: bool = True,
    action: str = "click",
    baselines: dict[str, Baseline] | None = None,
    peer_fits: Path | None = None,
    warehouse: Location | None = None,
) -> pl.DataFrame:
    """Score the (held-out) impressions with every baseline and compute ranking metrics.

    One row per baseline: baseline, auc, mrr, ndcg@5, ndcg@10, n_impressions, n_skipped,
    n_no_positive. By default the classic collaborative-filtering peers (metrics.classic)
    come too, fitted once at the first scored impression, or at the world's held-out start
    with `heldout_only` (the fit trained_models and feed_quality make too: through the fit
    store `peer_fits`, metrics.fit_store, it is made once); chronological_following is left
    out when the world has no follows, where it would only repeat recency.

    With `warehouse`, the world may hold only what concerns its impressions
    (data.warehouse.read_heldout_sample with `scoped`): the engagements on the posts they
    show and their users' follows. What every user's rows decide (read_time's fallback,
    the classic peers' fit, whether anyone follows anyone) is then taken from the
    warehouse at that path, in a pass or in SQL.
    """
    chosen = dict(BASELINES if baselines is None else baselines)
    if baselines is None and not any_follows(world, warehouse):
        chosen.pop("chronological_following")
    if warehouse is not None:
        chosen = with_warehouse_fallbacks(chosen, warehouse)
    imps = world.impressions
    if heldout_only:
        imps = imps.filter(pl.col("is_heldout"))
    imps = label_impressions(imps, world.engagements, action)
    rows = []
    for name, fn in chosen.items():
        scored = fn(imps, world.engagements, world.articles, world.follows)
        rows.append({"baseline": name, **evaluate_scores(scored, SCORE, "label")})
    if baselines is None:
        rows += _classic_rows(world, imps, heldout_only, peer_fits, warehouse)
    return pl.DataFrame(rows)


def with_warehouse_fallbacks(
    chosen: dict[str, Baseline], warehouse: Location
) -> dict[str, Baseline]:
    """`chosen` with what a baseline asks of every user's rows taken from the warehouse
    (read_time's fallback: every dwell time), for worlds that hold only some of them."""
    if chosen.get("read_time") is read_time_scores:
        every = partial(_dwell_slices, warehouse)
        return {**chosen, "read_time": partial(read_time_scores, every=every)}
    return chosen


def any_follows(world: World, warehouse: Location | None) -> bool:
    """Whether anyone follows anyone: in `world`, or (it holding only some users' follows)
    in `warehouse`."""
    if warehouse is None:
        return world.follows.height > 0
    con = connect_read_only(warehouse)
    try:
        return con.execute("select exists (select 1 from main.follows)").fetchone()[0]
    finally:
        con.close()


def _dwell_slices(warehouse: Location) -> Iterator[pl.DataFrame]:
    """Every engagement with a dwell time in the warehouse, in slices."""
    return scan_batches(
        warehouse,
        "select engaged_at, dwell_seconds from main.engagements where dwell_seconds is not null",
    )


def _classic_rows(
    world: World,
    imps: pl.DataFrame,
    heldout_only: bool,
    peer_fits: Path | None,
    warehouse: Location | None,
) -> list[dict[str, Any]]:
    """evaluate_baselines' rows of the classic peers, all from one fit."""
    # Imported here: the classic peers build on this module's definitions.
    from feed_dagster.metrics.classic import CLASSIC_METHODS
    from feed_dagster.metrics.fit_store import store_again, stored_fit_named

    if imps.height == 0:
        scored = imps.with_columns(pl.lit(None, dtype=pl.Float32).alias(SCORE))
        return [{"baseline": m, **evaluate_scores(scored, SCORE, "label")} for m in CLASSIC_METHODS]
    cut = imps["shown_at"].min()
    if heldout_only:
        cut = min(cut, world.heldout_start)
    # With a warehouse, everyone's engagements are there, not in the (scoped) world.
    peers, name = stored_fit_named(
        cut,
        peer_fits,
        engagements=world.engagements if warehouse is None else None,
        warehouse=warehouse,
    )
    users, articles = imps["user_id"].to_numpy(), imps["article_id"].to_numpy()
    rows = []
    for method in CLASSIC_METHODS:
        scored = imps.with_columns(
            pl.Series(SCORE, peers.score(method, users, articles), dtype=pl.Float32)
        )
        rows.append({"baseline": method, **evaluate_scores(scored, SCORE, "label")})
    store_again(peers, peer_fits, name)
    return rows
