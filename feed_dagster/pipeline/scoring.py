"""Scorers: model probabilities, the weighted score, author diversity, out-of-network factor.

Score formula per (user, candidate):

    combined  = sum_a w_a * p_a + w_dwell * dwell_seconds
    squashed  = combined + offset                             if combined >= 0
              = offset * (combined + N) / (P + N)             if combined < 0
    diversity = squashed * ((1 - floor) * decay**k + floor)   k = the author's earlier posts
    final     = diversity * oon_factor                        for out-of-network rows

P and N are the sums of the positive weights and of the magnitudes of the negative ones.
Since probabilities are at most 1, combined >= -N, so a negative total lands in
[0, offset * N / (P + N)), below `offset` and hence below every non-negative total, and
the map is increasing: order is kept. It is zero only if every negative probability is
exactly 1 and every positive one 0; any real model stays strictly positive. Keeping
scores positive matters because the later adjustments are multiplicative: a negative score
multiplied by a diversity factor below 1 would move *up*.
"""

from __future__ import annotations

import functools
import operator

import polars as pl

from feed_dagster.data.schema import ACTION_COLUMNS
from feed_dagster.pipeline.config import ScoringConfig, ScoringWeights
from feed_dagster.pipeline.protocols import Scorer, component_name
from feed_dagster.pipeline.query import Query
from feed_dagster.pipeline.tables import pair_key, run_position

PREDICTION_COLUMNS: tuple[str, ...] = (*ACTION_COLUMNS, "dwell_seconds")


def predict(candidates: pl.DataFrame, scorer: Scorer, query: Query) -> pl.DataFrame:
    """Candidates with the scorer's p_<action> and dwell_seconds columns.

    Missing action columns become 0 (a model without that head predicts nothing for it),
    nulls become 0, probabilities are clipped to [0, 1] and dwell to >= 0. A scorer that
    drops or invents rows is an error.
    """
    base = candidates.drop([c for c in PREDICTION_COLUMNS if c in candidates.columns])
    out = scorer.score(base, query)
    name = component_name(scorer)
    for key in ("user_id", "article_id"):
        if key not in out.columns:
            raise ValueError(f"scorer {name} returned no {key!r} column (got {out.columns})")
    if out.height != base.height:
        raise ValueError(f"scorer {name} returned {out.height} rows for {base.height} candidates")
    preds = out.select(
        "user_id",
        "article_id",
        *[
            (pl.col(c) if c in out.columns else pl.lit(0.0))
            .cast(pl.Float32)
            .fill_null(0.0)
            .fill_nan(0.0)
            .clip(0.0, 1.0)
            .alias(c)
            for c in ACTION_COLUMNS
        ],
        (pl.col("dwell_seconds") if "dwell_seconds" in out.columns else pl.lit(0.0))
        .cast(pl.Float32)
        .fill_null(0.0)
        .fill_nan(0.0)
        .clip(0.0, None)
        .alias("dwell_seconds"),
    )
    if preds["user_id"].equals(base["user_id"]) and preds["article_id"].equals(base["article_id"]):
        # Same rows in the same order (the usual case): no join needed.
        return base.hstack(preds.drop("user_id", "article_id"))
    joined = base.join(preds, on=["user_id", "article_id"], how="left", maintain_order="left")
    if joined.height != base.height or joined["p_click"].null_count():
        raise ValueError(f"scorer {name} returned rows that do not match the candidates")
    return joined


def combined_score(weights: ScoringWeights) -> pl.Expr:
    """sum_a w_a * p_a + w_dwell * dwell_seconds (before squashing)."""
    terms = [pl.col(f"p_{a}").cast(pl.Float64) * w for a, w in weights.action_weights().items()]
    terms.append(pl.col("dwell_seconds").cast(pl.Float64) * weights.dwell)
    # A fixed left-to-right sum: sum_horizontal may add columns in a thread-dependent
    # order, which changes the last bit of a float and makes reruns differ.
    return functools.reduce(operator.add, terms)


def squash_negative(combined: pl.Expr, cfg: ScoringConfig) -> pl.Expr:
    """Map a combined score to a positive one, keeping order (formula in the module doc)."""
    w, offset = cfg.weights, cfg.negative_scores_offset
    neg, total = w.negative_sum, w.total_sum
    if total == 0:
        return combined.clip(0.0, None)
    return (
        pl.when(combined >= 0).then(combined + offset).otherwise((combined + neg) / total * offset)
    )


def weighted_score(candidates: pl.DataFrame, cfg: ScoringConfig) -> pl.DataFrame:
    """Adds `weighted_score` (squashed) and `score` (= weighted_score, adjusted later)."""
    squashed = squash_negative(combined_score(cfg.weights), cfg)
    return candidates.with_columns(weighted_score=squashed).with_columns(
        score=pl.col("weighted_score")
    )


