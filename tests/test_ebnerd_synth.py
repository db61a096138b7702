"""The synthetic EBNeRD writer: exact layout, sane values, and a signal rankers can learn."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from feed_dagster.data.schema import World
from feed_dagster.ebnerd import load_ebnerd, write_articles_for_ids, write_synthetic_ebnerd
from feed_dagster.ebnerd.layout import (
    ARTICLES_SCHEMA,
    BEHAVIORS_SCHEMA,
    HISTORY_SCHEMA,
    TEST_BEHAVIORS_SCHEMA,
)
from feed_dagster.metrics import evaluate_scores, label_impressions
from feed_dagster.metrics.baselines import popularity_scores, random_scores, recency_scores


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_ebnerd(tmp_path_factory.mktemp("synth"), seed=3, with_test=True)


@pytest.fixture(scope="module")
def world(folder: Path) -> World:
    return load_ebnerd(folder)


def test_exact_arrow_schemas(folder: Path) -> None:
    expected = {
        "articles.parquet": ARTICLES_SCHEMA,
        "train/behaviors.parquet": BEHAVIORS_SCHEMA,
        "validation/behaviors.parquet": BEHAVIORS_SCHEMA,
        "test/behaviors.parquet": TEST_BEHAVIORS_SCHEMA,
        "train/history.parquet": HISTORY_SCHEMA,
        "validation/history.parquet": HISTORY_SCHEMA,
        "test/history.parquet": HISTORY_SCHEMA,
    }
    for rel, schema in expected.items():
        found = pq.read_schema(folder / rel)
        assert found.remove_metadata().equals(schema), rel
        # the list child is called "item", as in the real files
        for f in found:
            if hasattr(f.type, "value_field"):
                assert f.type.value_field.name == "item", (rel, f.name)


def test_behaviour_values(folder: Path) -> None:
    for split in ("train", "validation"):
        beh = pl.read_parquet(folder / split / "behaviors.parquet")
        hist = pl.read_parquet(folder / split / "history.parquet")
        n = beh["article_ids_inview"].list.len()
        assert n.min() >= 5 and n.max() <= 100
        assert (beh["article_ids_inview"].list.n_unique() == n).all()
        clicks = beh["article_ids_clicked"].list.len()
        assert clicks.min() >= 1 and clicks.max() <= 2 and 1.0 <= clicks.mean() < 1.15
        assert (
            beh.select(
                pl.col("article_ids_clicked").list.set_difference("article_ids_inview").list.len()
            ).to_series()
            == 0
        ).all()
        assert beh["impression_id"].is_unique().all()
        times = hist["impression_time_fixed"]
        assert times.list.max().max() < beh["impression_time"].min()
        assert times.list.eval(pl.element().diff().drop_nulls() >= timedelta(0)).list.all().all()
        lens = [hist[c].list.len() for c in hist.columns if c != "user_id"]
        assert all((x == lens[0]).all() for x in lens)


def test_articles_precede_their_impressions(world: World) -> None:
    joined = world.impressions.join(world.articles, on="article_id")
    assert (joined["published_at"] < joined["shown_at"]).all()
    reads = world.engagements.join(world.articles, on="article_id")
    assert (reads["published_at"] < reads["engaged_at"]).all()


def test_same_seed_same_files(tmp_path: Path) -> None:
    a = write_synthetic_ebnerd(tmp_path / "a", users=20, articles=120, impressions_per_user=3)
    b = write_synthetic_ebnerd(tmp_path / "b", users=20, articles=120, impressions_per_user=3)
    c = write_synthetic_ebnerd(
        tmp_path / "c", users=20, articles=120, impressions_per_user=3, seed=1
    )
    for rel in ("articles.parquet", "train/behaviors.parquet", "validation/history.parquet"):
        assert pl.read_parquet(a / rel).equals(pl.read_parquet(b / rel))
    assert not pl.read_parquet(a / "train/behaviors.parquet").equals(
        pl.read_parquet(c / "train/behaviors.parquet")
    )


def _auc(world: World, scored: pl.DataFrame) -> float:
    return float(evaluate_scores(scored, "score")["auc"])


def test_baselines_beat_random_and_taste_beats_baselines(world: World) -> None:
    imps = label_impressions(world.impressions.filter("is_heldout"), world.engagements)
    eng, arts = world.engagements, world.articles
    rand = _auc(world, random_scores(imps, seed=0))
    pop_scored = popularity_scores(imps, eng, arts)
    rec_scored = recency_scores(imps, eng, arts)
    pop, rec = _auc(world, pop_scored), _auc(world, rec_scored)
    assert abs(rand - 0.5) < 0.03
    assert pop > rand + 0.05 and rec > rand + 0.05

    # A ranker that also knows each user's category taste from reading history (everything
    # strictly before the held-out period) must beat both: taste is what the hidden model
    # adds on top of appeal and age.
    past = eng.filter(pl.col("engaged_at") < world.heldout_start).join(
        arts.select("article_id", "topic"), on="article_id"
    )
    taste = (
        past.group_by("user_id", "topic")
        .agg(pl.len().alias("n"))
        .with_columns(share=pl.col("n") / pl.col("n").sum().over("user_id"))
    )
    combined = (
        imps.with_columns(pop=pop_scored["score"], rec=rec_scored["score"])
        .join(arts.select("article_id", "topic"), on="article_id", how="left")
        .join(taste.select("user_id", "topic", "share"), on=["user_id", "topic"], how="left")
        .with_columns(
            score=(pl.col("share").fill_null(0.0) + 0.01).log()
            + pl.col("pop").log1p()
            + pl.col("rec") / 86_400.0
        )
    )
    learned = _auc(world, combined)
    assert learned > max(pop, rec) + 0.05


def test_articles_for_given_ids(tmp_path: Path) -> None:
    ids = [9_000_001, 42, 7, 9_000_001]
    t0 = datetime(2023, 2, 1, 12, 0, 0)
    seen = {42: t0, 7: t0 + timedelta(days=2)}
    out = write_articles_for_ids(ids, tmp_path / "articles.parquet", seed=5, first_seen=seen)
    assert pq.read_schema(out).remove_metadata().equals(ARTICLES_SCHEMA)
    arts = pl.read_parquet(out).sort("article_id")
    assert arts["article_id"].to_list() == [7, 42, 9_000_001]
    pub = dict(zip(arts["article_id"], arts["published_time"], strict=True))
    for aid, t in seen.items():
        assert t - timedelta(hours=6) <= pub[aid] < t
    assert pub[9_000_001] < t0  # unseen ids go before every sighting
    assert arts["topics"].null_count() == 0
    assert arts["title"].null_count() == 0 and (arts["body"].str.len_chars() > 0).all()
    # a frame works as well as a mapping
    frame = pl.DataFrame({"article_id": [42, 7], "first_seen": [t0, t0 + timedelta(days=2)]})
    again = write_articles_for_ids(ids, tmp_path / "again.parquet", seed=5, first_seen=frame)
    assert pl.read_parquet(again).equals(pl.read_parquet(out))


def test_text_carries_the_category(world: World) -> None:
    # Titles of one category share words, those of different categories rarely do, so text
    # encoders have something to find.
    arts = world.articles.with_columns(words=pl.col("text").str.split(" "))
    by_topic = arts.group_by("topic").agg(
        pl.col("words").list.explode().mode().first().alias("top")
    )
    top = dict(zip(by_topic["topic"], by_topic["top"], strict=True))
    hits = arts.with_columns(
        has=pl.col("words").list.contains(pl.col("topic").replace_strict(top))
    )["has"]
    assert hits.mean() > 0.5  # type: ignore[operator]
    assert np.unique(list(top.values())).size == len(top)
