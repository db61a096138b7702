"""What every shard of a refresh shares is built by the first shard and loaded by the
others: the same context, the same scores, and no second build."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest

from feed_dagster.data.warehouse import read_tables
from feed_dagster.embeddings import LexicalEncoder
from feed_dagster.feeds.shards import users_in_shard
from feed_dagster.models import shared_inputs as shared_module
from feed_dagster.models.catalog import FeatureConfig, to_micros
from feed_dagster.models.exposures import ExposureLog, ExposureTotals, WarehouseExposures
from feed_dagster.models.peers import PEER_METHODS
from feed_dagster.models.ranker import RankerConfig, build_ranker
from feed_dagster.models.serve import ServingContext, score_candidates, user_vectors_at
from feed_dagster.models.shared_inputs import shared_inputs
from feed_dagster.models.two_tower import TwoTower, TwoTowerConfig
from feed_dagster.models.warehouse_engagements import WarehouseEngagements

FEATURES = FeatureConfig(history_len=16, max_candidates=8)


@pytest.fixture()
def embeddings(tmp_path, tiny_world, make_embeddings):
    """The tiny world's lexical vectors as an embeddings file."""
    return make_embeddings(tmp_path / "article_embeddings.parquet", tiny_world)


def _counting_builds(monkeypatch) -> list[int]:
    calls: list[int] = []
    build = shared_module.build_shared_inputs

    def counted(*args, **kwargs):
        calls.append(1)
        return build(*args, **kwargs)

    monkeypatch.setattr(shared_module, "build_shared_inputs", counted)
    return calls


def test_a_shard_with_the_shared_inputs_scores_as_one_that_builds_its_own(
    warehouse, tiny_world, embeddings, tmp_path
):
    path, vectors = embeddings
    now = tiny_world.now
    mine = users_in_shard(tiny_world.users, 1, 4)
    tables = read_tables(
        warehouse,
        ["articles", "engagements", "follows", "topic_follows", "impressions"],
        users=mine,
        engagements_of_users=True,
    )
    everyone = WarehouseEngagements(warehouse)
    articles = tables["articles"]

    def context(shared):
        return ServingContext.build(
            articles,
            None if shared is not None else vectors,
            tables["engagements"],
            tables["follows"],
            tables["topic_follows"],
            FEATURES,
            peers_dir=tmp_path / "peers",
            impressions=tables["impressions"],
            warehouse=WarehouseExposures(warehouse, mine, now),
            users=mine,
            at=now,
            everyone=everyone,
            shared=shared,
        ).for_users(mine, now)

    shared = shared_inputs(FEATURES, warehouse, now, tmp_path, path)
    assert shared.peers_name == everyone.fit_name(now, PEER_METHODS)
    own, with_shared = context(None), context(shared)
    model = build_ranker(RankerConfig(content_dim=vectors.shape[1], features=FEATURES), seed=0)
    assert model.cfg.peer_features
    recent = articles.sort("published_at").tail(300)["article_id"].to_numpy()
    rng = np.random.default_rng(0)
    cands = pl.DataFrame(
        {"user_id": np.repeat(mine[:40], 30), "article_id": rng.choice(recent, 40 * 30)}
    )
    want = score_candidates(model, own, cands, now)
    got = score_candidates(model, with_shared, cands, now)
    for col in [c for c in want.columns if c.startswith("p_")] + ["dwell_seconds"]:
        np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy(), err_msg=col)
    tower = TwoTower(TwoTowerConfig(content_dim=vectors.shape[1], features=FEATURES)).eval()
    np.testing.assert_array_equal(
        user_vectors_at(tower, with_shared, mine, now), user_vectors_at(tower, own, mine, now)
    )
    # Exposure counts: the users' from their own impressions, everyone's from the totals.
    item = own.log.item[:500]
    t = np.full(len(item), to_micros(now))
    user = own.log.user[:500]
    a, b = own.log.exposures, with_shared.log.exposures
    assert a.rows == b.rows > 0
    np.testing.assert_array_equal(a.shown_before(item, t), b.shown_before(item, t))
    topic = own.catalog.topic[item]
    np.testing.assert_array_equal(
        a.shown_topic.before(user, topic, t), b.shown_topic.before(user, topic, t)
    )
    assert b.shown_topic.before(user, topic, t).sum() > 0


def test_the_first_shard_builds_them_and_the_next_loads_them(
    warehouse, tiny_world, embeddings, tmp_path, monkeypatch
):
    path, _ = embeddings
    calls = _counting_builds(monkeypatch)

    def ask():
        return shared_inputs(FEATURES, warehouse, tiny_world.now, tmp_path, path)

    first = ask()
    second = ask()
    assert len(calls) == 1
    np.testing.assert_array_equal(first.catalog.content, second.catalog.content)
    assert len(list(tmp_path.glob("inputs-*.pkl"))) == 1
    # Any write to the warehouse names new inputs: built again, not reused.
    stat = os.stat(warehouse)
    os.utime(warehouse, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000))
    ask()
    assert len(calls) == 2
    # Another time, another feature config: built again too.
    shared_inputs(FeatureConfig(), warehouse, tiny_world.now, tmp_path, path)
    assert len(calls) == 3
    # Without a store: built, not stored.
    shared_inputs(FEATURES, warehouse, tiny_world.now, None, path)
    assert len(calls) == 4
    assert len(list(tmp_path.glob("inputs-*.pkl"))) == shared_module.KEEP


def test_counts_for_some_users_from_their_frame_equal_the_warehouses(warehouse, tiny_world):
    now = tiny_world.now
    mine = users_in_shard(tiny_world.users, 2, 4)
    vectors = LexicalEncoder().encode(tiny_world.articles)
    catalog = ServingContext.from_world(tiny_world, vectors, FEATURES).catalog
    totals = ExposureTotals.from_warehouse(warehouse, catalog, now)
    frame = tiny_world.impressions.filter(pl.col("user_id").is_in(mine.tolist()))
    got = ExposureLog.for_users_at(frame, catalog, mine, now, totals)
    want = ExposureLog.from_warehouse(warehouse, catalog, mine, at=now)
    assert got.rows == want.rows
    for name in ("shown_post", "shown_author_everyone"):
        np.testing.assert_array_equal(getattr(got, name).keys, getattr(want, name).keys)
        np.testing.assert_array_equal(getattr(got, name).counts, getattr(want, name).counts)
    for name in ("shown_topic", "shown_author"):
        g, w = getattr(got, name), getattr(want, name)
        np.testing.assert_array_equal(g.pairs, w.pairs)
        np.testing.assert_array_equal(g.index.counts, w.index.counts)
        assert len(g.pairs) > 0
    with pytest.raises(ValueError, match="totals taken at"):
        ExposureLog.for_users_at(frame, catalog, mine, tiny_world.heldout_start, totals)
