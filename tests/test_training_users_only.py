"""Training on the sampled users' own rows (models.budget's whole_max_engagements): the
same ranker inputs as from every row, with what every user's rows decide counted in the
warehouse."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import polars as pl
import pytest

from feed_dagster.assets.models import MODEL_TABLES
from feed_dagster.data.world_tables import world_from_tables
from feed_dagster.embeddings import LexicalEncoder
from feed_dagster.models.budget import (
    HELDOUT_POST_ENGAGEMENTS,
    TrainingBudget,
    read_training_tables,
)
from feed_dagster.models.catalog import FeatureConfig
from feed_dagster.models.engagement_log import History
from feed_dagster.models.evaluate import evaluation_rows
from feed_dagster.models.ranker_data import RankerData
from feed_dagster.models.train import TrainingMix, prepare_training_data

TABLES = MODEL_TABLES  # what trained_models reads
FEATURES = FeatureConfig(history_len=8, author_buckets=1024, user_buckets=1024)
BUDGET = TrainingBudget(
    train_slates=150,
    valid_slates=40,
    heldout_users=20,
    retrieval_positives=500,
    retrieval_eval_positives=60,
)


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory, tiny_world, make_warehouse):
    return make_warehouse(tmp_path_factory.mktemp("users_only") / "warehouse.duckdb", tiny_world)


@pytest.fixture(scope="module")
def reads(warehouse):
    """(whole read, users-only read) of the same sample."""
    whole = read_training_tables(warehouse, TABLES, BUDGET)
    users_only = read_training_tables(
        warehouse, TABLES, TrainingBudget(**{**BUDGET.to_dict(), "whole_max_engagements": 0})
    )
    return whole, users_only


def _prepare(warehouse, tables, sample, mix):
    tables = dict(tables)
    tables.pop(HELDOUT_POST_ENGAGEMENTS, None)
    world = world_from_tables(tables, tables["world_info"])
    vectors = LexicalEncoder().encode(world.articles)
    data = prepare_training_data(
        world,
        vectors,
        FEATURES,
        mix=mix,
        budget=BUDGET,
        valid_start=sample.valid_start,
        warehouse=warehouse,
        users_only=sample.users_only,
    )
    return world, data


def test_a_users_only_read_holds_the_sampled_users_rows_and_the_heldout_posts(reads, tiny_world):
    (whole, whole_sample), (tables, sample) = reads
    assert not whole_sample.users_only and sample.users_only
    assert whole_sample.engagements_read == tiny_world.engagements.height
    users = set(tables["impressions"]["user_id"].to_list())
    assert sample.users == len(users) < tiny_world.users.height
    # The sampled users' own rows, all of them, and no one else's.
    e = tiny_world.engagements
    theirs = e.filter(pl.col("user_id").is_in(list(users)))
    assert tables["engagements"].height == theirs.height == sample.engagements_read
    assert set(tables["engagements"]["user_id"].to_list()) <= users
    follows = tiny_world.follows.filter(pl.col("follower_id").is_in(list(users)))
    assert 0 < tables["follows"].height == follows.height < tiny_world.follows.height
    # Everyone's rows on the posts the held-out sample shows.
    held = tables["impressions"].filter(pl.col("is_heldout"))
    on_posts = e.filter(pl.col("article_id").is_in(held["article_id"].unique().implode()))
    assert tables[HELDOUT_POST_ENGAGEMENTS].height == on_posts.height
    assert tables[HELDOUT_POST_ENGAGEMENTS]["user_id"].n_unique() > held["user_id"].n_unique()
    # The same sample of impressions either way.
    assert tables["impressions"].equals(whole["impressions"])


def _assert_same_groups(a: RankerData, b: RankerData) -> None:
    assert len(a) == len(b) > 0
    for f in fields(RankerData):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, History):
            for g in fields(History):
                np.testing.assert_array_equal(getattr(x, g.name), getattr(y, g.name), g.name)
        else:
            np.testing.assert_array_equal(x, y, f.name)


def test_the_ranker_reads_the_same_inputs_from_the_sampled_users_rows(warehouse, reads):
    """Histories, labels, per-user counts and follows from the sampled users' rows;
    everyone's per-post and per-author counts and each post's first engagement from the
    warehouse: every group equals the one built from every row. (The training-time peers
    are left out: their cut is a quantile of the log's positives, which the sample's
    approximate.)"""
    (whole, whole_sample), (tables, sample) = reads
    mix = TrainingMix(peer_features=False)
    world_a, a = _prepare(warehouse, whole, whole_sample, mix)
    world_b, b = _prepare(warehouse, tables, sample, mix)
    assert b.everyone == warehouse and a.everyone is None
    assert len(b.log.user) < len(a.log.user)
    np.testing.assert_array_equal(a.catalog.first_engaged_us, b.catalog.first_engaged_us)
    for name in ("ranker_train", "ranker_valid", "ranker_heldout"):
        _assert_same_groups(getattr(a, name), getattr(b, name))
    # The two-tower's positives come from the sampled users.
    assert set(b.retrieval_train.user.tolist()) <= set(tables["impressions"]["user_id"].to_list())
    assert len(b.retrieval_train) == 500
    # A user outside the sample has no rows to answer for.
    outside = np.setdiff1d(a.log.user, b.log.user)[:1]
    with pytest.raises(ValueError, match="holds"):
        b.log.history(outside, np.array([0]), FEATURES)

    # The baselines and the classic peers score the same from everyone's engagements on
    # the held-out posts and the warehouse as from every row.
    rows_a = evaluation_rows(world_a, a)
    with pytest.raises(ValueError, match="heldout_post_engagements"):
        evaluation_rows(world_b, b)
    rows_b = evaluation_rows(world_b, b, heldout_post_engagements=tables[HELDOUT_POST_ENGAGEMENTS])
    got = {r["method"]: r for r in rows_b.others}
    assert [r["method"] for r in rows_a.others] == list(got)
    for r in rows_a.others:
        assert r["auc"] == pytest.approx(got[r["method"]]["auc"], abs=1e-9), r["method"]


def test_the_ranker_trains_with_peers_fitted_in_the_warehouse(warehouse, reads):
    _, (tables, sample) = reads
    _, data = _prepare(warehouse, tables, sample, TrainingMix())
    flags = data.ranker_train.cand_peer[..., -1][data.ranker_train.cand_mask]
    assert 0 < flags.sum() < flags.size  # slates after the first cut see peer scores
    assert data.heldout_classic is not None
    held = data.ranker_heldout.cand_peer[..., -1][data.ranker_heldout.cand_mask]
    assert held.all()


def test_sampling_groups_from_engagements_needs_the_whole_rows(warehouse, reads):
    _, (tables, sample) = reads
    with pytest.raises(ValueError, match="logged slates only"):
        _prepare(warehouse, tables, sample, TrainingMix(logged_slates=False))
