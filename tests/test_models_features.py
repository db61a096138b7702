"""Model inputs: histories, labels, flags, leakage and serving/training parity (tiny world)."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import polars as pl
import pytest
import torch

from feed_dagster.data.schema import ACTIONS
from feed_dagster.embeddings import LexicalEncoder
from feed_dagster.models.catalog import FeatureConfig, ItemCatalog
from feed_dagster.models.engagement_log import EngagementLog
from feed_dagster.models.layers import CatalogTensors
from feed_dagster.models.ranker import RankerConfig, build_ranker, predict
from feed_dagster.models.ranker_data import (
    POST_RECENT_US,
    PROFILE_FEATURES,
    RankerData,
    build_ranker_data,
    build_serving_data,
    engagement_profile,
)
from feed_dagster.models.retrieval_data import build_retrieval_examples, temporal_split
from feed_dagster.models.train import drop_impossible_rows
from feed_dagster.world import generate_world, world_config

CFG = FeatureConfig(history_len=8, max_candidates=16)
INPUT_FIELDS = (
    "group_impression",
    "group_user",
    "group_time_us",
    "group_logged",
    "cand_article",
    "cand_item",
    "cand_age",
    "cand_in_network",
    "cand_topic_follow",
    "cand_profile",
)


@pytest.fixture(scope="module")
def world():
    return generate_world(world_config("tiny"))


@pytest.fixture(scope="module")
def catalog(world):
    return ItemCatalog.build(world.articles, LexicalEncoder().encode(world.articles), CFG)


def _data(world, catalog, impressions, engagements=None, follows=None) -> RankerData:
    engagements = world.engagements if engagements is None else engagements
    follows = world.follows if follows is None else follows
    return build_ranker_data(impressions, engagements, follows, world.topic_follows, catalog, CFG)


def test_history_is_the_last_engagements_strictly_before(world, catalog):
    log = EngagementLog.build(world.engagements, catalog)
    user = int(world.engagements["user_id"].mode()[0])
    mine = world.engagements.filter(pl.col("user_id") == user).sort("engaged_at", "article_id")
    t = mine["engaged_at"][12]  # an engagement time: that engagement itself must be excluded
    t_us = int(pl.Series([t]).dt.epoch("us")[0])
    h = log.history(np.array([user, user + 10_000]), np.array([t_us, t_us]), CFG)
    expected = mine.filter(pl.col("engaged_at") < t).tail(8)["article_id"].to_numpy()
    got = catalog.article_ids[h.item[0][h.item[0] > 0] - 1]
    np.testing.assert_array_equal(got, expected)
    assert (h.item[1] == 0).all(), "a user without engagements has an empty history"


def test_histories_of_many_queries_match_a_brute_force_window(world, catalog):
    """Queries at engagement times, between them, before and after the whole log, for
    users with and without engagements (ids between and beyond the known ones)."""
    log = EngagementLog.build(world.engagements, catalog)
    rng = np.random.default_rng(3)
    eng = world.engagements.sample(200, seed=3)
    known = eng["user_id"].to_numpy()
    t = eng["engaged_at"].cast(pl.Int64).to_numpy()
    users = np.concatenate([known, known, known[:20], known[:20] * 1000 + 7, [-5, 0]])
    times = np.concatenate([t, t + rng.integers(1, 10**9, len(t)), np.full(20, 0), t[:20], t[:2]])
    times[len(known) : len(known) + 5] = 2**52  # far after the log
    h = log.history(users, times, CFG)
    e = world.engagements.sort("user_id", "engaged_at", "article_id")
    e_user = e["user_id"].to_numpy()
    e_time = e["engaged_at"].cast(pl.Int64).to_numpy()
    e_item = catalog.rows(e["article_id"].to_numpy())
    for k in range(len(users)):
        window = e_item[(e_user == users[k]) & (e_time < times[k])][-CFG.history_len :]
        got = h.item[k][h.item[k] > 0]
        np.testing.assert_array_equal(got, window)
        assert (h.item[k][: CFG.history_len - len(window)] == 0).all()  # left-padded


def test_labels_and_slates_match_the_tables(world, catalog):
    imps = world.impressions.filter(pl.col("impression_id") < 200)
    data = _data(world, catalog, imps)
    rows = data.rows()
    assert rows.height == imps.height
    expected = imps.join(
        world.engagements.select("impression_id", "article_id", *ACTIONS),
        on=["impression_id", "article_id"],
        how="left",
    ).with_columns(pl.col(list(ACTIONS)).fill_null(False))
    got = rows.sort("impression_id", "article_id")
    want = expected.sort("impression_id", "article_id")
    for a in ACTIONS:
        assert got[a].to_list() == want[a].to_list(), a
    assert data.cand_in_network.sum() > 0 and data.cand_topic_follow.sum() > 0


def test_long_slates_are_split_into_groups(world, catalog):
    imps = world.impressions.filter(pl.col("impression_id") < 50)
    small = build_ranker_data(
        imps,
        world.engagements,
        world.follows,
        world.topic_follows,
        catalog,
        FeatureConfig(history_len=8, max_candidates=3),
    )
    assert small.cand_item.shape[1] == 3
    assert small.rows().height == imps.height
    assert len(small) > imps["impression_id"].n_unique()


def test_inputs_never_use_anything_at_or_after_the_impression(world, catalog):
    """Perturb every engagement and follow at or after T (and add new ones exactly at T):
    the model inputs, and a model's scores, for impressions shown at or before T stay equal.
    """
    imps = drop_impossible_rows(world.impressions, world.articles).filter(~pl.col("is_heldout"))
    t_cut = imps["shown_at"].sort()[imps.height // 2]
    before = imps.filter(pl.col("shown_at") <= t_cut)
    eng = world.engagements
    late = pl.col("engaged_at") >= t_cut
    rng = np.random.default_rng(0)
    n_late = int(eng.filter(late).height)
    shuffled_articles = rng.permutation(eng.filter(late)["article_id"].to_numpy())
    perturbed = pl.concat(
        [
            eng.filter(~late),
            eng.filter(late).with_columns(
                pl.Series("article_id", shuffled_articles),
                *[pl.Series(a, rng.random(n_late) < 0.5) for a in ACTIONS],
                pl.Series("dwell_seconds", rng.random(n_late).astype(np.float32) * 500),
            ),
            # New engagements stamped exactly at T by the users shown something at T.
            before.filter(pl.col("shown_at") == t_cut)
            .select(
                "user_id", "article_id", "impression_id", pl.col("shown_at").alias("engaged_at")
            )
            .with_columns(
                *[pl.lit(True).alias(a) for a in ACTIONS],
                pl.lit(999.0, pl.Float32).alias("dwell_seconds"),
            ),
        ],
        how="diagonal_relaxed",
    )
    new_follows = before.join(
        world.articles.select("article_id", "author_id"), on="article_id"
    ).select(
        pl.col("user_id").alias("follower_id"),
        pl.col("author_id").alias("followee_id"),
        pl.lit(t_cut).alias("followed_at"),
    )
    follows = pl.concat([world.follows, new_follows]).unique(
        ["follower_id", "followee_id"], keep="first"
    )

    a = _data(world, catalog, before)
    b = _data(world, catalog, before, engagements=perturbed, follows=follows)
    for name in INPUT_FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for name in ("item", "actions", "dwell", "age"):
        np.testing.assert_array_equal(
            getattr(a.history, name), getattr(b.history, name), err_msg=f"history.{name}"
        )
    # And end to end through a model.
    model = build_ranker(RankerConfig(content_dim=catalog.dim, features=CFG), seed=0)
    pa, _ = predict(model, a, CatalogTensors(catalog))
    pb, _ = predict(model, b, CatalogTensors(catalog))
    np.testing.assert_array_equal(pa, pb)

    # The perturbation is real: impressions after T do see it.
    after = imps.filter(pl.col("shown_at") > t_cut + timedelta(hours=2))
    a2 = _data(world, catalog, after)
    b2 = _data(world, catalog, after, engagements=perturbed, follows=follows)
    assert not np.array_equal(a2.history.item, b2.history.item)


def test_serving_inputs_equal_training_inputs(world, catalog):
    imps = world.impressions.filter(pl.col("is_heldout"))
    first = imps.filter(pl.col("impression_id") == imps["impression_id"].min()).sort("position")
    train = _data(world, catalog, first)
    now = first["shown_at"][0]
    serve = build_serving_data(
        first.select("user_id", "article_id"),
        now,
        world.engagements,
        world.follows,
        world.topic_follows,
        catalog,
        CFG,
    )
    for name in ("group_user", "group_time_us", "group_logged", "cand_article", "cand_item",
                 "cand_age", "cand_in_network", "cand_topic_follow"):  # fmt: skip
        np.testing.assert_array_equal(getattr(train, name), getattr(serve, name), err_msg=name)
    np.testing.assert_array_equal(train.history.item, serve.history.item)
    np.testing.assert_array_equal(train.history.user_bucket, serve.history.user_bucket)
    assert not serve.labels.any()
    model = build_ranker(RankerConfig(content_dim=catalog.dim, features=CFG), seed=1)
    torch.testing.assert_close(
        torch.from_numpy(predict(model, train, catalog)[0]),
        torch.from_numpy(predict(model, serve, catalog)[0]),
    )


def test_temporal_split_is_ordered(world):
    s = temporal_split(world.impressions, 0.2)
    assert s.train["shown_at"].max() < s.valid["shown_at"].min()
    assert s.valid["shown_at"].max() < s.heldout["shown_at"].min()
    assert s.heldout["is_heldout"].all()
    assert s.train.height + s.valid.height + s.heldout.height == world.impressions.height


def test_catalog_rejects_misaligned_vectors_and_unknown_ids(world, catalog):
    with pytest.raises(ValueError, match="aligned"):
        ItemCatalog.build(world.articles, np.zeros((3, 4), np.float32), CFG)
    with pytest.raises(ValueError, match="not in the articles table"):
        catalog.rows(np.array([10**12]))


def test_retrieval_positives_follow_the_time_cut(world, catalog):
    start = world.heldout_start
    ex = build_retrieval_examples(world.engagements, catalog, CFG, start=start)
    start_us = int(pl.Series([start]).dt.epoch("us")[0])
    assert len(ex) > 100 and (ex.time_us >= start_us).all()
    # Only positive actions, one per (user, article), never a post before it exists.
    pos = world.engagements.filter(
        (pl.col("engaged_at") >= start)
        & pl.any_horizontal("favorite", "reply", "repost", "quote", "share", "click")
    )
    assert len(ex) <= pos.select("user_id", "article_id").n_unique()
    assert (catalog.published_us[ex.item] <= ex.time_us).all()
    before = build_retrieval_examples(world.engagements, catalog, CFG, end=start)
    assert (before.time_us < start_us).all()


def test_post_counts_see_everyone_strictly_before_and_the_recent_window(world, catalog):
    """log_post counts every user's positive engagements with the candidate strictly before
    the impression; log_post_recent only those in the POST_RECENT_US before it."""
    t0 = world.engagements["engaged_at"].min()
    article = int(world.articles["article_id"][0])
    hours = [0, 1, 9, 10]  # the last one is at the query time: not counted
    rows = world.engagements.head(len(hours)).with_columns(
        pl.Series("user_id", [101, 102, 103, 104], dtype=world.engagements.schema["user_id"]),
        pl.lit(article).cast(world.engagements.schema["article_id"]).alias("article_id"),
        pl.Series("engaged_at", [t0 + timedelta(hours=h) for h in hours]),
        *[pl.lit(a == "click").alias(a) for a in ACTIONS],
    )
    log = EngagementLog.build(rows, catalog)
    item = catalog.rows(np.array([article]))
    query_us = int(pl.Series([t0 + timedelta(hours=10)]).cast(pl.Int64)[0])
    profile = engagement_profile(log, catalog, np.array([999]), item, np.array([query_us]))
    got = dict(zip(PROFILE_FEATURES, profile[0].tolist(), strict=True))
    assert POST_RECENT_US == 6 * 3_600_000_000
    assert got["log_post"] == pytest.approx(np.log1p(3))  # 0 h, 1 h, 9 h
    assert got["log_post_recent"] == pytest.approx(np.log1p(1))  # 9 h only
    assert got["log_total"] == 0.0  # user 999 engaged with nothing


def test_post_counts_match_a_brute_force_count(world, catalog):
    log = EngagementLog.build(world.engagements, catalog)
    pos = log.positive()
    rng = np.random.default_rng(0)
    item = rng.choice(log.item[pos], 400)
    # Query times at, just after, and around real engagement times.
    time_us = rng.choice(log.time_us[pos], 400) + rng.choice([-1, 0, 1, 3_600_000_000], 400)
    pairs = zip(item, time_us, strict=True)
    brute = np.array([np.sum((log.item[pos] == i) & (log.time_us[pos] < t)) for i, t in pairs])
    np.testing.assert_array_equal(log.positives_before(item, time_us), brute)
