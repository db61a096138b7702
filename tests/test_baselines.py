"""Baselines score impressions only from what was known strictly before each impression."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from feed_dagster.data.schema import World, conform
from feed_dagster.ebnerd import load_ebnerd, write_synthetic_ebnerd
from feed_dagster.metrics import BASELINES, evaluate_baselines, label_impressions
from feed_dagster.metrics.baselines import (
    chronological_following_scores,
    popularity_scores,
    random_scores,
    read_time_scores,
    recency_scores,
)

T0 = datetime(2024, 3, 1, 12, 0, 0)
H = timedelta(hours=1)


def impressions(rows: list[tuple[int, int, int, datetime]]) -> pl.DataFrame:
    """(impression_id, user_id, article_id, shown_at) rows; positions in row order."""
    df = pl.DataFrame(
        rows, schema=["impression_id", "user_id", "article_id", "shown_at"], orient="row"
    ).with_columns(position=pl.int_range(pl.len()).over("impression_id"), is_heldout=pl.lit(True))
    return conform("impressions", df)


def engagements(rows: list[tuple[int, int, datetime, float | None]], **flags: bool) -> pl.DataFrame:
    """(user_id, article_id, engaged_at, dwell) rows, click True unless flags say otherwise."""
    df = pl.DataFrame(
        rows, schema=["user_id", "article_id", "engaged_at", "dwell_seconds"], orient="row"
    ).with_columns(**{k: pl.lit(v) for k, v in {"click": True, **flags}.items()})
    return conform("engagements", df)


def articles(published: dict[int, datetime | None], authors: dict[int, int] | None = None):
    df = pl.DataFrame(
        {
            "article_id": list(published),
            "published_at": list(published.values()),
            "author_id": [None if authors is None else authors.get(a) for a in published],
        },
        schema_overrides={"published_at": pl.Datetime("us"), "author_id": pl.Int64},
    )
    return conform("articles", df)


def test_popularity_counts_the_trailing_window_strictly_before() -> None:
    imps = impressions([(1, 9, 100, T0), (1, 9, 200, T0), (2, 9, 100, T0 + 30 * H)])
    eng = engagements(
        [
            (1, 100, T0 - 24 * H, None),  # exactly at the window start: counts
            (2, 100, T0 - 24 * H - timedelta(seconds=1), None),  # just outside
            (3, 100, T0 - H, None),
            (4, 100, T0, None),  # at the impression itself: never counts
            (5, 200, T0 - 2 * H, None),
            (6, 200, T0 - 3 * H, None),
            (7, 200, T0 - 3 * H, None),  # same time as another event
            (8, 100, T0 + 29 * H, None),
        ]
    )
    scores = popularity_scores(imps, eng)["score"].to_list()
    assert scores == [2.0, 3.0, 1.0]  # the third sees only T0+29h in [T0+6h, T0+30h)
    six_hours = popularity_scores(imps, eng, window=timedelta(hours=6))["score"].to_list()
    assert six_hours == [1.0, 3.0, 1.0]


def test_popularity_ignores_negative_actions() -> None:
    imps = impressions([(1, 9, 100, T0)])
    eng = engagements([(1, 100, T0 - H, None)], click=False, not_interested=True)
    assert popularity_scores(imps, eng)["score"].to_list() == [0.0]


def test_popularity_matches_a_loop() -> None:
    rng = np.random.default_rng(0)
    n_imp, n_eng = 300, 2000
    base = np.datetime64(T0, "us")
    shown = base + (rng.integers(0, 72, n_imp) * 3600 * 10**6).astype("timedelta64[us]")
    imps = impressions(
        list(
            zip(
                np.arange(n_imp).tolist(),
                [1] * n_imp,
                rng.integers(0, 20, n_imp).tolist(),
                shown.tolist(),
                strict=True,
            )
        )
    )
    e_art = rng.integers(0, 20, n_eng)
    e_t = base + (rng.integers(-24, 72, n_eng) * 3600 * 10**6).astype("timedelta64[us]")
    eng = engagements(
        list(zip([2] * n_eng, e_art.tolist(), e_t.tolist(), [None] * n_eng, strict=True))
    )
    got = popularity_scores(imps, eng)["score"].to_numpy()
    window = np.timedelta64(24 * 3600 * 10**6, "us")
    art = imps["article_id"].to_numpy()
    for i in range(n_imp):
        t = shown[i]
        expected = np.sum((e_art == art[i]) & (e_t < t) & (e_t >= t - window))
        assert got[i] == expected, i


def test_recency_is_minus_age() -> None:
    imps = impressions([(1, 9, 100, T0), (1, 9, 200, T0), (1, 9, 300, T0)])
    arts = articles({100: T0 - 2 * H, 200: T0 - 30 * H, 300: None})
    scores = recency_scores(imps, None, arts)["score"].to_list()
    assert scores[:2] == [-7200.0, -108000.0]
    assert scores[2] < scores[1]  # unknown publish time ranks as the oldest


def test_read_time_uses_earlier_dwell_only() -> None:
    imps = impressions([(1, 9, 100, T0), (1, 9, 200, T0), (1, 9, 300, T0)])
    eng = engagements(
        [
            (1, 100, T0 - 2 * H, 10.0),
            (2, 100, T0 - H, 30.0),
            (3, 100, T0, 1000.0),  # at the impression: ignored
            (4, 100, T0 - H, None),  # no dwell: ignored
            (5, 200, T0 - 48 * H, 5.0),  # no window for read time
            (6, 300, T0 + H, 99.0),  # later: ignored
        ]
    )
    scores = read_time_scores(imps, eng)["score"].to_list()
    assert scores[0] == pytest.approx(20.0)
    assert scores[1] == pytest.approx(5.0)
    assert scores[2] == pytest.approx((10 + 30 + 5) / 3)  # unread: mean of all earlier dwell


def test_chronological_following() -> None:
    imps = impressions([(1, 9, 100, T0), (1, 9, 200, T0), (1, 9, 300, T0), (1, 9, 400, T0)])
    arts = articles(
        {100: T0 - 20 * H, 200: T0 - H, 300: T0 - 30 * H, 400: T0 - 2 * H},
        authors={100: 50, 200: 60, 300: 50, 400: 70},
    )
    follows = conform(
        "follows",
        pl.DataFrame(
            {
                "follower_id": [9, 9, 8],
                "followee_id": [50, 70, 60],
                "followed_at": [T0 - 100 * H, T0 + H, T0 - 100 * H],
            }
        ),
    )
    scored = chronological_following_scores(imps, None, arts, follows)
    order = scored.sort("score", descending=True)["article_id"].to_list()
    # author 50 is followed (100 newer than 300); 70 only after the impression; 60 by another
    assert order == [100, 300, 200, 400]
    no_follows = chronological_following_scores(imps, None, arts, None)
    assert no_follows["score"].equals(recency_scores(imps, None, arts)["score"])


def test_random_is_seeded_and_keeps_rows() -> None:
    imps = impressions([(1, 9, a, T0) for a in range(50)])
    a = random_scores(imps, seed=1)
    assert a["score"].equals(random_scores(imps, seed=1)["score"])
    assert not a["score"].equals(random_scores(imps, seed=2)["score"])
    assert a.drop("score").equals(imps)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    folder = write_synthetic_ebnerd(
        tmp_path_factory.mktemp("bl"), users=60, articles=400, impressions_per_user=6, seed=2
    )
    return load_ebnerd(folder)


@pytest.mark.parametrize("name", ["popularity", "read_time"])
def test_future_engagements_do_not_change_scores(world: World, name: str) -> None:
    imps = world.impressions.filter("is_heldout")
    t = imps["shown_at"].sort()[imps.height // 2]
    at_t = imps.filter(pl.col("shown_at") == t)
    fn = BASELINES[name]
    full = fn(at_t, world.engagements, world.articles)["score"]
    past = world.engagements.filter(pl.col("engaged_at") < t)
    assert full.equals(fn(at_t, past, world.articles)["score"])


def test_row_order_is_kept(world: World) -> None:
    imps = world.impressions.filter("is_heldout").sample(fraction=1.0, shuffle=True, seed=4)
    for name, fn in BASELINES.items():
        scored = fn(imps, world.engagements, world.articles, world.follows)
        assert scored.drop("score").equals(imps), name


def test_label_impressions(world: World) -> None:
    labelled = label_impressions(world.impressions, world.engagements)
    assert labelled.height == world.impressions.height
    clicks = world.engagements.filter(pl.col("impression_id").is_not_null()).height
    assert labelled["label"].sum() == clicks


def test_evaluate_baselines(world: World) -> None:
    result = evaluate_baselines(world)
    classic = ["popularity_all_time", "item_knn", "als", "ease"]
    assert result["baseline"].to_list() == [
        "random",
        "popularity",
        "recency",
        "read_time",
        *classic,
    ]
    assert set(result.columns) >= {"auc", "mrr", "ndcg@5", "ndcg@10", "n_impressions"}
    heldout = world.impressions.filter("is_heldout")["impression_id"].n_unique()
    assert (result["n_impressions"] == heldout).all()
    auc = dict(zip(result["baseline"], result["auc"], strict=True))
    assert auc["popularity"] > auc["random"] and auc["recency"] > auc["random"]
    everything = evaluate_baselines(world, heldout_only=False)
    assert (everything["n_impressions"] > heldout).all()


def test_evaluate_baselines_with_follows(world: World) -> None:
    follows = conform(
        "follows",
        pl.DataFrame({"follower_id": [1], "followee_id": [2], "followed_at": [T0]}),
    )
    social = World(**{**world.__dict__, "follows": follows})
    assert "chronological_following" in evaluate_baselines(social)["baseline"].to_list()


def test_baseline_signatures_take_follows() -> None:
    # every baseline accepts the shared (impressions, engagements, articles, follows) call
    imps = impressions([(1, 9, 100, T0)])
    eng = engagements([(1, 100, T0 - H, 3.0)])
    arts = articles({100: T0 - H})
    for fn in BASELINES.values():
        assert fn(imps, eng, arts, None)["score"].len() == 1
