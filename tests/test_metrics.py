"""Ranking metrics against brute-force per-impression definitions, and the submission file."""

from __future__ import annotations

import itertools
import math
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from feed_dagster.metrics import evaluate_scores, per_action_auc, read_submission, write_submission
from feed_dagster.metrics.ranking import group_auc

# --- brute force, straight from the definitions ----------------------------------------


def bf_auc(y: list[float], s: list[float]) -> float:
    pos = [si for yi, si in zip(y, s, strict=True) if yi > 0]
    neg = [si for yi, si in zip(y, s, strict=True) if yi <= 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def bf_orders(s: list[float]) -> list[tuple[int, ...]]:
    """Every order of the items consistent with the scores (ties in any order)."""
    return [
        p
        for p in itertools.permutations(range(len(s)))
        if all(s[p[i]] >= s[p[i + 1]] for i in range(len(p) - 1))
    ]


def bf_mrr(y: list[float], s: list[float]) -> float:
    vals = [
        sum(y[item] / (rank + 1) for rank, item in enumerate(order)) / sum(y)
        for order in bf_orders(s)
    ]
    return sum(vals) / len(vals)


def bf_dcg(gains_in_order: list[float], k: int) -> float:
    k = min(k, len(gains_in_order))
    return sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(gains_in_order[:k]))


def bf_ndcg(y: list[float], s: list[float], k: int) -> float:
    best = bf_dcg(sorted(y, reverse=True), k)
    vals = [bf_dcg([y[i] for i in order], k) / best for order in bf_orders(s)]
    return sum(vals) / len(vals)


def frame(groups: list[tuple[list[float], list[float]]]) -> pl.DataFrame:
    rows = [(g, yi, si) for g, (y, s) in enumerate(groups) for yi, si in zip(y, s, strict=True)]
    return pl.DataFrame(rows, schema=["impression_id", "label", "score"], orient="row")


def random_groups(rng: np.random.Generator, n: int, graded: bool) -> list:
    groups = []
    for _ in range(n):
        size = int(rng.integers(2, 7))
        # few distinct scores, so ties are frequent
        s = rng.integers(0, 4, size).astype(float).tolist()
        if graded:
            y = rng.integers(0, 3, size).astype(float).tolist()
        else:
            y = (rng.random(size) < 0.35).astype(float).tolist()
        groups.append((y, s))
    return groups


# --- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("graded", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_with_ties(seed: int, graded: bool) -> None:
    groups = random_groups(np.random.default_rng(seed), 60, graded)
    got = evaluate_scores(frame(groups), "score")
    with_pos = [(y, s) for y, s in groups if sum(y) > 0]
    with_both = [(y, s) for y, s in with_pos if any(v <= 0 for v in y)]
    assert got["n_impressions"] == len(groups)
    assert got["n_no_positive"] == len(groups) - len(with_pos)
    assert got["n_skipped"] == len(groups) - len(with_both)
    assert got["auc"] == pytest.approx(np.mean([bf_auc(y, s) for y, s in with_both]))
    assert got["mrr"] == pytest.approx(np.mean([bf_mrr(y, s) for y, s in with_pos]))
    for k in (5, 10):
        expected = np.mean([bf_ndcg(y, s, k) for y, s in with_pos])
        assert got[f"ndcg@{k}"] == pytest.approx(expected)


def test_matches_the_reference_example() -> None:
    # The worked example of the EBNeRD benchmark's metric evaluator.
    y = [[1, 0, 0], [1, 1, 0], [1, 0, 0, 0]]
    s = [[0.2, 0.3, 0.5], [0.18, 0.7, 0.1], [0.18, 0.2, 0.1, 0.1]]
    got = evaluate_scores(frame(list(zip(y, s, strict=True))), "score")
    assert got["auc"] == pytest.approx(0.5555555555555556)
    assert got["mrr"] == pytest.approx(0.5277777777777778)
    assert got["ndcg@5"] == pytest.approx(0.7103099178571526)
    assert got["ndcg@10"] == pytest.approx(0.7103099178571526)


def test_without_ties_equals_argsort_definition() -> None:
    rng = np.random.default_rng(7)
    groups = []
    for _ in range(40):
        size = int(rng.integers(2, 30))
        y = np.zeros(size)
        y[rng.choice(size, int(rng.integers(1, 3)), replace=False)] = 1
        groups.append((y.tolist(), rng.random(size).tolist()))
    got = evaluate_scores(frame(groups), "score")
    mrr, n5 = [], []
    for y, s in groups:
        order = np.argsort(s)[::-1]
        yy = np.take(y, order)
        mrr.append(np.sum(yy / (np.arange(len(yy)) + 1)) / np.sum(yy))
        k = min(5, len(y))
        dcg = np.sum((2 ** yy[:k] - 1) / np.log2(np.arange(k) + 2))
        best = np.sort(y)[::-1][:k]
        n5.append(dcg / np.sum((2**best - 1) / np.log2(np.arange(k) + 2)))
    assert got["mrr"] == pytest.approx(np.mean(mrr))
    assert got["ndcg@5"] == pytest.approx(np.mean(n5))