def diversity_multiplier(k: pl.Expr, cfg: ScoringConfig) -> pl.Expr:
    """(1 - floor) * decay**k + floor for an author's k-th earlier post (k = 0: the best)."""
    floor, decay = cfg.author_diversity_floor, cfg.author_diversity_decay
    return (1.0 - floor) * pl.lit(decay, dtype=pl.Float64).pow(k.cast(pl.Float64)) + floor


def apply_author_diversity(candidates: pl.DataFrame, cfg: ScoringConfig) -> pl.DataFrame:
    """Multiply each score by the diversity factor of its rank k among the author's posts
    for that user, ranking by the score so far (ties: lower article_id first); adds
    `author_rank` (k). Authorless posts (news sources) get k = 0: there is no author to
    over-represent. Rows come back grouped by user and author."""
    key = pair_key(candidates, "user_id", "author_id").alias("_key")
    ranked = (
        candidates.with_columns(key)
        .sort(["_key", "score", "article_id"], descending=[False, True, False], nulls_last=True)
        .with_columns(author_rank=run_position("_key").cast(pl.Int32))
        .drop("_key")
    )
    factor = diversity_multiplier(pl.col("author_rank"), cfg)
    return ranked.with_columns(score=pl.col("score") * factor)


def apply_out_of_network_factor(candidates: pl.DataFrame, cfg: ScoringConfig) -> pl.DataFrame:
    """Scale out-of-network scores by `out_of_network_factor`."""
    factor = pl.when(pl.col("in_network")).then(1.0).otherwise(cfg.out_of_network_factor)
    return candidates.with_columns(score=pl.col("score") * factor)


# Human-readable reasons for an out-of-network post, by its largest weighted contribution.
OON_REASONS: dict[str, tuple[str, str]] = {
    # action: (with topic, without topic)
    "favorite": ("similar to posts you liked", "similar to posts you liked"),
    "reply": ("people are talking about this in {topic}", "people are talking about this"),
    "repost": ("popular in {topic}", "popular right now"),
    "quote": ("people are talking about this in {topic}", "people are talking about this"),
    "share": ("popular in {topic}", "popular right now"),
    "click": ("matches your interest in {topic}", "matches your interests"),
    "dwell": ("matches your interest in {topic}", "matches your interests"),
}


def top_contribution(weights: ScoringWeights) -> pl.Expr:
    """Name of the action (or "dwell") with the largest weighted contribution."""
    names = [a for a, w in weights.action_weights().items() if w > 0] + ["dwell"]
    terms = [
        (
            pl.col("dwell_seconds") * weights.dwell
            if n == "dwell"
            else pl.col(f"p_{n}") * getattr(weights, n)
        ).cast(pl.Float64)
        for n in names
    ]
    idx = pl.concat_list(terms).list.arg_max()
    return idx.replace_strict(list(range(len(names))), names, return_dtype=pl.String)


def with_reason(rows: pl.DataFrame, weights: ScoringWeights) -> pl.DataFrame:
    """Adds `reason`, the top reason a post is in the feed: the source first (in-network:
    the followed account or topic), else the phrase for its largest weighted contribution.

    Needs in_network, author_id, author_handle, topic_name and the prediction columns.
    """
    topic = pl.col("topic_name")
    in_net = (
        pl.when(pl.col("author_handle").is_not_null())
        .then(pl.lit("you follow @") + pl.col("author_handle"))
        .when(pl.col("author_id").is_null() & topic.is_not_null())
        .then(pl.lit("you follow ") + topic)
        .otherwise(pl.lit("from an account you follow"))
    )
    phrases = pl.DataFrame(
        {
            "_top": list(OON_REASONS),
            "_head": [t.partition("{topic}")[0] for t, _ in OON_REASONS.values()],
            "_tail": [t.partition("{topic}")[2] for t, _ in OON_REASONS.values()],
            "_has_topic": ["{topic}" in t for t, _ in OON_REASONS.values()],
            "_plain": [p for _, p in OON_REASONS.values()],
        }
    )
    oon = (
        pl.when(topic.is_not_null() & pl.col("_has_topic"))
        .then(pl.col("_head") + topic + pl.col("_tail"))
        .when(topic.is_not_null())
        .then(pl.col("_head"))
        .otherwise(pl.col("_plain"))
        .fill_null(pl.lit("recommended for you"))
    )
    return (
        rows.with_columns(_top=top_contribution(weights))
        .join(phrases, on="_top", how="left", maintain_order="left")
        .with_columns(reason=pl.when(pl.col("in_network")).then(in_net).otherwise(oon))
        .drop("_top", "_head", "_tail", "_has_topic", "_plain")
    )
