import hashlib
import io
from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from feed_dagster.data.schema import ACTIONS, World, conform
from feed_dagster.metrics.baselines import label_impressions, popularity_scores
from feed_dagster.metrics.ranking import evaluate_scores
from feed_dagster.sources import SourceSpec, load_source
from feed_dagster.world.catalog import catalog_config, generate_catalog

ALL_TIME = timedelta(days=100_000)


@pytest.fixture(scope="module")
def catalog() -> World:
    return generate_catalog(catalog_config("catalog-tiny"))


@pytest.fixture(scope="module")
def heldout(catalog: World) -> pl.DataFrame:
    """Held-out impression rows with the click label and the true click probability."""
    held = label_impressions(catalog.impressions.filter("is_heldout"), catalog.engagements)
    return held.join(catalog.impression_truth, on=["impression_id", "article_id"], how="left").sort(
        "impression_id", "position"
    )


def _digest(world: World) -> str:
    h = hashlib.sha256()
    for name, df in sorted(world.tables().items()):
        buf = io.BytesIO()
        df.write_ipc(buf)
        h.update(name.encode() + buf.getvalue())
    h.update(str((world.window_start, world.heldout_start, world.now)).encode())
    return h.hexdigest()


def test_tables_conform_to_the_canonical_schema(catalog):
    for name, df in catalog.tables().items():
        assert conform(name, df).equals(df), name
    for name in ("users", "articles", "impressions", "engagements", "impression_truth"):
        assert catalog.tables()[name].height > 0, name
    # No authors, hence no social graph.
    assert catalog.articles["author_id"].null_count() == catalog.articles.height
    for name in ("follows", "topic_follows", "blocks", "mutes", "muted_keywords"):
        assert catalog.tables()[name].height == 0, name


def test_deterministic_for_a_seed_and_different_across_seeds(catalog):
    assert _digest(generate_catalog(catalog_config("catalog-tiny"))) == _digest(catalog)
    assert _digest(generate_catalog(catalog_config("catalog-tiny", seed=1))) != _digest(catalog)


def test_items_are_long_lived_originals(catalog):
    arts = catalog.articles
    assert catalog.candidate_window is None
    assert (arts["published_at"] < catalog.window_start).all()
    # Spread over months to years, not bunched just before the window.
    assert catalog.window_start - arts["published_at"].min() > timedelta(days=365)
    assert (arts["kind"] == "original").all()
    assert arts["conversation_id"].equals(arts["article_id"], check_names=False)
    assert catalog.window_start < catalog.heldout_start < catalog.now


def test_no_engagement_before_publication_or_outside_the_window(catalog):
    eng = catalog.engagements.join(
        catalog.articles.select("article_id", "published_at"), on="article_id"
    )
    assert eng.height == catalog.engagements.height
    assert (eng["engaged_at"] >= eng["published_at"]).all()
    assert (eng["engaged_at"] >= catalog.window_start).all()
    assert (eng["engaged_at"] < catalog.now).all()
    assert (catalog.impressions["shown_at"] < catalog.now).all()


def test_organic_history_dominates_and_never_repeats_an_item(catalog):
    eng, imp = catalog.engagements, catalog.impressions
    organic = eng.filter(pl.col("impression_id").is_null())
    assert organic.height > 2 * eng.filter(pl.col("impression_id").is_not_null()).height
    assert organic.select("user_id", "article_id").is_unique().all()
    assert organic["click"].all()
    assert 0 < organic["favorite"].mean() < 0.6
    assert (organic["dwell_seconds"] > 0).all()
    # Users' history lengths are heavy-tailed: a few users engage far more than the median.
    per_user = organic.group_by("user_id").len()["len"]
    assert per_user.max() > 4 * per_user.median()
    # Logged slates are few, and never show an item the user already engaged with.
    slates = imp.group_by("user_id").agg(pl.col("impression_id").n_unique())["impression_id"]
    assert slates.min() >= 2 and slates.max() <= 6
    assert imp.join(organic, on=["user_id", "article_id"], how="semi").height == 0
    assert imp.select("impression_id", "article_id").is_unique().all()


