"""Exposure counts, author profiles and the affinity inputs of the ranker (tiny world)."""

from __future__ import annotations

from datetime import timedelta

import duckdb
import numpy as np
import polars as pl
import pytest
import torch

from feed_dagster.embeddings import LexicalEncoder
from feed_dagster.models.catalog import (
    AUTHOR_TOPICS,
    FeatureConfig,
    ItemCatalog,
    author_profiles,
    author_topic_profiles,
)
from feed_dagster.models.counts import PairCounter, attribute_index, time_index
from feed_dagster.models.engagement_log import EngagementLog
from feed_dagster.models.exposures import ExposureLog
from feed_dagster.models.layers import CatalogTensors
from feed_dagster.models.ranker import RankerConfig, affinity_inputs, build_ranker, load_ranker
from feed_dagster.models.ranker_data import (
    PROFILE_FEATURES,
    PROFILE_FEATURES_V1,
    engagement_profile,
)
from feed_dagster.world import generate_world, world_config

CFG = FeatureConfig(history_len=8, max_candidates=16)


@pytest.fixture(scope="module")
def world():
    return generate_world(world_config("tiny"))


@pytest.fixture(scope="module")
def vectors(world):
    return LexicalEncoder().encode(world.articles)


@pytest.fixture(scope="module")
def catalog(world, vectors):
    return ItemCatalog.build(world.articles, vectors, CFG)


def _queries(world, catalog, n: int = 300):
    rng = np.random.default_rng(1)
    imp = world.impressions.sample(n, seed=1)
    user = imp["user_id"].to_numpy()
    item = catalog.rows(imp["article_id"].to_numpy())
    # At, just after and an hour after real impression times.
    time_us = imp["shown_at"].cast(pl.Int64).to_numpy() + rng.choice([0, 1, 3_600_000_000], n)
    return user, item, time_us


def _shown(profile: np.ndarray, name: str) -> np.ndarray:
    return np.expm1(profile[:, PROFILE_FEATURES.index(name)]).round()


def test_exposure_counts_match_a_brute_force_count(world, catalog):
    log = EngagementLog.build(world.engagements, catalog, world.impressions)
    user, item, time_us = _queries(world, catalog)
    got = engagement_profile(log, catalog, user, item, time_us)
    imp = world.impressions
    ex_user = imp["user_id"].to_numpy()
    ex_item = catalog.rows(imp["article_id"].to_numpy())
    ex_time = imp["shown_at"].cast(pl.Int64).to_numpy()
    topic, author = catalog.topic[ex_item], catalog.author_id[ex_item]
    pos = log.positive()
    pos_author = catalog.author_id[log.item[pos]]
    pos_topic = catalog.topic[log.item[pos]]
    for k in range(len(user)):
        before = ex_time < time_us[k]
        mine = before & (ex_user == user[k])
        t, a = catalog.topic[item[k]], catalog.author_id[item[k]]
        row = got[k : k + 1]
        assert _shown(row, "log_shown_topic")[0] == np.sum(mine & (topic == t))
        assert _shown(row, "log_shown_author")[0] == np.sum(mine & (author == a))
        assert _shown(row, "log_shown_post")[0] == np.sum(before & (ex_item == item[k]))
        assert _shown(row, "log_author_everyone_shown")[0] == np.sum(before & (author == a))
        engaged = np.sum((log.time_us[pos] < time_us[k]) & (pos_author == a))
        assert _shown(row, "log_author_everyone")[0] == engaged
        # The user's own positive engagements: in total, on the topic, with the author.
        mine_pos = (log.user[pos] == user[k]) & (log.time_us[pos] < time_us[k])
        assert _shown(row, "log_total")[0] == np.sum(mine_pos)
        assert _shown(row, "log_topic")[0] == np.sum(mine_pos & (pos_topic == t))
        assert _shown(row, "log_author")[0] == np.sum(mine_pos & (pos_author == a))
    # The counts are not trivially zero on this world.
    for name in ("log_shown_topic", "log_shown_post", "log_author_everyone"):
        assert _shown(got, name).sum() > 0, name


