"""Training budgets: sampled slates and users read from DuckDB, and training on the sample."""

from __future__ import annotations

from dataclasses import replace

import duckdb
import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from feed_dagster.data.world_tables import world_from_tables
from feed_dagster.embeddings import LexicalEncoder
from feed_dagster.memory import StepMemory, rss_mib
from feed_dagster.models.budget import TrainingBudget, read_training_tables
from feed_dagster.models.catalog import FeatureConfig
from feed_dagster.models.retrieval_data import temporal_split
from feed_dagster.models.train import (
    TrainConfig,
    TrainingMix,
    prepare_training_data,
    train_ranker,
)

TABLES = ["world_info", "users", "articles", "engagements", "impressions", "impression_truth"]
FEATURES = FeatureConfig(history_len=8, author_buckets=1024, user_buckets=1024)


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory, tiny_world, make_warehouse):
    """One warehouse for the module: these tests only read it."""
    return make_warehouse(tmp_path_factory.mktemp("budget") / "warehouse.duckdb", tiny_world)


def _periods(impressions: pl.DataFrame, valid_start) -> dict[str, set[int]]:
    split = temporal_split(impressions, 0.1, valid_start)
    return {
        name: set(getattr(split, name)["impression_id"].to_list())
        for name in ("train", "valid", "heldout")
    }


def test_a_world_within_the_budget_is_read_whole_and_split_as_before(warehouse, tiny_world):
    tables, sample = read_training_tables(warehouse, TABLES, TrainingBudget())
    assert tables["impressions"].height == tiny_world.impressions.height
    assert tables["impression_truth"].height == tiny_world.impression_truth.height
    assert sample.kept == sample.available
    # The same periods as the unsampled split.
    assert _periods(tables["impressions"], sample.valid_start) == _periods(
        tiny_world.impressions, None
    )


def test_the_training_read_leaves_the_posts_words_in_the_warehouse(warehouse, tiny_world):
    """trained_models reads the articles without their texts, and trains on the same
    frame as with them (the words are nulls once conformed, and nothing reads them)."""
    from feed_dagster.assets.models import TRAINING_COLUMNS

    tables, _ = read_training_tables(warehouse, TABLES, TrainingBudget(), TRAINING_COLUMNS)
    assert {"title", "text", "topic_name"}.isdisjoint(tables["articles"].columns)
    whole, _ = read_training_tables(warehouse, TABLES, TrainingBudget())
    assert_frame_equal(tables["articles"], whole["articles"].drop("title", "text", "topic_name"))
    world = world_from_tables(tables, tables["world_info"])
    assert world.articles.height == tiny_world.articles.height
    assert world.articles["text"].null_count() == world.articles.height


def test_a_small_budget_samples_whole_impressions_and_users(warehouse, tiny_world):
    budget = TrainingBudget(train_slates=200, valid_slates=30, heldout_users=25)
    tables, sample = read_training_tables(warehouse, TABLES, budget)
    imp = tables["impressions"]
    full = _periods(tiny_world.impressions, None)
    got = _periods(imp, sample.valid_start)
    assert len(got["train"]) == 200 and got["train"] <= full["train"]
    assert len(got["valid"]) == 30 and got["valid"] <= full["valid"]
    assert sample.kept["train"] == 200 and sample.available["train"] == len(full["train"])
    # Whole impressions: every row of a sampled impression is there.
    rows = tiny_world.impressions.filter(
        pl.col("impression_id").is_in(imp["impression_id"].implode())
    )
    assert rows.height == imp.height
    # Held out: every held-out impression of exactly 25 users.
    held = imp.filter(pl.col("is_heldout"))
    users = held["user_id"].unique()
    assert users.len() == 25
    all_theirs = tiny_world.impressions.filter(
        pl.col("is_heldout") & pl.col("user_id").is_in(users.implode())
    )
    assert held.height == all_theirs.height
    truth_ids = set(tables["impression_truth"]["impression_id"].to_list())
    assert truth_ids <= set(imp["impression_id"].to_list())
    assert tiny_world.impressions.height > imp.height
    # Deterministic per seed; another seed draws another sample.
    again, _ = read_training_tables(warehouse, TABLES, budget)
    assert again["impressions"].equals(imp)
    other, _ = read_training_tables(warehouse, TABLES, replace(budget, seed=1))
    assert set(other["impressions"]["impression_id"]) != set(imp["impression_id"])


def test_each_period_keeps_its_first_impressions_by_the_seeded_hash(warehouse, tiny_world):
    budget = TrainingBudget(train_slates=200, valid_slates=30, heldout_users=25, seed=3)
    tables, sample = read_training_tables(warehouse, TABLES, budget)
    got = _periods(tables["impressions"], sample.valid_start)
    # The definition, spelled out by numbering each period's impressions in hash order.
    con = duckdb.connect()
    full = _periods(tiny_world.impressions, None)
    for period, n in (("train", 200), ("valid", 30)):
        ids = pl.DataFrame({"impression_id": sorted(full[period])})
        con.register("ids", ids.to_arrow())
        first = con.execute(
            "select impression_id from (select impression_id, row_number() over "
            "(order by hash(impression_id, 3), impression_id) as r from ids) where r <= $n",
            {"n": n},
        ).fetchall()
        assert got[period] == {r[0] for r in first}