def test_slate_clicks_are_engagements_with_their_impression(catalog):
    eng, imp = catalog.engagements, catalog.impressions
    logged = eng.filter(pl.col("impression_id").is_not_null())
    assert logged.height > 0 and logged["click"].all()
    # Every logged engagement belongs to a shown row of the same user.
    assert logged.join(imp, on=["impression_id", "article_id", "user_id"], how="anti").height == 0
    shown = logged.join(imp, on=["impression_id", "article_id"]).select("engaged_at", "shown_at")
    assert (shown["engaged_at"] >= shown["shown_at"]).all()
    labelled = label_impressions(imp, eng)
    assert labelled["label"].sum() == logged.height
    # Only clicks and favorites (a strong like, always with a click) are produced.
    assert not (logged["favorite"] & ~logged["click"]).any()
    for a in ACTIONS:
        if a not in ("click", "favorite"):
            assert not eng[a].any(), a


def test_heldout_is_the_latest_slates_with_truth_for_every_row(catalog):
    imp, truth = catalog.impressions, catalog.impression_truth
    held = imp.filter("is_heldout")
    assert 0.1 < held["impression_id"].n_unique() / imp["impression_id"].n_unique() < 0.3
    assert (held["shown_at"] >= catalog.heldout_start).all()
    assert (imp.filter(~pl.col("is_heldout"))["shown_at"] < catalog.heldout_start).all()
    assert truth.height == held.height
    assert held.join(truth, on=["impression_id", "article_id"], how="anti").height == 0
    p = truth["true_p_click"].to_numpy()
    assert np.all((p > 0) & (p < 1))
    assert (truth["true_p_favorite"] <= truth["true_p_click"]).all()
    assert (truth["true_p_favorite"] > 0).all()
    for a in ACTIONS:
        if a not in ("click", "favorite"):
            assert (truth[f"true_p_{a}"] == 0).all(), a


def test_true_affinity_predicts_clicks_far_better_than_popularity(catalog, heldout):
    oracle = evaluate_scores(heldout, "true_p_click", "label")
    popular = evaluate_scores(
        popularity_scores(heldout, catalog.engagements, window=ALL_TIME), "score", "label"
    )
    assert oracle["n_impressions"] - oracle["n_skipped"] > 50
    assert oracle["auc"] > 0.75
    assert popular["auc"] > 0.55  # popularity is real signal too
    assert oracle["auc"] > popular["auc"] + 0.1


def test_titles_carry_little_signal(catalog, heldout):
    """Scoring a candidate by how often its title words appear in the titles of the user's
    earlier engagements is near chance, far below the true affinity."""
    words = catalog.articles.select(
        "article_id", pl.col("title").str.to_lowercase().str.split(" ").alias("word")
    ).explode("word")
    past = catalog.engagements.filter(pl.col("engaged_at") < catalog.heldout_start)
    profile = (
        past.join(words, on="article_id")
        .group_by("user_id", "word")
        .len()
        .with_columns(share=pl.col("len") / pl.col("len").sum().over("user_id"))
    )
    rows = heldout.with_row_index("row")
    scores = (
        rows.join(words, on="article_id")
        .join(profile, on=["user_id", "word"], how="left")
        .group_by("row")
        .agg(pl.col("share").fill_null(0.0).mean().alias("score"))
    )
    scored = rows.join(scores, on="row", how="left").with_columns(pl.col("score").fill_null(0.0))
    title_auc = evaluate_scores(scored, "score", "label")["auc"]
    oracle_auc = evaluate_scores(heldout, "true_p_click", "label")["auc"]
    assert title_auc < 0.62
    assert oracle_auc > title_auc + 0.2
    # Genre names show up only in a minority of titles.
    genre_in_title = catalog.articles.select(
        pl.col("title").str.to_lowercase().str.contains(pl.col("topic_name"), literal=True)
    ).to_series()
    assert 0 < genre_in_title.mean() < 0.3


def test_load_source_builds_the_catalog():
    spec = SourceSpec.parse("synthetic:catalog-tiny", seed=3)
    assert spec.kind == "synthetic" and spec.scale == "catalog-tiny"
    world = load_source(spec)
    assert world.candidate_window is None
    assert _digest(world) == _digest(generate_catalog(catalog_config("catalog-tiny", seed=3)))


def test_unknown_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown catalog scale"):
        catalog_config("catalog-huge")
    with pytest.raises(ValueError, match="unknown catalog settings"):
        catalog_config("catalog-tiny", n_posts=10)
