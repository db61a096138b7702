"""Classic peers' scores as ranker inputs (stacking), fitted strictly before the impressions.

Production rankers take retrieval and collaborative scores as features. The catch is time:
a peer fitted on data that includes an impression's own click would hand the ranker its
label. So peers are fitted once at a cut; impressions at or after the cut see the peer's
scores (and a flag saying they are present), earlier ones see zeros and the flag off. The
trainer fits at a cut inside the training period, evaluation at the held-out start, serving
at `now`: always strictly before every impression scored.

Scores are standardised by their mean and spread over a fixed sample of (user, post) pairs
of the fit, so the ranker sees the same scale from fits on more or less data.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from feed_dagster.artifacts import Location
from feed_dagster.metrics.classic import ClassicPeers
from feed_dagster.metrics.fit_store import stored_fit_named
from feed_dagster.models.catalog import to_micros
from feed_dagster.models.ranker_data import N_PEER_FEATURES
from feed_dagster.sorted_search import unique

# Peers the ranker sees.
PEER_METHODS: tuple[str, ...] = ("als", "item_knn", "ease", "popularity_all_time")
# Collaborative methods whose scores also come standardised per user: their scale differs
# from user to user (a heavy reader's item-kNN sums are large for every post), and within a
# slate only how a post stands among the user's own scores matters.
PER_USER: tuple[str, ...] = ("als", "item_knn", "ease")
_STATS_PAIRS = 20_000
_ITEMS_PER_USER = 64
# Columns: each method standardised globally, the PER_USER ones per user, the present flag.
assert N_PEER_FEATURES == len(PEER_METHODS) + len(PER_USER) + 1


class UserStats:
    """Each user's mean and spread of the PER_USER scores over one shared set of posts,
    computed the first time a user is asked about and kept: a fit at 1M users holds every
    user, and a trainer or a feed shard asks about a few percent of them (at that size,
    every user's took most of a training run's preparation). A user's figures depend on
    that user's scores alone, so they do not depend on who else was asked, or when."""

    def __init__(self, peers: ClassicPeers, items: np.ndarray):
        self.peers = peers
        self.items = items  # the shared posts (none when the fit has no users or posts)
        self.users = np.zeros(0, np.int64)  # sorted
        self.mean = np.zeros((0, len(PER_USER)), np.float32)
        self.std = np.ones((0, len(PER_USER)), np.float32)

    def of(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seen, mean, std): whether each of `users` is one of the fit's, and for those
        their rows of the stats."""
        users = np.asarray(users, dtype=np.int64)
        fit_users = self.peers.user_ids
        pos = np.searchsorted(fit_users, users).clip(0, max(len(fit_users) - 1, 0))
        seen = fit_users[pos] == users if len(fit_users) else np.zeros(len(users), bool)
        self._add(unique(users[seen]))
        at = np.searchsorted(self.users, users[seen])
        return seen, self.mean[at], self.std[at]

    def _add(self, users: np.ndarray) -> None:
        new = users[~np.isin(users, self.users, assume_unique=True)]
        if not len(new):
            return
        k = len(self.items)
        mean = np.zeros((len(new), len(PER_USER)), np.float32)
        std = np.ones((len(new), len(PER_USER)), np.float32)
        # A slice of users at a time: their scores are users x k floats per method. (Without
        # shared posts every user's stats are 0 and 1.)
        for lo in range(0, len(new) if k else 0, _USERS_PER_SLICE):
            part = new[lo : lo + _USERS_PER_SLICE]
            n = len(part)
            for j, m in enumerate(PER_USER):
                s = self.peers.score(m, np.repeat(part, k), np.tile(self.items, n))
                s = s.reshape(n, k).astype(np.float64)
                mean[lo : lo + n, j] = s.mean(1)
                std[lo : lo + n, j] = np.maximum(s.std(1), 1e-6)
        users = np.concatenate([self.users, new])
        order = np.argsort(users, kind="stable")
        self.users = users[order]
        self.mean = np.concatenate([self.mean, mean])[order]
        self.std = np.concatenate([self.std, std])[order]


_USERS_PER_SLICE = 16_384


@dataclass(frozen=True)
class PeerFeatures:
    peers: ClassicPeers
    cut_us: int
    mean: np.ndarray  # float32 [len(PEER_METHODS)]
    std: np.ndarray
    user_stats: UserStats

    @classmethod
    def fit(
        cls,
        engagements: pl.DataFrame | None,
        cut: datetime,
        store: Path | None = None,
        warehouse: Location | None = None,
    ) -> PeerFeatures:
        """Features of PEER_METHODS fitted at `cut` on `engagements`, or without them on
        every engagement in `warehouse` (through the fit store `store`, when given: see
        metrics.fit_store)."""
        peers, _ = stored_fit_named(
            cut, store, PEER_METHODS, engagements=engagements, warehouse=warehouse
        )
        return cls.of(peers)

    @classmethod
    def of(cls, peers: ClassicPeers, seed: int = 0) -> PeerFeatures:
        """Features from peers already fitted (with at least PEER_METHODS)."""
        missing = set(PEER_METHODS) - set(peers.methods)
        if missing:
            raise ValueError(f"peer features need the methods {sorted(missing)} fitted")
        cut = peers.cut
        rng = np.random.default_rng(seed)
        mean = np.zeros(len(PEER_METHODS), np.float32)
        std = np.ones(len(PEER_METHODS), np.float32)
        if len(peers.user_ids) and len(peers.item_ids):
            users = rng.choice(peers.user_ids, _STATS_PAIRS)
            items = rng.choice(peers.item_ids, _STATS_PAIRS)
            raw = cls._raw(peers, users, items)
            mean = raw.mean(0).astype(np.float32)
            std = np.maximum(raw.std(0), 1e-6).astype(np.float32)
        # Each user's scores over one shared random set of posts.
        k = min(_ITEMS_PER_USER, len(peers.item_ids))
        shared = np.zeros(0, np.int64)
        if len(peers.user_ids) and k:
            shared = rng.choice(peers.item_ids, k, replace=False)
        return cls(peers, to_micros(cut), mean, std, UserStats(peers, shared))

    def prepare(self, posts: np.ndarray) -> None:
        """Compute ahead of the first score what scoring `posts` reads (their item-kNN
        rows, and those of the posts every user's own figures are taken over), then let
        go of what only computing new rows needs: the processes this is shared with
        only score. (Missing rows would each time make a shard at 1M users rebuild the
        history's transpose, 1.2 GB, and copy every prepared row, 2 GB.)"""
        self.peers.prepare(np.concatenate([np.asarray(posts, np.int64), self.user_stats.items]))
        self.peers.drop_transpose()

    @staticmethod
    def _raw(peers: ClassicPeers, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        at = peers.positions(users, items)
        cols = [peers.score_at(m, *at).astype(np.float64) for m in PEER_METHODS]
        # Counts are heavy-tailed: their log is what a linear layer can use.
        i = PEER_METHODS.index("popularity_all_time")
        cols[i] = np.log1p(cols[i])
        return np.stack(cols, axis=1)

    def __call__(self, users: np.ndarray, articles: np.ndarray, times_us: np.ndarray) -> np.ndarray:
        """float32 [n, N_PEER_FEATURES] for (user, article, time) rows; zeros and flag 0 for
        rows earlier than the fit's cut."""
        out = np.zeros((len(users), N_PEER_FEATURES), np.float32)
        present = np.asarray(times_us) >= self.cut_us
        if present.any():
            u = np.asarray(users)[present]
            raw = self._raw(self.peers, u, np.asarray(articles)[present])
            n = len(PEER_METHODS)
            out[present, :n] = np.clip((raw - self.mean) / self.std, -10, 10)
            # Users unseen by the fit keep the global standardisation.
            seen, user_mean, user_std = self.user_stats.of(u)
            cols = [PEER_METHODS.index(m) for m in PER_USER]
            per_user = out[present][:, cols]
            if seen.any():
                z = (raw[seen][:, cols] - user_mean) / user_std
                per_user[seen] = np.clip(z, -10, 10)
            out[present, n : n + len(PER_USER)] = per_user
            out[present, -1] = 1.0
        return out


@dataclass(frozen=True)
class RollingPeerFeatures:
    """Several fits at increasing cuts; each row takes the latest fit at or before its time,
    so training slates late in the period see peers fitted on about as much data as the
    held-out ones do."""

    fits: tuple[PeerFeatures, ...]  # by cut, ascending

    @classmethod
    def fit(cls, engagements: pl.DataFrame, cuts: list[datetime]) -> RollingPeerFeatures:
        return cls(tuple(PeerFeatures.fit(engagements, c) for c in sorted(set(cuts))))

    def __call__(self, users: np.ndarray, articles: np.ndarray, times_us: np.ndarray) -> np.ndarray:
        times_us = np.asarray(times_us)
        out = np.zeros((len(users), N_PEER_FEATURES), np.float32)
        for i, f in enumerate(self.fits):
            nxt = self.fits[i + 1].cut_us if i + 1 < len(self.fits) else None
            rows = times_us >= f.cut_us
            if nxt is not None:
                rows &= times_us < nxt
            if rows.any():
                idx = np.flatnonzero(rows)
                out[idx] = f(np.asarray(users)[idx], np.asarray(articles)[idx], times_us[idx])
        return out


class RollingPeersOnDemand:
    """The features of `RollingPeerFeatures.fit(engagements, cuts)`, with each cut fitted
    when rows first need it and only one fit held at a time: a fit with the item-kNN rows of
    the posts it scored is hundreds of MB at 100k users, and a trainer's slates reach the
    cuts in turn. The latest fit stays for the next call (the validation slates read it);
    a call that goes back to an earlier cut fits it again, to the same features. Without
    `engagements`, the fits are of every engagement in `warehouse`."""

    def __init__(
        self,
        engagements: pl.DataFrame | None,
        cuts: list[datetime],
        warehouse: Location | None = None,
    ):
        if engagements is None and warehouse is None:
            raise ValueError("peers are fitted on engagements or on a warehouse's")
        self._engagements = engagements
        self._warehouse = warehouse
        self.cuts = sorted(set(cuts))
        self.cuts_us = [to_micros(c) for c in self.cuts]
        self._held: tuple[int, PeerFeatures] | None = None

    def _fit(self, i: int) -> PeerFeatures:
        if self._held is None or self._held[0] != i:
            self._held = None  # the previous fit goes before the next one is made
            fit = PeerFeatures.fit(self._engagements, self.cuts[i], warehouse=self._warehouse)
            self._held = (i, fit)
        return self._held[1]

    def __call__(self, users: np.ndarray, articles: np.ndarray, times_us: np.ndarray) -> np.ndarray:
        times_us = np.asarray(times_us)
        out = np.zeros((len(users), N_PEER_FEATURES), np.float32)
        for i, cut_us in enumerate(self.cuts_us):
            rows = times_us >= cut_us
            if i + 1 < len(self.cuts_us):
                rows &= times_us < self.cuts_us[i + 1]
            if rows.any():
                idx = np.flatnonzero(rows)
                out[idx] = self._fit(i)(
                    np.asarray(users)[idx], np.asarray(articles)[idx], times_us[idx]
                )
        return out