def test_exposures_at_or_after_the_query_change_nothing(world, catalog):
    user, item, time_us = _queries(world, catalog)
    t_cut = int(np.median(time_us))
    keep = time_us <= t_cut
    imps = world.impressions
    late = pl.col("shown_at").cast(pl.Int64) >= t_cut
    rng = np.random.default_rng(0)
    n_late = imps.filter(late).height
    # Later impressions shown to other users and posts, and new ones exactly at the cut.
    perturbed = pl.concat(
        [
            imps.filter(~late),
            imps.filter(late).with_columns(
                pl.Series("user_id", rng.permutation(imps.filter(late)["user_id"].to_numpy())),
                pl.Series(
                    "article_id", rng.permutation(imps.filter(late)["article_id"].to_numpy())
                ),
            ),
            imps.head(50).with_columns(
                pl.lit(t_cut).cast(pl.Datetime("us")).alias("shown_at"),
                pl.Series("user_id", user[:50]),
            ),
        ]
    )
    assert n_late > 0
    a = EngagementLog.build(world.engagements, catalog, imps)
    b = EngagementLog.build(world.engagements, catalog, perturbed)
    pa = engagement_profile(a, catalog, user[keep], item[keep], time_us[keep])
    pb = engagement_profile(b, catalog, user[keep], item[keep], time_us[keep])
    np.testing.assert_array_equal(pa, pb)
    # Later queries do see the change.
    later = time_us > t_cut + 3_600_000_000
    qa = engagement_profile(a, catalog, user[later], item[later], time_us[later])
    qb = engagement_profile(b, catalog, user[later], item[later], time_us[later])
    assert not np.array_equal(qa, qb)


def test_exposure_indexes_built_in_duckdb_equal_the_numpy_ones(world, catalog, tmp_path):
    """The impression log is indexed in DuckDB (it is too big to load at scale); the keys
    must be exactly those numpy builds from the same rows, from a frame or the warehouse."""
    imp = world.impressions
    user = imp["user_id"].to_numpy()
    item = catalog.rows(imp["article_id"].to_numpy())
    time_us = imp["shown_at"].cast(pl.Int64).to_numpy()
    from_frame = ExposureLog.build(imp, catalog)
    path = tmp_path / "w.duckdb"
    with duckdb.connect(str(path)) as con:
        con.register("frame", imp.to_arrow())
        con.execute("create table impressions as select * from frame")
    from_warehouse = ExposureLog.from_warehouse(path, catalog)
    expected = {
        "shown_post": time_index(item, time_us),
        "shown_author_everyone": attribute_index(catalog.author_id, item, time_us),
    }
    pairs = {
        "shown_topic": PairCounter.of_attribute(catalog.topic, user, item, time_us),
        "shown_author": PairCounter.of_attribute(catalog.author_id, user, item, time_us),
    }
    for log in (from_frame, from_warehouse):
        assert log.rows == imp.height
        for name, want in expected.items():
            got = getattr(log, name)
            assert got.layout == want.layout, name
            np.testing.assert_array_equal(got.keys, want.keys)
        for name, want in pairs.items():
            got = getattr(log, name)
            np.testing.assert_array_equal(got.pairs, want.pairs)
            assert got.index.layout == want.index.layout, name
            np.testing.assert_array_equal(got.index.keys, want.index.keys)
    assert from_frame.shown_post.keys.size == imp.height


def test_impressions_of_unknown_posts_are_refused(world, catalog, tmp_path):
    bad = world.impressions.head(3).with_columns(pl.lit(-77).cast(pl.Int64).alias("article_id"))
    impressions = pl.concat([world.impressions, bad])
    with pytest.raises(ValueError, match="not in the articles table.*-77"):
        ExposureLog.build(impressions, catalog)
    # Counted at one time (serving, evaluation), from the warehouse: refused the same way.
    path = tmp_path / "w.duckdb"
    with duckdb.connect(str(path)) as con:
        con.register("frame", impressions.to_arrow())
        con.execute("create table impressions as select * from frame")
    with pytest.raises(ValueError, match="not in the articles table.*-77"):
        ExposureLog.from_warehouse(path, catalog, at=world.now)


def test_without_impressions_exposure_counts_are_zero(world, catalog):
    log = EngagementLog.build(world.engagements, catalog)
    user, item, time_us = _queries(world, catalog, 50)
    got = engagement_profile(log, catalog, user, item, time_us)
    for name in ("log_shown_topic", "log_shown_author", "log_shown_post"):
        assert not got[:, PROFILE_FEATURES.index(name)].any()
    assert not got[:, PROFILE_FEATURES.index("log_author_everyone_shown")].any()


