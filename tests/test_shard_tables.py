"""A feed shard, and the feed-quality evaluation, read only their own users' impressions:
same feeds, same exposure counts, same figures."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from feed_dagster.data.warehouse import ENGAGEMENT_USERS, IMPRESSION_TOTALS, read_tables
from feed_dagster.embeddings import LexicalEncoder
from feed_dagster.feeds.build import OPTIONAL_TABLES, PIPELINE_TABLES
from feed_dagster.feeds.evaluation import (
    CHRONOLOGICAL,
    POPULARITY,
    PopularityScorer,
    evaluate_feeds,
    read_evaluation_tables,
    tables_before,
)
from feed_dagster.feeds.model_backends import ModelLocations
from feed_dagster.feeds.precompute import precompute_shard, read_shard_tables
from feed_dagster.feeds.shards import users_in_shard
from feed_dagster.models.catalog import FeatureConfig, ItemCatalog, to_micros
from feed_dagster.models.exposures import ExposureLog
from feed_dagster.models.store import ModelStore
from feed_dagster.pipeline import PopularityRetriever, TopicAffinityScorer

N_SHARDS = 4


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory, tiny_world, make_warehouse):
    return make_warehouse(tmp_path_factory.mktemp("shards") / "warehouse.duckdb", tiny_world)


def test_a_shard_reads_its_users_impressions_and_the_global_count(warehouse, tiny_world):
    tables = read_shard_tables(warehouse, 1, N_SHARDS)
    mine = users_in_shard(tiny_world.users, 1, N_SHARDS)
    imp = tiny_world.impressions
    expected = imp.filter(pl.col("user_id").is_in(mine.tolist()))
    assert 0 < tables["impressions"].height == expected.height < imp.height
    assert set(tables["impressions"]["user_id"].to_list()) <= set(mine.tolist())
    now = tiny_world.now
    totals = tables[IMPRESSION_TOTALS]
    assert totals["now"][0] == now
    assert totals["shown"][0] == imp.filter(pl.col("shown_at") < now).height
    # So are the engagements, and the users they are of are named.
    eng = tiny_world.engagements.filter(pl.col("user_id").is_in(mine.tolist()))
    assert 0 < tables["engagements"].height == eng.height < tiny_world.engagements.height
    assert tables[ENGAGEMENT_USERS]["user_id"].to_list() == sorted(mine.tolist())
    # Of the follows, blocks, mutes and muted keywords, its users' rows (blocks both ways).
    mine_list = mine.tolist()
    follows = tiny_world.follows.filter(pl.col("follower_id").is_in(mine_list))
    assert 0 < tables["follows"].height == follows.height < tiny_world.follows.height
    assert_frame_equal(tables["follows"], follows.sort("follower_id", "followee_id"))
    for name, keys in (
        ("mutes", ["user_id", "muted_id"]),
        ("muted_keywords", ["user_id", "keyword"]),
    ):
        frame = getattr(tiny_world, name)
        want = frame.filter(pl.col("user_id").is_in(mine_list)).sort(keys)
        assert_frame_equal(tables[name], want)
    blocks = tiny_world.blocks.filter(
        pl.col("user_id").is_in(mine_list) | pl.col("blocked_id").is_in(mine_list)
    )
    assert_frame_equal(tables["blocks"], blocks.sort("user_id", "blocked_id"))
    # Of the articles, the window's posts, their parents and thread roots, and the posts
    # in the users' histories; the users table is whole.
    arts = tiny_world.articles
    in_window = arts.filter(
        (pl.col("published_at") > now - tiny_world.candidate_window)
        & (pl.col("published_at") <= now)
    )
    wanted = pl.concat(
        [
            in_window["article_id"],
            in_window["parent_id"].drop_nulls(),
            in_window["conversation_id"].drop_nulls(),
            eng["article_id"],
        ]
    )
    kept = arts.filter(pl.col("article_id").is_in(wanted.to_list())).sort("article_id")
    assert_frame_equal(tables["articles"], kept)
    assert in_window.height < tables["articles"].height < arts.height
    assert tables["users"].height == tiny_world.users.height
    # Without a window (a catalog of long-lived items), every post.
    unwindowed = read_shard_tables(warehouse, 1, N_SHARDS, no_window=True)
    assert unwindowed["articles"].height == arts.height


def test_shard_feeds_equal_feeds_from_the_whole_tables(warehouse, tmp_path):
    """The table fallbacks score with a global impression rate: a shard must not see a
    rate of its own users only."""
    models = ModelLocations(
        ModelStore(tmp_path / "models"), str(tmp_path / "lancedb"), "v", warehouse=warehouse
    )
    whole = read_tables(warehouse, PIPELINE_TABLES, OPTIONAL_TABLES)
    for shard in range(N_SHARDS):
        got = precompute_shard(
            read_shard_tables(warehouse, shard, N_SHARDS),
            shard,
            N_SHARDS,
            models,
            warn=lambda m: None,
        )
        want = precompute_shard(whole, shard, N_SHARDS, models, warn=lambda m: None)
        assert got.feeds.height > 0
        assert got.feeds.equals(want.feeds)


def test_exposure_counts_of_a_shards_users_equal_the_whole_logs(warehouse, tiny_world):
    catalog = ItemCatalog.build(
        tiny_world.articles, LexicalEncoder().encode(tiny_world.articles), FeatureConfig()
    )
    mine = users_in_shard(tiny_world.users, 2, N_SHARDS)
    scoped = ExposureLog.from_warehouse(warehouse, catalog, mine)
    whole = ExposureLog.build(tiny_world.impressions, catalog)
    rng = np.random.default_rng(0)
    n = 500
    user = rng.choice(mine, n)
    item = rng.integers(1, len(catalog) + 1, n)
    t = tiny_world.impressions["shown_at"].cast(pl.Int64).to_numpy()
    time_us = rng.choice(t, n) + rng.integers(0, 3_600_000_000, n)
    topic, author = catalog.topic[item], catalog.author_id[item]
    for name, key in (("shown_topic", topic), ("shown_author", author)):
        got = getattr(scoped, name).before(user, key, time_us)
        np.testing.assert_array_equal(got, getattr(whole, name).before(user, key, time_us))
        assert got.sum() > 0, name
    np.testing.assert_array_equal(scoped.shown_post.keys, whole.shown_post.keys)
    scoped.require(mine)
    others = np.setdiff1d(tiny_world.users["user_id"].to_numpy(), mine)
    with pytest.raises(ValueError, match="exposure counts were built for"):
        scoped.require(others[:3])


def test_the_evaluation_reads_its_sample_and_gives_the_whole_tables_figures(
    warehouse, tiny_world, tmp_path
):
    tables, users, cut = read_evaluation_tables(warehouse, sample_size=40, seed=3)
    assert cut == tiny_world.heldout_start and len(users) == 40
    imp = tiny_world.impressions
    assert 0 < tables["impressions"].height < imp.height
    assert set(tables["impressions"]["user_id"].to_list()) <= set(users.tolist())
    # The scorer's global impression count is the one before the cut, not before `now`.
    totals = tables[IMPRESSION_TOTALS]
    assert totals["now"][0] == cut
    assert totals["shown"][0] == imp.filter(pl.col("shown_at") < cut).height
    # The sample's own engagements (before and after the cut) and follows only.
    eng = tiny_world.engagements.filter(pl.col("user_id").is_in(users.tolist()))
    assert 0 < tables["engagements"].height == eng.height < tiny_world.engagements.height
    assert 0 < tables["follows"].height < tiny_world.follows.height
    assert tables["articles"].height < tiny_world.articles.height
    # The table fallbacks (no model promoted) read what all users share from the warehouse.
    no_models = ModelLocations(
        ModelStore(tmp_path / "models"),
        str(tmp_path / "lancedb"),
        "article_vectors",
        peers_dir=tmp_path / "peers",
        warehouse=warehouse,
    )
    retriever, scorer, _ = no_models.load(
        tables_before(tables, cut), lambda _: None, users, at=cut, engagements_of_users=True
    )
    got = evaluate_feeds(tables, cut, {"fallbacks": lambda known: (retriever, scorer)}, users)
    whole = read_tables(warehouse, PIPELINE_TABLES, OPTIONAL_TABLES)
    fallbacks = (
        PopularityRetriever.from_tables(tables_before(whole, cut)),
        TopicAffinityScorer.from_tables(tables_before(whole, cut)),
    )
    want = evaluate_feeds(
        whole, cut, {"fallbacks": lambda known: fallbacks}, sample_size=40, seed=3
    )
    # Every feed's counts exactly (the popularity feed's from the warehouse's counts, the
    # pool of eligible users too); the recall means up to float summation order.
    assert got["feed"].to_list() == ["fallbacks", CHRONOLOGICAL, POPULARITY]
    assert_frame_equal(got.drop("seconds"), want.drop("seconds"), check_exact=False, rel_tol=1e-9)
    assert got["hits"].sum() > 0 and got["eligible_users"][0] > 40


def test_popularity_counts_of_another_time_are_refused(warehouse):
    tables, _, cut = read_evaluation_tables(warehouse, sample_size=5)
    scorer = PopularityScorer.from_tables(tables)
    scorer.counts_at(cut)
    with pytest.raises(ValueError, match="counted before"):
        scorer.counts_at(cut + timedelta(hours=1))


@pytest.mark.parametrize("when", ["heldout_start", "now"])
def test_exposure_counts_taken_at_one_time_equal_the_whole_logs_at_that_time(
    warehouse, tiny_world, when
):
    """A feed run scores at `now`, an evaluation at its cut: counts taken at that time, one
    per key, answer exactly as the index of every impression does there."""
    at = getattr(tiny_world, when)
    articles = tiny_world.articles.filter(pl.col("published_at") <= at)
    catalog = ItemCatalog.build(articles, LexicalEncoder().encode(articles), FeatureConfig())
    mine = users_in_shard(tiny_world.users, 0, N_SHARDS)
    before = tiny_world.impressions.filter(pl.col("shown_at") < at)
    if when == "heldout_start":
        # The whole log names posts published after the cut, which this catalog lacks.
        with pytest.raises(ValueError, match="not in the articles table"):
            ExposureLog.from_warehouse(warehouse, catalog, mine)
    got = ExposureLog.from_warehouse(warehouse, catalog, mine, at=at)
    want = ExposureLog.build(before, catalog)
    assert got.rows == before.height
    assert got.shown_post.keys.size < want.shown_post.keys.size  # one count per post
    rng = np.random.default_rng(1)
    n = 2_000
    user = rng.choice(mine, n)
    item = rng.integers(1, len(catalog) + 1, n)
    t = np.full(n, to_micros(at))
    topic, author = catalog.topic[item], catalog.author_id[item]
    np.testing.assert_array_equal(got.shown_before(item, t), want.shown_before(item, t))
    assert got.shown_before(item, t).sum() > 0
    everyone = (got.shown_author_everyone, want.shown_author_everyone)
    a = np.maximum(author, 0)
    np.testing.assert_array_equal(everyone[0].count_before(a, t), everyone[1].count_before(a, t))
    for name, key in (("shown_topic", topic), ("shown_author", author)):
        counts = getattr(got, name).before(user, key, t)
        np.testing.assert_array_equal(counts, getattr(want, name).before(user, key, t))
        assert counts.sum() > 0, name
    # Asked at another time, they refuse rather than answer for the wrong one.
    with pytest.raises(ValueError, match="counts were taken at"):
        got.shown_before(item, t - 1)


def test_exposure_counts_at_one_time_for_every_user_equal_the_whole_logs(warehouse, tiny_world):
    at = tiny_world.now
    catalog = ItemCatalog.build(
        tiny_world.articles, LexicalEncoder().encode(tiny_world.articles), FeatureConfig()
    )
    before = tiny_world.impressions.filter(pl.col("shown_at") < at)
    got = ExposureLog.from_warehouse(warehouse, catalog, at=at)
    want = ExposureLog.build(before, catalog)
    assert got.rows == before.height and got.users is None
    rng = np.random.default_rng(4)
    n = 2_000
    user = rng.choice(tiny_world.users["user_id"].to_numpy(), n)
    item = rng.integers(1, len(catalog) + 1, n)
    t = np.full(n, to_micros(at))
    np.testing.assert_array_equal(got.shown_before(item, t), want.shown_before(item, t))
    for name, key in (
        ("shown_topic", catalog.topic[item]),
        ("shown_author", catalog.author_id[item]),
    ):
        counts = getattr(got, name).before(user, key, t)
        np.testing.assert_array_equal(counts, getattr(want, name).before(user, key, t))
        assert counts.sum() > 0, name
