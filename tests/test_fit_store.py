"""The classic-peer fit store: one fit per (engagements before the cut, cut, methods,
hyperparameters), loaded by whoever asks for it next."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

import feed_dagster.metrics.classic as classic
from feed_dagster.data.schema import World
from feed_dagster.metrics.baselines import SCORE, evaluate_baselines, label_impressions
from feed_dagster.metrics.classic import ClassicPeers
from feed_dagster.metrics.fit_store import fit_name, stored_fit
from feed_dagster.metrics.ranking import evaluate_scores


@pytest.fixture()
def world(tiny_world: World) -> World:
    return tiny_world


def _count_fits(monkeypatch) -> list[datetime]:
    calls: list[datetime] = []
    real = ClassicPeers.fit.__func__

    def counting(cls, engagements, cut, methods=classic.CLASSIC_METHODS, **hyper):
        calls.append(cut)
        return real(cls, engagements, cut, methods, **hyper)

    monkeypatch.setattr(ClassicPeers, "fit", classmethod(counting))
    return calls


def test_the_name_depends_on_the_rows_before_the_cut_not_their_order(world):
    cut = world.heldout_start
    e = world.engagements
    name = fit_name(e, cut, classic.CLASSIC_METHODS)
    shuffled = e.sample(fraction=1.0, shuffle=True, seed=1)
    assert fit_name(shuffled, cut, tuple(reversed(classic.CLASSIC_METHODS))) == name
    # Rows at or after the cut do not enter the fit, so they do not change its name.
    assert fit_name(e.filter(pl.col("engaged_at") < cut), cut, classic.CLASSIC_METHODS) == name
    assert fit_name(e, cut - timedelta(hours=1), classic.CLASSIC_METHODS) != name
    assert fit_name(e.slice(1), cut, classic.CLASSIC_METHODS) != name
    assert fit_name(e, cut, ("als",)) != name
    assert fit_name(e, cut, classic.CLASSIC_METHODS, als_factors=16) != name


def test_a_stored_fit_is_made_once_and_scores_as_a_fresh_one(world, tmp_path, monkeypatch):
    calls = _count_fits(monkeypatch)
    cut = world.heldout_start
    first = stored_fit(world.engagements, cut, tmp_path)
    again = stored_fit(world.engagements.reverse(), cut, tmp_path)
    assert len(calls) == 1
    assert len(list(tmp_path.glob("fit-*.pkl"))) == 1
    fresh = ClassicPeers.fit(world.engagements, cut)
    users = world.impressions["user_id"].to_numpy()[:500]
    posts = world.impressions["article_id"].to_numpy()[:500]
    for method in classic.CLASSIC_METHODS:
        expected = fresh.score(method, users, posts)
        np.testing.assert_array_equal(first.score(method, users, posts), expected)
        np.testing.assert_array_equal(again.score(method, users, posts), expected)


def test_an_unreadable_fit_is_made_again(world, tmp_path, monkeypatch):
    calls = _count_fits(monkeypatch)
    cut = world.heldout_start
    stored_fit(world.engagements, cut, tmp_path)
    (path,) = tmp_path.glob("fit-*.pkl")
    path.write_bytes(b"not a pickle")
    peers = stored_fit(world.engagements, cut, tmp_path)
    assert len(calls) == 2 and isinstance(peers, ClassicPeers)


def test_the_baselines_fit_the_classic_peers_once_at_the_heldout_start(
    world, tmp_path, monkeypatch
):
    """impressions_evaluation's classic rows come from the fit trained_models and
    feed_quality make at the held-out start: with a store, the later ones load it."""
    calls = _count_fits(monkeypatch)
    table = evaluate_baselines(world, heldout_only=True, peer_fits=tmp_path)
    assert calls == [world.heldout_start]
    loaded = stored_fit(world.engagements, world.heldout_start, tmp_path)
    assert len(calls) == 1
    # The item-kNN rows the baselines computed came along with the fit.
    held = world.impressions.filter(pl.col("is_heldout"))["article_id"].to_numpy()
    rows = classic._lookup(loaded.item_ids, held)
    assert loaded._knn_done[rows[rows >= 0]].all()
    # The same figures as a fresh fit at the held-out start, which precedes every
    # held-out impression.
    imps = world.impressions.filter(pl.col("is_heldout"))
    assert imps["shown_at"].min() >= world.heldout_start
    imps = label_impressions(imps, world.engagements, "click")
    fresh = ClassicPeers.fit(world.engagements, world.heldout_start)
    rows = {r["baseline"]: r for r in table.iter_rows(named=True)}
    users, posts = imps["user_id"].to_numpy(), imps["article_id"].to_numpy()
    for method in classic.CLASSIC_METHODS:
        scored = imps.with_columns(pl.Series(SCORE, fresh.score(method, users, posts)))
        expected = evaluate_scores(scored, SCORE, "label")["auc"]
        assert rows[method]["auc"] == pytest.approx(expected, abs=1e-12)