def test_author_profiles_average_the_posts_before_the_cut(world, vectors):
    cut = world.articles["published_at"].sort()[world.articles.height // 2]
    cat = ItemCatalog.build(world.articles, vectors, CFG, profile_before=cut)
    author = int(world.articles["author_id"].drop_nulls().mode()[0])
    posts = world.articles.with_row_index("i").filter(
        (pl.col("author_id") == author) & (pl.col("published_at") < cut)
    )
    expected = vectors[posts["i"].to_numpy()].sum(0)
    expected = expected / np.linalg.norm(expected)
    row = cat.author_row[cat.rows(posts["article_id"].head(1).to_numpy())[0]]
    np.testing.assert_allclose(cat.author_content[row], expected, atol=1e-5)
    # A later post of the same author changes nothing; an earlier cut does.
    early = ItemCatalog.build(world.articles, vectors, CFG, profile_before=cut - timedelta(days=2))
    assert not np.allclose(early.author_content[early.author_row[1:]], cat.author_content[row])
    # Unknown authors get the zero profile.
    rows, profile = author_profiles(
        np.array([-1, 3, 3, -1]), np.eye(4, dtype=np.float32), np.ones(4, bool)
    )
    assert rows.tolist() == [0, 1, 1, 0]
    np.testing.assert_allclose(profile[1], [0, 0.70710677, 0.70710677, 0])
    assert not profile[0].any()


def test_affinity_inputs_are_cosines_with_the_history_mean(world, catalog):
    tensors = CatalogTensors(catalog)
    hist = torch.tensor([[1, 2, 0], [0, 0, 0]])
    cand = torch.tensor([[3, 4], [3, 4]])
    got = affinity_inputs(hist, cand, tensors)
    user = tensors.content[1] + tensors.content[2]
    user = user / user.norm()
    post = tensors.content[3] / tensors.content[3].norm()
    assert got[0, 0, 0].item() == pytest.approx(float(user @ post), abs=1e-5)
    author = tensors.author_content[tensors.author_row[3]]
    assert got[0, 0, 1].item() == pytest.approx(float(user @ author), abs=1e-5)
    # An empty history has no taste to compare with.
    assert not got[1].any()


def test_rankers_stored_before_the_new_inputs_still_load(catalog):
    cfg = RankerConfig(content_dim=catalog.dim, features=CFG)
    old = cfg.to_dict()
    del old["profile_inputs"], old["affinity_features"]
    loaded = RankerConfig.from_dict(old)
    assert loaded.profile_inputs == PROFILE_FEATURES_V1 and not loaded.affinity_features
    model = build_ranker(loaded, seed=0)
    assert model.profile.in_features == len(PROFILE_FEATURES_V1)
    again = load_ranker(model.state_dict(), {**old, "kind": "ranker"})
    assert again.affinity is None
    with pytest.raises(ValueError, match="unknown profile inputs"):
        RankerConfig(content_dim=4, profile_inputs=("nope",))


def test_author_topic_affinity_weights_the_users_topic_shares_by_the_authors(world, catalog):
    log = EngagementLog.build(world.engagements, catalog)
    user, item, time_us = _queries(world, catalog, 120)
    got = engagement_profile(log, catalog, user, item, time_us)[
        :, PROFILE_FEATURES.index("author_topic_affinity")
    ]
    pos = log.positive()
    p_user, p_time = log.user[pos], log.time_us[pos]
    p_topic = catalog.topic[log.item[pos]]
    for k in range(len(user)):
        mine = (p_user == user[k]) & (p_time < time_us[k])
        author = catalog.author_id[item[k]]
        posts = catalog.author_id[1:] == author
        topics, counts = np.unique(catalog.topic[1:][posts], return_counts=True)
        top = np.lexsort((topics, -counts))[:AUTHOR_TOPICS]
        expected = sum(
            counts[j] / counts.sum() * np.sum(mine & (p_topic == topics[j])) / (mine.sum() + 1)
            for j in top
        )
        assert got[k] == pytest.approx(expected, abs=1e-5)
    assert got.max() > 0


def test_author_topic_profiles_keep_the_main_topics():
    rows = np.array([0, 1, 1, 1, 1, 2, 2, 1])
    topic = np.array([5, 7, 7, 3, 9, 4, -1, 3])
    topics, share = author_topic_profiles(rows, topic, np.ones(8, bool), 3)
    assert topics[1].tolist() == [3, 7, 9]  # 3 and 7 twice each (tie: smaller id), 9 once
    np.testing.assert_allclose(share[1], [0.4, 0.4, 0.2])
    assert topics[2].tolist() == [4, -1, -1] and share[2].tolist() == [1.0, 0.0, 0.0]
    assert topics[0].tolist() == [-1, -1, -1]  # no author
