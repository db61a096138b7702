"""What every user's engagements give a feed shard, read where the rows live: the same
first engagements, positive counts, peers and scores as from a frame of every row."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl
import pytest

from feed_dagster.embeddings import LexicalEncoder
from feed_dagster.feeds.shards import users_in_shard
from feed_dagster.metrics.fit_store import fit_name_in_warehouse
from feed_dagster.models.catalog import FeatureConfig, ItemCatalog, post_firsts, to_micros
from feed_dagster.models.engagement_log import EveryonesPositives
from feed_dagster.models.peers import PEER_METHODS
from feed_dagster.models.ranker import RankerConfig, build_ranker
from feed_dagster.models.ranker_data import POST_RECENT_US
from feed_dagster.models.serve import ServingContext, score_candidates, user_vectors_at
from feed_dagster.models.two_tower import TwoTower, TwoTowerConfig
from feed_dagster.models.warehouse_engagements import WarehouseEngagements

FEATURES = FeatureConfig(history_len=16, max_candidates=8)


@pytest.fixture(scope="module")
def stored(tmp_path_factory, tiny_world, make_warehouse):
    path = make_warehouse(tmp_path_factory.mktemp("everyone") / "warehouse.duckdb", tiny_world)
    return WarehouseEngagements(path)


def test_post_counts_equal_the_frames(stored, tiny_world):
    now = to_micros(tiny_world.now)
    times = (now, now - POST_RECENT_US, to_micros(tiny_world.heldout_start))
    counts = stored.post_counts(times)
    want = post_firsts(tiny_world.engagements).sort("article_id")
    assert counts.firsts.sort("article_id").equals(want)
    catalog = ItemCatalog.build(
        tiny_world.articles, LexicalEncoder().encode(tiny_world.articles), FEATURES
    )
    got = EveryonesPositives.from_counts(counts.positives, catalog)
    frame = EveryonesPositives.of(tiny_world.engagements, catalog, times)
    rows = np.arange(1, len(catalog) + 1)
    for at in times:
        t = np.full(len(rows), at)
        assert got.item.count_before(rows, t).sum() > 0
        np.testing.assert_array_equal(
            got.item.count_before(rows, t), frame.item.count_before(rows, t)
        )
        authors = np.unique(catalog.author_id[catalog.author_id >= 0])
        a_t = np.full(len(authors), at)
        np.testing.assert_array_equal(
            got.author.count_before(authors, a_t), frame.author.count_before(authors, a_t)
        )


def test_the_read_is_every_row(stored, tiny_world):
    got = stored.read().sort("user_id", "article_id", "engaged_at")
    want = tiny_world.engagements.sort("user_id", "article_id", "engaged_at")
    assert got.equals(want)


def test_a_fit_is_named_by_its_rows_and_cut(stored, tiny_world, make_warehouse, tmp_path):
    name = stored.fit_name(tiny_world.now, PEER_METHODS)
    assert name == fit_name_in_warehouse(stored.path, tiny_world.now, PEER_METHODS)
    assert name != stored.fit_name(tiny_world.heldout_start, PEER_METHODS)
    assert name != stored.fit_name(tiny_world.now, PEER_METHODS, factors=8)
    # One positive engagement less: another fit.
    first = tiny_world.engagements.filter(pl.col("click")).row(0, named=True)
    fewer = tiny_world.engagements.filter(
        ~((pl.col("user_id") == first["user_id"]) & (pl.col("article_id") == first["article_id"]))
    )
    other = make_warehouse(tmp_path / "fewer.duckdb", replace(tiny_world, engagements=fewer))
    assert WarehouseEngagements(other).fit_name(tiny_world.now, PEER_METHODS) != name


def test_a_shards_context_from_its_own_rows_scores_as_the_whole_context(
    stored, tiny_world, tmp_path
):
    world = tiny_world
    vectors = LexicalEncoder().encode(world.articles)
    mine = users_in_shard(world.users, 1, 4)

    def context(engagements, **kwargs):
        return ServingContext.build(
            world.articles,
            vectors,
            engagements,
            world.follows,
            world.topic_follows,
            FEATURES,
            impressions=world.impressions,
            peers_dir=tmp_path / "peers",
            **kwargs,
        )

    own = world.engagements.filter(pl.col("user_id").is_in(mine.tolist()))
    assert 0 < own.height < world.engagements.height
    whole = context(world.engagements)
    shard = context(own, users=mine, at=world.now, everyone=stored).for_users(mine, world.now)
    np.testing.assert_array_equal(shard.catalog.first_engaged_us, whole.catalog.first_engaged_us)
    assert (whole.catalog.first_engaged_us < whole.catalog.first_engaged_us.max()).any()
    # The shard fitted the peers from the warehouse's rows and named them by its digest.
    assert list((tmp_path / "peers").glob(f"peers-{stored.fit_name(world.now, PEER_METHODS)}*"))
    model = build_ranker(RankerConfig(content_dim=whole.catalog.dim, features=FEATURES), seed=0)
    recent = world.articles.sort("published_at").tail(400)["article_id"].to_numpy()
    users = mine[:40]
    rng = np.random.default_rng(0)
    cands = pl.DataFrame(
        {"user_id": np.repeat(users, 40), "article_id": rng.choice(recent, len(users) * 40)}
    )
    want = score_candidates(model, whole, cands, world.now)
    got = score_candidates(model, shard, cands, world.now)
    for col in [c for c in want.columns if c.startswith("p_")] + ["dwell_seconds"]:
        np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy(), err_msg=col)
    tower = TwoTower(TwoTowerConfig(content_dim=whole.catalog.dim, features=FEATURES)).eval()
    np.testing.assert_array_equal(
        user_vectors_at(tower, shard, mine, world.now),
        user_vectors_at(tower, whole, mine, world.now),
    )
    with pytest.raises(ValueError, match="some users at one time only"):
        context(own, everyone=stored)
