"""The learned retriever/scorer adapters the feed assets plug into the pipeline."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from feed_dagster.embeddings import LexicalEncoder
from feed_dagster.feeds.model_backends import RankerScorer, TwoTowerRetriever, serving_features
from feed_dagster.feeds.shards import shard_of, users_in_shard
from feed_dagster.models.catalog import FeatureConfig
from feed_dagster.models.ranker import RankerConfig, build_ranker
from feed_dagster.models.serve import ServingContext, item_vectors_of, score_candidates
from feed_dagster.models.two_tower import TwoTower, TwoTowerConfig
from feed_dagster.pipeline import run_pipeline
from feed_dagster.vectors import open_vectors, retrieval_frame, write_vectors


@pytest.fixture(scope="module")
def models(tiny_world):
    vectors = LexicalEncoder().encode(tiny_world.articles)
    features = FeatureConfig()
    ranker = build_ranker(RankerConfig(content_dim=vectors.shape[1], features=features))
    tower = TwoTower(TwoTowerConfig(content_dim=vectors.shape[1], features=features)).eval()
    return vectors, ranker, tower


def _context(world, vectors, features):
    return ServingContext.build(
        world.articles, vectors, world.engagements, world.follows, world.topic_follows, features
    )


def test_serving_groups_change_no_score(tiny_world, models):
    vectors, ranker, _ = models
    rng = np.random.default_rng(0)
    cands = pl.DataFrame(
        {
            "user_id": np.repeat(np.arange(12), 300),
            "article_id": rng.choice(tiny_world.articles["article_id"].to_numpy(), 3600),
        }
    )
    trained = score_candidates(
        ranker, _context(tiny_world, vectors, ranker.cfg.features), cands, tiny_world.now
    )
    wide = _context(tiny_world, vectors, serving_features(ranker.cfg.features))
    served = score_candidates(ranker, wide, cands, tiny_world.now)
    assert serving_features(ranker.cfg.features).max_candidates > ranker.cfg.features.max_candidates
    np.testing.assert_allclose(served["p_click"], trained["p_click"], rtol=1e-5, atol=1e-6)


def test_learned_models_drive_the_pipeline(tiny_world, models, tmp_path):
    vectors, ranker, tower = models
    ctx = _context(tiny_world, vectors, serving_features(ranker.cfg.features))
    items = retrieval_frame(item_vectors_of(tower, ctx), tiny_world.articles)
    write_vectors(tmp_path / "lance", "article_vectors", items)
    table = open_vectors(tmp_path / "lance", "article_vectors")
    retriever = TwoTowerRetriever(tower, ctx, table)
    users = tiny_world.users["user_id"].to_numpy()[:20]
    after = tiny_world.now - timedelta(hours=48)
    got = retriever.retrieve(users, tiny_world.now, 50, published_after=after)
    assert set(got["user_id"].to_list()) == set(users.tolist())
    assert got.group_by("user_id").len()["len"].max() <= 50
    published = got.join(tiny_world.articles, on="article_id")["published_at"]
    assert (published >= after).all() and (published <= tiny_world.now).all()

    feeds, stats = run_pipeline(
        tiny_world, users, tiny_world.now, retriever, RankerScorer(ranker, ctx)
    )
    assert stats.scorer == "phoenix_ranker" and stats.retriever == "two_tower+lancedb"
    assert feeds["user_id"].n_unique() == len(users)
    assert set(feeds["source"]) == {"in_network", "out_of_network"}


def test_shards_partition_users_stably(tiny_world):
    ids = tiny_world.users["user_id"].to_numpy()
    parts = [users_in_shard(tiny_world.users, s, 4) for s in range(4)]
    assert sorted(np.concatenate(parts).tolist()) == sorted(ids.tolist())
    assert min(len(p) for p in parts) > len(ids) / 8  # roughly balanced
    np.testing.assert_array_equal(shard_of(ids, 4), shard_of(ids.copy(), 4))
    with pytest.raises(ValueError):
        users_in_shard(tiny_world.users, 4, 4)


@pytest.fixture(scope="module")
def retriever(tiny_world, models, tmp_path_factory):
    vectors, ranker, tower = models
    ctx = _context(tiny_world, vectors, serving_features(ranker.cfg.features))
    items = retrieval_frame(item_vectors_of(tower, ctx), tiny_world.articles)
    uri = tmp_path_factory.mktemp("lance")
    write_vectors(uri, "article_vectors", items)
    return TwoTowerRetriever(tower, ctx, open_vectors(uri, "article_vectors"))


def test_learned_retriever_honours_exclusions_and_fills_k(tiny_world, retriever):
    w, k = tiny_world, 60
    users = w.users["user_id"].to_numpy()[:30]
    after = w.now - timedelta(hours=48)
    plain = retriever.retrieve(users, w.now, k, published_after=after)
    # Exclude half of what each user would get, plus every post by two authors per user.
    exclude = plain.filter(pl.col("retrieval_score").rank("ordinal").over("user_id") % 2 == 0)
    authors = w.articles.select("article_id", "author_id")
    excluded_authors = (
        plain.join(authors, on="article_id")
        .filter(pl.col("author_id").is_not_null())
        .group_by("user_id")
        .agg(pl.col("author_id").unique().sort().head(2))
        .explode("author_id")
    )
    got = retriever.retrieve(
        users,
        w.now,
        k,
        published_after=after,
        exclude=exclude.select("user_id", "article_id"),
        exclude_authors=excluded_authors,
    )
    assert got.join(exclude, on=["user_id", "article_id"], how="semi").is_empty()
    by_author = got.join(authors, on="article_id")
    assert by_author.join(excluded_authors, on=["user_id", "author_id"], how="semi").is_empty()
    sizes = got.group_by("user_id").len()
    assert sizes.height == len(users) and (sizes["len"] == k).all()
    published = got.join(w.articles, on="article_id")["published_at"]
    assert (published > after).all() and (published <= w.now).all()


def test_learned_retriever_without_age_limit_searches_every_post(tiny_world, retriever):
    w = tiny_world
    users = w.users["user_id"].to_numpy()[:10]
    got = retriever.retrieve(users, w.now, 400, published_after=None)
    published = got.join(w.articles, on="article_id")["published_at"]
    assert (published <= w.now).all()
    assert (published <= w.now - timedelta(hours=48)).any()
