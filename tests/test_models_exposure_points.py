"""Exposure counts kept at the points a trainer reads them: the same numbers, in less memory."""

from __future__ import annotations

import duckdb
import numpy as np
import polars as pl
import pytest

from feed_dagster.data.world_tables import world_from_tables
from feed_dagster.embeddings import LexicalEncoder
from feed_dagster.models import exposures, train
from feed_dagster.models.budget import TrainingBudget, read_training_tables
from feed_dagster.models.catalog import FeatureConfig, ItemCatalog
from feed_dagster.models.counts import CountsAtPoints, TimeIndex, time_index
from feed_dagster.models.exposures import ExposureLog
from feed_dagster.models.ranker_data import PROFILE_FEATURES
from feed_dagster.models.train import prepare_training_data

TABLES = ["world_info", "users", "articles", "engagements", "impressions", "impression_truth"]
FEATURES = FeatureConfig(history_len=8, author_buckets=1024, user_buckets=1024)


def _events(n: int = 5_000, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 40, n), rng.integers(0, 9, n), rng.integers(10**6, 10**6 + 5_000, n)


def test_counts_at_points_equal_the_index_there_and_refuse_other_points():
    key, _, t = _events()
    index = time_index(key, t)
    rng = np.random.default_rng(1)
    q_key = rng.integers(0, 45, 300)  # some keys without events
    q_t = rng.integers(10**6 - 10, 10**6 + 5_010, 300)  # some before and after every event
    at = CountsAtPoints.of(index, q_key, q_t)
    np.testing.assert_array_equal(at.count_before(q_key, q_t), index.count_before(q_key, q_t))
    assert at.points.size <= 300
    with pytest.raises(ValueError, match="fixed points only"):
        at.count_before(np.array([q_key[0]]), np.array([q_t[0] + 10**7]))


@pytest.mark.parametrize("key_scale", [1, 2**50])  # 2**50: a layout coarser than 1 us
def test_counts_at_points_from_streamed_events_equal_an_index_of_them(monkeypatch, key_scale):
    monkeypatch.setattr(exposures, "_EVENT_BATCH", 1_000)  # several batches
    key, _, t = _events(20_000)
    key = key * key_scale
    con = duckdb.connect()
    con.register("events", pl.DataFrame({"k": key, "t": t}).to_arrow())
    rng = np.random.default_rng(3)
    # Asked: keys with events, keys without, times before, among and after the events;
    # keys 0..9 are never asked, so their events must count nowhere.
    q_key = rng.integers(10, 45, 500) * key_scale
    q_t = rng.integers(10**6 - 10, 10**6 + 5_010, 500)
    bounds = (key.size, int(t.min()), int(t.max()))
    counts = exposures.PointCounts(q_key, q_t, bounds)
    exposures.stream_counts(con, f"select {counts.event('k', 't')} from events", [counts])
    at = counts.counts()
    lay = at.layout
    assert (lay.resolution > 1) == (key_scale > 1)
    index = TimeIndex(np.sort(key * lay.step + (t - lay.t0) // lay.resolution), lay)
    want = index.count_before(q_key, q_t)
    np.testing.assert_array_equal(at.count_before(q_key, q_t), want)
    assert want.min() == 0 and want.max() > 100
    with pytest.raises(ValueError, match="fixed points only"):
        at.count_before(np.array([q_key[0]]), np.array([q_t[0] + 10**7]))
    # No points (say, no post with a known author): nothing to count, nothing to answer.
    none = exposures.PointCounts(np.zeros(0, np.int64), np.zeros(0, np.int64), bounds)
    exposures.stream_counts(con, f"select {none.event('k', 't')} from events", [none])
    assert none.counts().count_before(np.zeros(0, np.int64), np.zeros(0, np.int64)).size == 0


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory, tiny_world, make_warehouse):
    return make_warehouse(tmp_path_factory.mktemp("points") / "warehouse.duckdb", tiny_world)


def test_every_count_at_the_points_equals_the_whole_logs_there(warehouse, tiny_world):
    articles = tiny_world.articles
    vectors = np.zeros((articles.height, 4), np.float32)
    catalog = ItemCatalog.build(articles, vectors, FEATURES)
    slates = tiny_world.impressions.filter(pl.col("impression_id") % 3 == 0)
    p = train.exposure_points(slates, catalog)
    users = np.unique(p.user)
    at = ExposureLog.from_warehouse(warehouse, catalog, users, points=p)
    whole = ExposureLog.from_warehouse(warehouse, catalog, users)
    author, topic = catalog.author_id[p.item], catalog.topic[p.item].astype(np.int64)
    author_of = np.maximum(author, 0)
    pairs = [
        (at.shown_post.count_before, whole.shown_post.count_before, (p.item,)),
        (
            at.shown_author_everyone.count_before,
            whole.shown_author_everyone.count_before,
            (author_of,),
        ),
        (at.shown_topic.before, whole.shown_topic.before, (p.user, topic)),
        (at.shown_author.before, whole.shown_author.before, (p.user, author)),
    ]
    for got, want, keys in pairs:
        expected = want(*keys, p.time_us)
        np.testing.assert_array_equal(got(*keys, p.time_us), expected)
        assert expected.max() > 0 and expected.min() == 0
    assert at.rows == whole.rows == tiny_world.impressions.height


def test_ranker_groups_are_the_same_with_counts_kept_at_their_points(warehouse, monkeypatch):
    budget = TrainingBudget(train_slates=150, valid_slates=40, heldout_users=20)
    tables, sample = read_training_tables(warehouse, TABLES, budget)
    world = world_from_tables(tables, tables["world_info"])
    vectors = LexicalEncoder().encode(world.articles)

    def prepare():
        return prepare_training_data(
            world,
            vectors,
            FEATURES,
            budget=budget,
            valid_start=sample.valid_start,
            warehouse=warehouse,
        )

    at_points = prepare()
    assert isinstance(at_points.log.exposures.shown_post, CountsAtPoints)
    monkeypatch.setattr(train, "_samples_groups", lambda mix, split: True)
    whole = prepare()
    assert not isinstance(whole.log.exposures.shown_post, CountsAtPoints)
    for name in ("ranker_train", "ranker_valid", "ranker_heldout"):
        a, b = getattr(at_points, name), getattr(whole, name)
        assert len(a) > 0
        np.testing.assert_array_equal(a.cand_profile, b.cand_profile)
        np.testing.assert_array_equal(a.cand_item, b.cand_item)
        assert a.cand_profile[..., PROFILE_FEATURES.index("log_shown_post")].any()
