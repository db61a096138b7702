"""Serving entry points: candidate scores and user vectors for batches of users (tiny)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import pytest

from feed_dagster.embeddings import LexicalEncoder
from feed_dagster.metrics.classic import ClassicPeers
from feed_dagster.models.catalog import FeatureConfig, ItemCatalog
from feed_dagster.models.peers import PeerFeatures
from feed_dagster.models.ranker import RankerConfig, build_ranker
from feed_dagster.models.serve import (
    ServingContext,
    item_vectors_of,
    score_candidates,
    user_vectors_at,
)
from feed_dagster.models.two_tower import TwoTower, TwoTowerConfig
from feed_dagster.world import generate_world, world_config

FEATURES = FeatureConfig(history_len=16, max_candidates=8)


@pytest.fixture(scope="module")
def setup():
    world = generate_world(world_config("tiny"))
    ctx = ServingContext.from_world(world, LexicalEncoder().encode(world.articles), FEATURES)
    model = build_ranker(RankerConfig(content_dim=ctx.catalog.dim, features=FEATURES), seed=0)
    return world, ctx, model


def _candidates(world, n_users: int = 30, per_user: int = 20) -> pl.DataFrame:
    recent = world.articles.sort("published_at").tail(400)["article_id"].to_numpy()
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(n_users), per_user)
    return pl.DataFrame({"user_id": users, "article_id": rng.choice(recent, len(users))})


def test_scores_are_per_row_and_independent_of_sharding(setup):
    world, ctx, model = setup
    cands = _candidates(world).sample(fraction=1.0, shuffle=True, seed=1)
    full = score_candidates(model, ctx, cands, world.now)
    assert full.height == cands.height
    assert full.select("user_id", "article_id").equals(cands.select("user_id", "article_id"))
    assert {f"p_{a}" for a in model.cfg.actions} | {"dwell_seconds"} <= set(full.columns)
    probs = full.select(pl.col("^p_.*$")).to_numpy()
    assert ((probs > 0) & (probs < 1)).all()
    # Scoring users in two shards, or one candidate at a time, gives the same numbers.
    even = cands.filter(pl.col("user_id") % 2 == 0)
    odd = cands.filter(pl.col("user_id") % 2 == 1)
    sharded = pl.concat([score_candidates(model, ctx, s, world.now) for s in (even, odd)])
    joined = full.join(sharded, on=["user_id", "article_id"], suffix="_s")
    np.testing.assert_allclose(joined["p_click"], joined["p_click_s"], atol=1e-5)
    one = score_candidates(model, ctx, cands.head(1), world.now)
    np.testing.assert_allclose(one["p_click"], full["p_click"].head(1), atol=1e-5)


def test_new_users_and_user_vectors(setup):
    world, ctx, _ = setup
    tt = TwoTower(TwoTowerConfig(content_dim=ctx.catalog.dim, features=FEATURES))
    users = np.array([0, 5, 10**9])
    u = user_vectors_at(tt, ctx, users, world.now)
    assert u.shape == (3, tt.cfg.dim) and np.isfinite(u).all()
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-5)
    items = item_vectors_of(tt, ctx)
    assert items.height == world.articles.height
    assert items["vector"].dtype == pl.Array(pl.Float32, tt.cfg.dim)
    # The vector index builds its item vectors from a catalog alone (article_vectors): a
    # post's first engagement comes from two engagement columns, the vectors are the same.
    engaged = world.engagements.select("article_id", "engaged_at")
    content = LexicalEncoder().encode(world.articles)
    catalog = ItemCatalog.build(world.articles, content, FEATURES, engaged)
    assert item_vectors_of(tt, catalog).equals(items)
    new_user = pl.DataFrame({"user_id": [10**9] * 3, "article_id": [1, 2, 3]})
    scored = score_candidates(
        build_ranker(RankerConfig(content_dim=ctx.catalog.dim, features=FEATURES)),
        ctx,
        new_user,
        world.now,
    )
    assert scored.height == 3 and scored["p_click"].is_finite().all()


def test_a_shared_peer_fit_arrives_with_the_candidate_posts_prepared(tmp_path, setup, monkeypatch):
    world, ctx, model = setup
    cands = _candidates(world)
    posts = np.unique(cands["article_id"].to_numpy())
    prepared = []
    real_prepare = ClassicPeers.prepare

    def prepare(self, article_ids):
        # Recorded with the number of fits already shared: preparing must come first.
        prepared.append((np.asarray(article_ids), len(list(tmp_path.glob("peers-*.pkl")))))
        real_prepare(self, article_ids)

    monkeypatch.setattr(ClassicPeers, "prepare", prepare)
    kw = dict(
        articles=world.articles,
        content_vectors=LexicalEncoder().encode(world.articles),
        engagements=world.engagements,
        follows=world.follows,
        topic_follows=world.topic_follows,
        features=FEATURES,
        impressions=world.impressions,
        peers_dir=tmp_path,
    )
    first = ServingContext.build(**kw, candidate_posts=posts)
    scored = score_candidates(model, first, cands, world.now)
    assert model.cfg.peer_features and len(list(tmp_path.glob("peers-*.pkl"))) == 1
    assert len(prepared) == 1 and prepared[0][1] == 0
    # The candidates, and the posts each user's own peer figures are taken over.
    figures = first.peers_at(world.now).user_stats.items
    np.testing.assert_array_equal(prepared[0][0], np.concatenate([posts, figures]))
    # A second process loads the fit from peers_dir: nothing is prepared or fitted again,
    # and every candidate's row is there.
    second = ServingContext.build(**kw, candidate_posts=posts)
    peers = second.peers_at(world.now).peers
    assert len(prepared) == 1
    rows = peers.item_ids.searchsorted(posts)
    known = peers.item_ids[rows.clip(max=len(peers.item_ids) - 1)] == posts
    assert known.sum() > 0 and peers._knn_done[rows[known]].all()
    # Preparing changes no score: a context without it scores the same.
    plain = ServingContext.build(**{**kw, "peers_dir": None})
    np.testing.assert_allclose(
        scored["p_click"], score_candidates(model, plain, cands, world.now)["p_click"], atol=1e-6
    )


def test_contexts_asking_for_the_same_peers_at_once_fit_them_once(setup, tmp_path, monkeypatch):
    """Shards started together wait for the first one's fit instead of each fitting it."""
    world, _, _ = setup
    fits = []
    real_fit = PeerFeatures.fit

    def slow_fit(engagements, now, store=None):
        fits.append(now)
        time.sleep(0.5)  # long enough for the other context to ask meanwhile
        return real_fit(engagements, now, store)

    monkeypatch.setattr(PeerFeatures, "fit", staticmethod(slow_fit))
    vectors = LexicalEncoder().encode(world.articles)
    contexts = [
        ServingContext.build(
            world.articles,
            vectors,
            world.engagements,
            world.follows,
            world.topic_follows,
            FEATURES,
            peers_dir=tmp_path,
            impressions=world.impressions,
        )
        for _ in range(2)
    ]
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda ctx: ctx.peers_at(world.now), contexts)
    assert fits == [world.now]
    assert np.array_equal(a.peers.item_ids, b.peers.item_ids)
    assert len(list(tmp_path.glob("peers-*.pkl"))) == 1
