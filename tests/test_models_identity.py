"""Hashed id embeddings (post, author, user) and groups sampled from engagements."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from feed_dagster.embeddings import LexicalEncoder
from feed_dagster.models.catalog import NEVER_US, FeatureConfig, ItemCatalog, hash_buckets
from feed_dagster.models.engagement_log import EngagementLog
from feed_dagster.models.layers import CatalogTensors
from feed_dagster.models.ranker import RankerConfig, build_ranker, ranker_batch
from feed_dagster.models.ranker_data import RankerData, build_ranker_data, sampled_slates
from feed_dagster.models.two_tower import TwoTower, TwoTowerConfig
from feed_dagster.world import generate_world, world_config

FEATURES = FeatureConfig(history_len=8, max_candidates=8, post_buckets=4096)


@pytest.fixture(scope="module")
def world():
    return generate_world(world_config("tiny"))


@pytest.fixture(scope="module")
def catalog(world):
    vectors = LexicalEncoder().encode(world.articles)
    return ItemCatalog.build(world.articles, vectors, FEATURES, world.engagements)


def test_ids_hash_to_several_rows_and_rarely_share_all_of_them():
    ids = np.arange(20_000, dtype=np.int64)
    rows = hash_buckets(ids, 4096, seed=3, hashes=2)
    assert rows.shape == (20_000, 2)
    assert rows.min() >= 1 and rows.max() < 4096
    # One hash of 20,000 ids into 4,095 rows collides constantly; both at once almost never.
    one = len(ids) - len(np.unique(rows[:, 0]))
    both = len(ids) - len(np.unique(rows[:, 0] * 4096 + rows[:, 1]))
    assert one > 10_000
    assert both < 0.03 * len(ids)
    assert (hash_buckets(np.array([-1]), 4096, 3, 2) == 0).all()  # null id -> padding row


def test_first_engagement_of_posts_comes_from_the_engagements(world, catalog):
    first = (
        world.engagements.group_by("article_id").agg(pl.col("engaged_at").min()).sort("article_id")
    )
    rows = catalog.rows(first["article_id"].to_numpy())
    expected = first["engaged_at"].cast(pl.Datetime("us")).dt.epoch("us").to_numpy()
    np.testing.assert_array_equal(catalog.first_engaged_us[rows], expected)
    never = np.setdiff1d(catalog.article_ids, first["article_id"].to_numpy())
    assert (catalog.first_engaged_us[catalog.rows(never)] == NEVER_US).all()


def _heldout_data(world, catalog, n=30) -> RankerData:
    imps = world.impressions.filter(pl.col("is_heldout"))
    imps = imps.filter(pl.col("impression_id") < imps["impression_id"].min() + n)
    return build_ranker_data(
        imps, world.engagements, world.follows, world.topic_follows, catalog, FEATURES
    )


def _scores(model, data, cat) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        logits, _ = model(ranker_batch(data), cat)
    return logits


def _with(cat: CatalogTensors, **changes) -> CatalogTensors:
    out = CatalogTensors.__new__(CatalogTensors)
    out.__dict__.update(cat.__dict__)
    out.__dict__.update(changes)
    return out


def test_a_post_never_seen_in_training_ranks_by_content_not_by_its_id(world, catalog):
    data = _heldout_data(world, catalog)
    cutoff = int(data.group_time_us.min())  # every held-out post counts as new to the model
    cfg = RankerConfig(content_dim=catalog.dim, features=FEATURES, id_cutoff_us=cutoff)
    model = build_ranker(cfg, seed=0)
    cat = CatalogTensors(catalog)
    never = _with(cat, first_engaged=torch.full_like(cat.first_engaged, NEVER_US))
    base = _scores(model, data, never)
    assert torch.isfinite(base).all()
    # Another post id (the same content) changes nothing: the id is not used.
    shuffled = _with(never, post=torch.roll(never.post, 1, dims=0))
    torch.testing.assert_close(_scores(model, data, shuffled), base, rtol=0, atol=0)
    # Other content changes the scores: the cold post is ranked by what it says.
    other = _with(never, content=torch.roll(never.content, 1, dims=0))
    assert (_scores(model, data, other) - base).abs().max() > 1e-4


def test_a_post_engaged_before_the_cut_uses_its_id(world, catalog):
    data = _heldout_data(world, catalog)
    cfg = RankerConfig(
        content_dim=catalog.dim, features=FEATURES, id_cutoff_us=int(data.group_time_us.max())
    )
    model = build_ranker(cfg, seed=0)
    cat = CatalogTensors(catalog)
    known = _with(cat, first_engaged=torch.zeros_like(cat.first_engaged))
    shuffled = _with(known, post=torch.roll(known.post, 1, dims=0))
    assert (_scores(model, data, shuffled) - _scores(model, data, known)).abs().max() > 1e-4


def test_the_two_tower_item_vector_of_a_cold_post_ignores_its_id(catalog):
    cfg = TwoTowerConfig(content_dim=catalog.dim, features=FEATURES, id_cutoff_us=10)
    torch.manual_seed(0)
    model = TwoTower(cfg).eval()
    cat = CatalogTensors(catalog)
    rows = torch.arange(1, 50)
    never = _with(cat, first_engaged=torch.full_like(cat.first_engaged, NEVER_US))
    with torch.no_grad():
        a = model.item_vectors(rows, never)
        b = model.item_vectors(rows, _with(never, post=torch.roll(never.post, 1, dims=0)))
        known = _with(cat, first_engaged=torch.zeros_like(cat.first_engaged))
        c = model.item_vectors(rows, known)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-4


def test_sampled_groups_hold_one_positive_and_earlier_negatives(world, catalog):
    log = EngagementLog.build(world.engagements, catalog)
    window = world.candidate_window
    imp, labels = sampled_slates(log, catalog, None, None, 500, 5, 0.75, window, seed=1)
    assert labels.height == imp["impression_id"].n_unique() == 500
    assert (imp["impression_id"] < 0).all()
    pub = world.articles.select("article_id", "published_at")
    rows = imp.join(pub, on="article_id", how="left")
    assert (rows["published_at"] < rows["shown_at"]).all()
    assert (rows["published_at"] >= rows["shown_at"] - window).all()
    # The positive is the labelled post and never one of its own negatives.
    pos = labels.select("impression_id", "article_id").with_columns(is_pos=pl.lit(True))
    marked = imp.join(pos, on=["impression_id", "article_id"], how="left")
    assert (marked.group_by("impression_id").agg(pl.col("is_pos").sum())["is_pos"] == 1).all()
    again, _ = sampled_slates(log, catalog, None, None, 500, 5, 0.75, window, seed=1)
    assert imp.equals(again)

    data = build_ranker_data(
        imp, labels, world.follows, world.topic_follows, catalog, FEATURES, log, logged=False
    )
    assert (data.group_logged == 0).all()
    assert int(data.labels.any(-1).sum()) == 500
    both = RankerData.concat([_heldout_data(world, catalog), data])
    assert len(both) == len(data) + len(_heldout_data(world, catalog))
    assert both.cand_item.shape[1] == max(data.cand_item.shape[1], FEATURES.max_candidates)