def test_constant_scores_earn_chance() -> None:
    groups = [([1, 0, 0, 0], [1.0] * 4), ([0, 1], [3.0, 3.0])]
    got = evaluate_scores(frame(groups), "score")
    assert got["auc"] == 0.5
    # a random order puts the single positive at each rank with equal probability
    assert got["mrr"] == pytest.approx(((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4 + (1 + 1 / 2) / 2) / 2)


def test_perfect_and_reversed() -> None:
    groups = [([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]), ([1, 0, 0], [3, 2, 1])]
    best = evaluate_scores(frame(groups), "score")
    assert best["auc"] == best["ndcg@5"] == best["ndcg@10"] == pytest.approx(1.0)
    # two positives on top still average 1/1 and 1/2 under this MRR definition
    assert best["mrr"] == pytest.approx(((1 + 1 / 2) / 2 + 1) / 2)
    worst = evaluate_scores(frame([(y, [-v for v in s]) for y, s in groups]), "score")
    assert worst["auc"] == 0.0


def test_skipped_groups_and_empty_metrics() -> None:
    groups = [([0, 0, 0], [1, 2, 3]), ([1, 1], [1, 2])]
    got = evaluate_scores(frame(groups), "score")
    assert got["n_impressions"] == 2
    assert got["n_no_positive"] == 1
    assert got["n_skipped"] == 2
    assert math.isnan(got["auc"])
    assert got["mrr"] == pytest.approx((1 + 1 / 2) / 2)
    assert got["ndcg@5"] == pytest.approx(1.0)


def test_bool_labels_and_custom_columns() -> None:
    df = pl.DataFrame(
        {"imp": [5, 5, 5, 6, 6], "clicked": [True, False, False, False, True], "p": [3, 2, 1, 2, 1]}
    )
    got = evaluate_scores(df, "p", label_col="clicked", group_col="imp")
    assert got["auc"] == pytest.approx(0.5)
    assert got["mrr"] == pytest.approx((1 + 1 / 2) / 2)


def test_rejects_missing_scores() -> None:
    df = pl.DataFrame({"impression_id": [1, 1], "label": [1, 0], "score": [0.3, float("nan")]})
    with pytest.raises(ValueError, match="score"):
        evaluate_scores(df, "score")
    with pytest.raises(ValueError, match="nope"):
        evaluate_scores(df, "nope")


def test_per_action_auc() -> None:
    rng = np.random.default_rng(3)
    n = 400
    df = pl.DataFrame(
        {
            "impression_id": np.repeat(np.arange(40), 10),
            "click": rng.random(n) < 0.3,
            "report": np.zeros(n, dtype=bool),
            "p_click": rng.integers(0, 5, n).astype(float),
            "p_report": rng.random(n),
        }
    )
    got = per_action_auc(df, {"click": "p_click", "report": "p_report"})
    rows = {r["label"]: r for r in got.to_dicts()}
    groups = [
        (g["click"].cast(float).to_list(), g["p_click"].to_list())
        for _, g in df.group_by("impression_id", maintain_order=True)
    ]
    valid = [(y, s) for y, s in groups if 0 < sum(y) < len(y)]
    assert rows["click"]["auc"] == pytest.approx(np.mean([bf_auc(y, s) for y, s in valid]))
    assert rows["click"]["n_skipped"] == len(groups) - len(valid)
    assert math.isnan(rows["report"]["auc"]) and rows["report"]["n_skipped"] == 40
    pooled, n_groups, skipped = group_auc(df, "p_click", "click", group_col=None)
    assert (n_groups, skipped) == (1, 0)
    assert pooled == pytest.approx(
        bf_auc(df["click"].cast(float).to_list(), df["p_click"].to_list())
    )


def test_submission_round_trip(tmp_path: Path) -> None:
    scored = pl.DataFrame(
        {
            "impression_id": [20, 20, 20, 3, 3, 3, 3],
            "position": [0, 1, 2, 0, 1, 2, 3],
            "score": [0.1, 0.9, 0.5, 0.2, 0.2, 0.7, 0.1],
        }
    ).sample(fraction=1.0, shuffle=True, seed=1)
    zpath = write_submission(scored, tmp_path)
    assert zpath.name == "predictions.zip"
    with zipfile.ZipFile(zpath) as zf:
        assert zf.namelist() == ["predictions.txt"]
        lines = zf.read("predictions.txt").decode().splitlines()
    # ties (0.2, 0.2) are ranked by inview position
    assert lines == ["3 [2,3,1,4]", "20 [3,1,2]"]
    back = read_submission(zpath)
    assert back.rows() == [(3, [2, 3, 1, 4]), (20, [3, 1, 2])]
    assert read_submission(tmp_path / "predictions.txt").equals(back)
