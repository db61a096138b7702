"""Scorers: predictions, weighted score, negative squashing, author diversity, OON factor,
and the top reason."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from feed_dagster.data.schema import ACTION_COLUMNS, ACTIONS
from feed_dagster.pipeline.config import ScoringConfig, ScoringWeights
from feed_dagster.pipeline.scoring import (
    apply_author_diversity,
    apply_out_of_network_factor,
    combined_score,
    predict,
    squash_negative,
    weighted_score,
    with_reason,
)

# The reference system's values, which the formula tests spell out.
CFG = ScoringConfig(author_diversity_floor=0.25, out_of_network_factor=0.75)


def probs(**values: float) -> dict[str, float]:
    return {f"p_{a}": values.get(a, 0.0) for a in ACTIONS} | {
        "dwell_seconds": values.get("dwell", 0.0)
    }


class PartialScorer:
    """A model with two heads only, returning rows in reverse order."""

    name = "partial"

    def score(self, candidates, context):
        return candidates.select(
            "user_id", "article_id", pl.lit(0.5).alias("p_favorite"), pl.lit(None).alias("p_click")
        ).reverse()


def test_predict_fills_missing_actions_and_aligns_rows() -> None:
    c = pl.DataFrame({"user_id": [1, 1, 2], "article_id": [10, 11, 10], "x": [1, 2, 3]})
    out = predict(c, PartialScorer(), query=None)  # type: ignore[arg-type]
    assert out["x"].to_list() == [1, 2, 3]
    assert out["p_favorite"].to_list() == [0.5] * 3
    for col in ACTION_COLUMNS:
        if col != "p_favorite":
            assert out[col].to_list() == [0.0] * 3, col
    assert out["dwell_seconds"].to_list() == [0.0] * 3


def test_predict_rejects_row_mismatch() -> None:
    class Dropper:
        def score(self, candidates, context):
            return candidates.head(1)

    c = pl.DataFrame({"user_id": [1, 2], "article_id": [10, 10]})
    with pytest.raises(ValueError, match="1 rows for 2 candidates"):
        predict(c, Dropper(), query=None)  # type: ignore[arg-type]


def test_weighted_score_uses_reference_weights() -> None:
    w = ScoringWeights()
    assert (w.favorite, w.reply, w.repost, w.quote, w.share, w.click, w.dwell) == (
        0.5, 5, 1, 5, 2, 0.4, 0.004,
    )  # fmt: skip
    assert (w.not_interested, w.block_author, w.mute_author, w.report) == (
        -43.2,
        -31.2,
        -58.8,
        -234,
    )
    row = probs(favorite=0.2, reply=0.1, click=0.5, dwell=10.0, report=0.001)
    expected = 0.5 * 0.2 + 5 * 0.1 + 0.4 * 0.5 + 0.004 * 10.0 - 234 * 0.001
    out = weighted_score(pl.DataFrame([row]), CFG)
    assert out["weighted_score"][0] == pytest.approx(expected + CFG.negative_scores_offset)


def test_negative_squashing_keeps_order_and_stays_positive() -> None:
    rng = np.random.default_rng(0)
    n = 2_000
    # Negative actions are rare: their probabilities spread over [0, 0.02].
    negative = ("not_interested", "block_author", "mute_author", "report")
    rows = {f"p_{a}": rng.random(n) * (0.02 if a in negative else 0.5) for a in ACTIONS}
    rows["dwell_seconds"] = rng.random(n) * 60
    df = pl.DataFrame(rows).with_columns(
        combined=combined_score(CFG.weights),
        squashed=squash_negative(combined_score(CFG.weights), CFG),
    )
    assert (df["combined"] < 0).sum() > 100 and (df["combined"] > 0).sum() > 100
    ordered = df.sort("combined")
    assert ordered["squashed"].is_sorted()
    assert (df["squashed"] > 0).all()
    negative = df.filter(pl.col("combined") < 0)["squashed"]
    assert negative.max() < CFG.negative_scores_offset  # a tiny band below every positive
    w = CFG.weights
    worst = -w.negative_sum * 0.999
    squashed = pl.select(squash_negative(pl.lit(worst), CFG)).item()
    assert squashed == pytest.approx(
        (worst + w.negative_sum) / w.total_sum * CFG.negative_scores_offset
    )


def test_author_diversity_formula() -> None:
    # Author 7 has three posts for user 1; author 8 one; an authorless post is never penalised.
    df = pl.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 1, 1, 2],
            "article_id": [1, 2, 3, 4, 5, 6, 1],
            "author_id": [7, 7, 8, 7, None, None, 7],
            "score": [3.0, 5.0, 4.0, 1.0, 2.0, 2.0, 3.0],
        }
    )
    out = apply_author_diversity(df, CFG).sort("user_id", "article_id")

    def m(k: int) -> float:
        return (1 - 0.25) * 0.5**k + 0.25

    assert out["author_rank"].to_list() == [1, 0, 0, 2, 0, 0, 0]
    expected = [3.0 * m(1), 5.0, 4.0, 1.0 * m(2), 2.0, 2.0, 3.0]
    assert out["score"].to_list() == pytest.approx(expected)
    assert m(0) == 1.0 and m(1) == 0.625 and m(2) == 0.4375


def test_out_of_network_factor() -> None:
    df = pl.DataFrame({"in_network": [True, False], "score": [2.0, 2.0]})
    assert apply_out_of_network_factor(df, CFG)["score"].to_list() == [2.0, 1.5]


def test_reason_from_source_and_top_contribution() -> None:
    base = {"author_id": 5, "author_handle": "user5", "topic_name": "football"}
    rows = [
        {**base, "in_network": True, **probs(favorite=0.9)},
        {**base, "in_network": False, **probs(favorite=0.9, click=0.1)},
        {**base, "in_network": False, **probs(repost=0.9)},
        {**base, "in_network": False, **probs(reply=0.5)},
        {**base, "in_network": False, **probs(click=0.2, dwell=100.0)},
        {**base, "topic_name": None, "in_network": False, **probs(share=0.5)},
        {**base, "author_id": None, "author_handle": None, "in_network": True, **probs()},
    ]
    out = with_reason(pl.DataFrame(rows), CFG.weights)
    assert out["reason"].to_list() == [
        "you follow @user5",
        "similar to posts you liked",
        "popular in football",
        "people are talking about this in football",
        "matches your interest in football",
        "popular right now",
        "you follow football",
    ]
