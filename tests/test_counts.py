"""Counts asked at one time are computed once per distinct key: the same counts as asking
query by query (models.counts, the feature path of a feed batch)."""

from __future__ import annotations

import numpy as np
import pytest

from feed_dagster.embeddings import LexicalEncoder
from feed_dagster.models.catalog import FeatureConfig, ItemCatalog, to_micros
from feed_dagster.models.counts import DISTINCT_MIN, PairCounter, time_index
from feed_dagster.models.engagement_log import EngagementLog
from feed_dagster.models.ranker_data import engagement_profile
from feed_dagster.sorted_search import distinct, search_sorted

RNG = np.random.default_rng(3)


@pytest.mark.parametrize("span", [50, 10**12])  # a table of the range, then a sort
def test_distinct_is_np_unique(span):
    """Dense ids are indexed through a table of their range, sparse ones by sorting: both
    give np.unique's sorted values and inverse."""
    key = RNG.integers(-5, span, 20_000)
    values, inverse = distinct(key)
    want_values, want_inverse = np.unique(key, return_inverse=True)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(inverse, want_inverse)
    assert distinct(np.zeros(0, np.int64))[0].size == 0


def test_ascending_needles_are_searched_as_they_are():
    hay = np.sort(RNG.integers(0, 10**9, 2**19))
    needles = np.sort(RNG.integers(0, 10**9, 10_000))
    for side in ("left", "right"):
        got = search_sorted(hay, needles, side)
        np.testing.assert_array_equal(got, np.searchsorted(hay, needles, side))


def _brute(key_ev, t_ev, key, t):
    return np.array(
        [np.sum((key_ev == k) & (t_ev < tt)) for k, tt in zip(key, t, strict=True)], np.float32
    )


def test_one_time_counts_equal_the_per_query_counts():
    key_ev = RNG.integers(0, 300, 5_000)
    t_ev = RNG.integers(0, 1_000, 5_000)
    index = time_index(key_ev, t_ev)
    key = RNG.integers(0, 320, DISTINCT_MIN + 100)  # some keys never seen
    now = np.full(key.size, 600)
    np.testing.assert_array_equal(index.count_before(key, now), _brute(key_ev, t_ev, key, now))
    mixed = RNG.integers(0, 1_000, key.size)  # not one time: the per-query path
    np.testing.assert_array_equal(index.count_before(key, mixed), _brute(key_ev, t_ev, key, mixed))


def test_pair_counts_at_one_time_with_unknown_second_ids():
    a_ev, b_ev = RNG.integers(0, 40, 4_000), RNG.integers(0, 30, 4_000)
    t_ev = RNG.integers(0, 1_000, 4_000)
    counter = PairCounter.build(a_ev, b_ev, t_ev)
    a, b = RNG.integers(0, 45, DISTINCT_MIN * 2), RNG.integers(-1, 30, DISTINCT_MIN * 2)
    now = np.full(a.size, 700)
    pair_ev = a_ev * 1_000 + b_ev
    want = _brute(pair_ev, t_ev, a * 1_000 + b, now)
    want[b < 0] = 0.0  # an unknown id counts nothing
    np.testing.assert_array_equal(counter.before(a, b, now), want)


def test_a_feed_batch_profile_equals_the_profile_row_by_row(tiny_world):
    """engagement_profile over a batch at one time (distinct keys) and over the same rows
    in chunks too small for that path."""
    world = tiny_world
    catalog = ItemCatalog.build(
        world.articles, LexicalEncoder().encode(world.articles), FeatureConfig()
    )
    log = EngagementLog.build(world.engagements, catalog, world.impressions)
    users = world.users["user_id"].to_numpy()
    n = DISTINCT_MIN + 500
    user = RNG.choice(users, n)
    item = RNG.integers(1, len(catalog.article_ids) + 1, n)
    now = np.full(n, to_micros(world.now))
    batch = engagement_profile(log, catalog, user, item, now)
    chunks = [
        engagement_profile(log, catalog, user[s : s + 1000], item[s : s + 1000], now[s : s + 1000])
        for s in range(0, n, 1000)
    ]
    assert batch[:, 0].max() > 0  # some user-topic counts are not zero
    np.testing.assert_array_equal(batch, np.concatenate(chunks))
