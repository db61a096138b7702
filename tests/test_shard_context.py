"""A feed shard's serving context holds its own users' engagement rows only: the same
histories, counts, user vectors and scores as a context of every user's rows."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from feed_dagster.embeddings import LexicalEncoder
from feed_dagster.feeds.shards import users_in_shard
from feed_dagster.models.catalog import FeatureConfig, ItemCatalog, to_micros
from feed_dagster.models.engagement_log import EngagementLog
from feed_dagster.models.ranker import RankerConfig, build_ranker
from feed_dagster.models.ranker_data import POST_RECENT_US, engagement_profile
from feed_dagster.models.serve import ServingContext, score_candidates, user_vectors_at
from feed_dagster.models.two_tower import TwoTower, TwoTowerConfig
from feed_dagster.world import generate_world, world_config

FEATURES = FeatureConfig(history_len=16, max_candidates=8)


@pytest.fixture(scope="module")
def world():
    return generate_world(world_config("tiny"))


@pytest.fixture(scope="module")
def build(world, tmp_path_factory):
    vectors = LexicalEncoder().encode(world.articles)
    peers_dir = tmp_path_factory.mktemp("peers")

    def context(users=None, at=None):
        return ServingContext.build(
            world.articles,
            vectors,
            world.engagements,
            world.follows,
            world.topic_follows,
            FEATURES,
            impressions=world.impressions,
            peers_dir=peers_dir,
            users=users,
            at=at,
        )

    return context


def _candidates(world, users: np.ndarray, per_user: int = 40) -> pl.DataFrame:
    recent = world.articles.sort("published_at").tail(400)["article_id"].to_numpy()
    rng = np.random.default_rng(0)
    return pl.DataFrame(
        {
            "user_id": np.repeat(users, per_user),
            "article_id": rng.choice(recent, len(users) * per_user),
        }
    )


def test_a_log_of_some_users_counts_as_the_whole_log(world):
    catalog = ItemCatalog.build(
        world.articles, LexicalEncoder().encode(world.articles), FEATURES, world.engagements
    )
    mine = users_in_shard(world.users, 1, 4)
    whole = EngagementLog.build(world.engagements, catalog, world.impressions)
    scoped = EngagementLog.build(world.engagements, catalog, whole.exposures, users=mine)
    assert 0 < len(scoped.user) < len(whole.user)
    rng = np.random.default_rng(2)
    n = 3_000
    user = rng.choice(mine, n)
    item = rng.integers(1, len(catalog) + 1, n).astype(np.int32)
    t = rng.choice(whole.time_us, n) + rng.integers(-3_600_000_000, 3_600_000_000, n)
    np.testing.assert_array_equal(
        engagement_profile(scoped, catalog, user, item, t),
        engagement_profile(whole, catalog, user, item, t),
    )
    got, want = scoped.history(user, t, FEATURES), whole.history(user, t, FEATURES)
    for name in ("item", "actions", "dwell", "age", "user_first_us", "user_bucket"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert got.mask.sum() > 0
    others = np.setdiff1d(world.users["user_id"].to_numpy(), mine)
    with pytest.raises(ValueError, match="engagement log holds"):
        scoped.history(others[:2], t[:2], FEATURES)
    # Counts kept for a feed run's times only (now, and now less the recent window)
    # answer as the whole log does there, and refuse other times.
    now = to_micros(world.now)
    at_now = EngagementLog.build(
        world.engagements,
        catalog,
        whole.exposures,
        users=mine,
        times_us=(now, now - POST_RECENT_US),
    )
    t_now = np.full(n, now)
    np.testing.assert_array_equal(
        engagement_profile(at_now, catalog, user, item, t_now),
        engagement_profile(whole, catalog, user, item, t_now),
    )
    assert engagement_profile(at_now, catalog, user, item, t_now)[:, 5:7].sum() > 0
    with pytest.raises(ValueError, match="counts were taken at"):
        at_now.positives_before(item, t_now - 1)


def test_a_shards_context_scores_as_the_whole_context(world, build):
    mine = users_in_shard(world.users, 2, 4)
    model = build_ranker(RankerConfig(content_dim=build().catalog.dim, features=FEATURES), seed=0)
    assert model.cfg.peer_features
    cands = _candidates(world, mine[:40])
    want = score_candidates(model, build(), cands, world.now)
    shard = build(mine, world.now).for_users(mine, world.now)
    assert shard.engagements.height < world.engagements.height
    assert set(shard.engagements["user_id"].to_list()) <= set(mine.tolist())
    assert 0 < shard.follows.height < world.follows.height
    assert set(shard.follows["follower_id"].to_list()) <= set(mine.tolist())
    got = score_candidates(model, shard, cands, world.now)
    assert got.select("user_id", "article_id").equals(want.select("user_id", "article_id"))
    for col in [c for c in want.columns if c.startswith("p_")] + ["dwell_seconds"]:
        np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy(), err_msg=col)
    tower = TwoTower(TwoTowerConfig(content_dim=shard.catalog.dim, features=FEATURES)).eval()
    np.testing.assert_array_equal(
        user_vectors_at(tower, shard, mine, world.now),
        user_vectors_at(tower, build(), mine, world.now),
    )
    # Peers are fitted on everyone's engagements: at another time the shard's cannot.
    with pytest.raises(ValueError, match="some users' engagements only"):
        shard.peers_at(world.heldout_start)
