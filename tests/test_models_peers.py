"""Classic peers as ranker inputs: fitted strictly before the rows they describe."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl

from feed_dagster.data.schema import ACTIONS
from feed_dagster.models.peers import (
    PEER_METHODS,
    PER_USER,
    PeerFeatures,
    RollingPeerFeatures,
    RollingPeersOnDemand,
)
from feed_dagster.models.ranker_data import N_PEER_FEATURES

T0 = datetime(2026, 1, 1)


def _engagements(n_users: int = 60, n_items: int = 40, seed: int = 0) -> pl.DataFrame:
    """Two taste blocks: even users click even items, odd users odd items, over 10 days."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        items = rng.choice(np.arange(u % 2, n_items, 2), size=8, replace=False)
        for k, i in enumerate(items):
            rows.append((u, int(i), T0 + timedelta(days=float(rng.uniform(0, 10)), seconds=k)))
    df = pl.DataFrame(rows, schema=["user_id", "article_id", "engaged_at"], orient="row")
    return df.with_columns(
        pl.lit(None, pl.Int64).alias("impression_id"),
        *[pl.lit(a == "click").alias(a) for a in ACTIONS],
        pl.lit(10.0, pl.Float32).alias("dwell_seconds"),
    )


def _us(t: datetime) -> int:
    return int(pl.Series([t]).cast(pl.Datetime("us")).dt.epoch("us")[0])


def test_rows_before_the_cut_get_nothing_and_later_rows_get_scores():
    eng = _engagements()
    cut = T0 + timedelta(days=5)
    peers = PeerFeatures.fit(eng, cut)
    users = np.array([0, 0, 1, 1])
    items = np.array([2, 3, 2, 3])
    times = np.array([_us(cut) - 1, _us(cut), _us(cut), _us(cut) + 10**9])
    f = peers(users, items, times)
    assert f.shape == (4, N_PEER_FEATURES) == (4, len(PEER_METHODS) + len(PER_USER) + 1)
    assert (f[0] == 0).all()  # before the cut: absent
    assert (f[1:, -1] == 1).all()
    assert np.isfinite(f).all()
    # The same pair scored at two later times gets the same features (one fit).
    np.testing.assert_array_equal(f[2], peers(users[2:3], items[2:3], times[3:4])[0])


def test_taste_blocks_show_in_the_peer_scores():
    eng = _engagements()
    peers = PeerFeatures.fit(eng, T0 + timedelta(days=11))
    t = np.full(40, _us(T0 + timedelta(days=11)))
    users = np.repeat([0, 1], 20)
    items = np.tile(np.arange(0, 40, 2), 2)  # even items for both users
    f = peers(users, items, t)
    for m in ("als", "item_knn"):
        j = PEER_METHODS.index(m)
        assert f[:20, j].mean() > f[20:, j].mean() + 0.5, m


def test_peers_never_see_the_engagements_at_or_after_their_cut():
    eng = _engagements()
    cut = T0 + timedelta(days=5)
    late = eng.filter(pl.col("engaged_at") >= cut).with_columns(pl.col("article_id") + 1000)
    a = PeerFeatures.fit(eng, cut)
    b = PeerFeatures.fit(pl.concat([eng, late]), cut)
    users, items = np.arange(60), np.arange(60) % 40
    t = np.full(60, _us(cut))
    np.testing.assert_array_equal(a(users, items, t), b(users, items, t))


def test_rolling_fits_take_the_latest_cut_before_each_row():
    eng = _engagements()
    cuts = [T0 + timedelta(days=d) for d in (3, 6, 9)]
    rolling = RollingPeerFeatures.fit(eng, cuts)
    users, items = np.array([4, 4, 4, 4]), np.array([6, 6, 6, 6])
    times = np.array([_us(T0), _us(cuts[0]), _us(cuts[1]) + 5, _us(cuts[2]) + 5])
    out = rolling(users, items, times)
    assert (out[0] == 0).all()
    for row, fit in zip(out[1:], rolling.fits, strict=True):
        np.testing.assert_array_equal(row, fit(users[:1], items[:1], times[-1:])[0])


def test_rolling_fits_made_on_demand_give_the_same_features_one_fit_at_a_time():
    eng = _engagements()
    cuts = [T0 + timedelta(days=d) for d in (3, 6, 9)]
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 60, 200), rng.integers(0, 40, 200)
    times = rng.integers(_us(T0), _us(T0 + timedelta(days=11)), 200)
    want = RollingPeerFeatures.fit(eng, cuts)(users, items, times)
    on_demand = RollingPeersOnDemand(eng, cuts)
    np.testing.assert_array_equal(on_demand(users, items, times), want)
    assert on_demand._held[0] == 2  # only the latest fit is kept
    late = times >= _us(cuts[2])
    np.testing.assert_array_equal(on_demand(users[late], items[late], times[late]), want[late])
    np.testing.assert_array_equal(on_demand(users, items, times), want)  # refits the earlier


def test_prepared_peers_score_their_posts_without_computing_a_row(monkeypatch):
    """A shard scores the posts its peers were prepared for; each user's own figures are
    taken over posts of the fit's choosing, which are prepared with them. Afterwards
    nothing is computed (a missing row at 1M users meant rebuilding the history's
    transpose, 1.2 GB, in every shard)."""
    eng = _engagements()
    cut = T0 + timedelta(days=5)
    peers = PeerFeatures.fit(eng, cut)
    posts = np.array([0, 1, 2])  # not the users' figures' posts
    assert not np.isin(peers.user_stats.items, posts).all()
    peers.prepare(posts)
    assert peers.peers._history_t is None

    def computed(*args, **kwargs):
        raise AssertionError("an item-kNN row was computed after preparing")

    monkeypatch.setattr("feed_dagster.metrics.classic._item_knn_rows", computed)
    users = np.arange(10).repeat(3)
    f = peers(users, np.tile(posts, 10), np.full(users.size, _us(cut)))
    assert np.isfinite(f).all() and (f[:, -1] == 1).all()