def test_models_train_on_a_sample_within_its_budget(warehouse, tiny_world):
    budget = TrainingBudget(
        train_slates=150,
        valid_slates=40,
        heldout_users=20,
        retrieval_positives=500,
        retrieval_eval_positives=60,
    )
    tables, sample = read_training_tables(warehouse, TABLES, budget)
    world = world_from_tables(tables, tables["world_info"])
    vectors = LexicalEncoder().encode(world.articles)
    data = prepare_training_data(
        world,
        vectors,
        FEATURES,
        budget=budget,
        valid_start=sample.valid_start,
        warehouse=warehouse,
    )
    # The exposure counts cover every impression; the slates come from the sample, and
    # the per-user counts are those of the sample's users.
    assert data.log.exposures.rows == tiny_world.impressions.height
    sampled_users = np.unique(tables["impressions"]["user_id"].to_numpy())
    np.testing.assert_array_equal(data.log.exposures.users, sampled_users)
    assert len(sampled_users) < tiny_world.users.height
    assert len(data.retrieval_train) == 500  # capped, from more positives than that
    assert len(data.retrieval_valid) == len(data.retrieval_heldout) == 60
    assert data.logged_groups >= 150  # long slates become several groups
    assert set(data.ranker_train.group_impression.tolist()) <= set(
        tables["impressions"]["impression_id"].to_list()
    )
    times = data.retrieval_train.time_us
    assert np.all(np.diff(times) >= 0)  # still in time order
    result = train_ranker(data, train=TrainConfig(epochs=1, min_steps=0, batch_size=64))
    assert np.isfinite(result.history[0]["train_loss"])
    assert 0.0 <= result.history[0]["valid_auc"] <= 1.0


def test_step_memory_reports_a_blocks_own_peak():
    # Measured against the RSS at the block's start, not against another block's peak:
    # memory earlier tests left may be given back in between.
    with StepMemory() as big:
        before = rss_mib()
        block = np.ones(200 * 1024 * 1024 // 8)  # 200 MiB, touched
        del block
    assert big.peak_mib - before > 150, (before, big.peak_mib)
    assert big.metadata()["peak_rss_mib"] == round(big.peak_mib, 1)
    # A later block's peak is its own: near the RSS it starts at, not the earlier block's
    # high-water mark (whether malloc gave the 200 MiB back depends on what ran before).
    with StepMemory() as small:
        start = rss_mib()
    assert small.peak_mib < start + 50, (small.peak_mib, start, big.peak_mib)


def test_heldout_sample_reads_every_heldout_impression_of_a_fixed_number_of_users(
    warehouse, tiny_world
):
    from feed_dagster.data.warehouse import read_heldout_sample

    names = ["world_info", "impressions", "impression_truth", "engagements"]
    tables, sample = read_heldout_sample(warehouse, names, max_users=12, seed=0)
    held = tiny_world.impressions.filter(pl.col("is_heldout"))
    assert sample == {"evaluated_users": 12, "heldout_users": held["user_id"].n_unique()}
    imp = tables["impressions"]
    assert imp["is_heldout"].all() and imp["user_id"].n_unique() == 12
    theirs = held.filter(pl.col("user_id").is_in(imp["user_id"].unique().implode()))
    assert imp.height == theirs.height
    assert set(tables["impression_truth"]["impression_id"]) <= set(imp["impression_id"])
    assert tables["engagements"].height == tiny_world.engagements.height
    # The same users the training budget holds out, in the same order.
    budget_tables, _ = read_training_tables(
        warehouse, ["impressions"], TrainingBudget(heldout_users=12)
    )
    budget_held = budget_tables["impressions"].filter(pl.col("is_heldout"))
    assert set(budget_held["user_id"]) == set(imp["user_id"])
    everyone, whole = read_heldout_sample(warehouse, ["impressions"], max_users=0)
    assert everyone["impressions"].height == held.height
    assert whole["evaluated_users"] == whole["heldout_users"]
    with pytest.raises(ValueError, match="max_users"):
        read_heldout_sample(warehouse, ["impressions"], max_users=-1)


def test_groups_sampled_from_engagements_come_from_users_with_exposure_counts(warehouse):
    """Per-user exposure counts exist for the sampled slates' users only, so groups built
    from engagements are drawn from those users (any other would read zero exposures)."""
    budget = TrainingBudget(train_slates=150, valid_slates=40, heldout_users=20)
    tables, sample = read_training_tables(warehouse, TABLES, budget)
    world = world_from_tables(tables, tables["world_info"])
    data = prepare_training_data(
        world,
        LexicalEncoder().encode(world.articles),
        FEATURES,
        mix=TrainingMix(sampled_per_logged=1.0),
        budget=budget,
        valid_start=sample.valid_start,
        warehouse=warehouse,
    )
    sampled = data.ranker_train.group_logged == 0
    assert sampled.sum() > 0
    assert np.isin(data.ranker_train.group_user[sampled], data.log.exposures.users).all()


def test_the_baselines_score_the_same_on_the_articles_columns_they_read(warehouse) -> None:
    from feed_dagster.assets.evaluation import EVALUATION_COLUMNS, EVALUATION_TABLES
    from feed_dagster.data.warehouse import read_heldout_sample
    from feed_dagster.data.world_tables import world_from_tables
    from feed_dagster.metrics.baselines import evaluate_baselines

    def evaluated(columns):
        tables, _ = read_heldout_sample(warehouse, EVALUATION_TABLES, 40, columns=columns)
        world = world_from_tables(tables, tables["world_info"])
        return tables, evaluate_baselines(world, heldout_only=True)

    pruned, got = evaluated(EVALUATION_COLUMNS)
    assert pruned["articles"].columns == EVALUATION_COLUMNS["articles"]
    whole, want = evaluated(None)
    assert "text" in whole["articles"].columns
    assert got.height > 3
    # Means over impressions read in a parallel scan's order differ in the last bit (5e-17).
    assert_frame_equal(got, want)
