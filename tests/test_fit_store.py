"""The classic-peer fit store: one fit per (engagements before the cut, cut, methods,
hyperparameters), loaded by whoever asks for it next."""

from __future__ import annotations

import pickle
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

import feed_dagster.metrics.classic as classic
from feed_dagster import mapped_pickle
from feed_dagster.data.schema import World
from feed_dagster.data.warehouse import read_heldout_sample
from feed_dagster.data.world_tables import world_from_tables
from feed_dagster.metrics.baselines import (
    BASELINES,
    SCORE,
    evaluate_baselines,
    label_impressions,
)
from feed_dagster.metrics.classic import ClassicPeers
from feed_dagster.metrics.fit_store import (
    code_version,
    fit_name,
    fit_name_in_warehouse,
    read_positive_pairs,
    stored_fit,
    stored_fit_in_warehouse,
)
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


@pytest.mark.parametrize(
    "written_by", ["older code, bare object", "older code, plain pickle", "other code"]
)
def test_a_fit_written_by_other_code_is_made_again(world, tmp_path, monkeypatch, written_by):
    """A file written by other code may load, but lack what this code reads (an attribute
    added since): it is refitted, not used. So are the plain pickles stored before fits
    were mapped pickles."""
    calls = _count_fits(monkeypatch)
    cut = world.heldout_start
    fitted = stored_fit(world.engagements, cut, tmp_path)
    (path,) = tmp_path.glob("fit-*.pkl")
    if written_by == "other code":
        mapped_pickle.dump(("0" * 16, fitted), path)
    elif written_by == "older code, plain pickle":
        path.write_bytes(pickle.dumps((code_version(ClassicPeers), fitted)))
    else:
        path.write_bytes(pickle.dumps(fitted))
    assert isinstance(stored_fit(world.engagements, cut, tmp_path), ClassicPeers)
    assert len(calls) == 2
    # The refit is stored with this code's version: the next asker loads it.
    stored_fit(world.engagements, cut, tmp_path)
    assert len(calls) == 2
    assert mapped_pickle.load(path)[0] == code_version(ClassicPeers)


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


def test_a_fit_is_named_alike_in_a_frame_and_in_the_warehouse(world, warehouse, tmp_path):
    """One query hashes the rows wherever they are, so a step that reads the engagements
    and one that leaves them in the warehouse share a fit; the pairs the warehouse hands
    over make the frame's fit."""
    cut = world.heldout_start
    name = fit_name(world.engagements, cut, classic.CLASSIC_METHODS)
    assert fit_name_in_warehouse(warehouse, cut, classic.CLASSIC_METHODS) == name
    assert fit_name_in_warehouse(warehouse, cut - timedelta(hours=1), ("als",)) == fit_name(
        world.engagements, cut - timedelta(hours=1), ("als",)
    )
    pairs = read_positive_pairs(warehouse, cut)
    assert_frame_equal(pairs, classic.positive_pairs(world.engagements, cut), check_row_order=False)
    stored = stored_fit_in_warehouse(warehouse, cut, tmp_path)
    assert [p.name for p in tmp_path.glob("fit-*.pkl")] == [f"fit-{name}.pkl"]
    fresh = ClassicPeers.fit(world.engagements, cut)
    users = world.impressions["user_id"].to_numpy()[:500]
    posts = world.impressions["article_id"].to_numpy()[:500]
    for method in classic.CLASSIC_METHODS:
        np.testing.assert_array_equal(
            stored.score(method, users, posts), fresh.score(method, users, posts)
        )


def test_the_baselines_on_a_scoped_sample_match_the_whole_world(world, warehouse, tmp_path):
    """impressions_evaluation reads the sample's rows only and takes what everyone's rows
    decide from the warehouse: the same figures as from every row, and the same fit."""
    names = ["world_info", "impressions", "engagements", "articles", "follows"]
    whole, _ = read_heldout_sample(warehouse, names, max_users=12, seed=3)
    scoped, _ = read_heldout_sample(warehouse, names, max_users=12, seed=3, scoped=True)
    assert scoped["engagements"].height < whole["engagements"].height
    assert scoped["follows"].height < whole["follows"].height
    assert set(scoped["follows"]["follower_id"]) <= set(scoped["impressions"]["user_id"])
    expected = evaluate_baselines(world_from_tables(whole, whole["world_info"]))
    got = evaluate_baselines(
        world_from_tables(scoped, scoped["world_info"]), peer_fits=tmp_path, warehouse=warehouse
    )
    # random's scores follow the rows' order, which two reads need not share.
    assert got["baseline"].to_list() == expected["baseline"].to_list()
    assert "chronological_following" in got["baseline"]
    assert_frame_equal(
        got.filter(pl.col("baseline") != "random"),
        expected.filter(pl.col("baseline") != "random"),
        check_exact=False,
        abs_tol=1e-9,
    )
    loaded = stored_fit(world.engagements, world.heldout_start, tmp_path)
    assert len(list(tmp_path.glob("fit-*.pkl"))) == 1 and loaded.cut == world.heldout_start


def test_chronological_following_stays_when_the_sample_follows_nobody(world, warehouse):
    """Whether anyone follows anyone is the warehouse's answer, not the sample's."""
    names = ["world_info", "impressions", "engagements", "articles", "follows"]
    scoped, _ = read_heldout_sample(warehouse, names, max_users=5, scoped=True)
    scoped["follows"] = scoped["follows"].clear()
    chosen = {b: BASELINES[b] for b in ("recency", "chronological_following")}
    table = evaluate_baselines(
        world_from_tables(scoped, scoped["world_info"]), baselines=chosen, warehouse=warehouse
    )
    assert "chronological_following" in table["baseline"]
    chrono, recency = (
        table.filter(pl.col("baseline") == b)["auc"].item()
        for b in ("chronological_following", "recency")
    )
    assert chrono == pytest.approx(recency)
