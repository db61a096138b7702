"""Engagement and exposure logs: histories and "how many before t" counts.

Every feature of an impression is computed from rows timestamped strictly before its time,
so training inputs look exactly like serving inputs (and nothing leaks from the future).
Histories come from one sort-merge of engagement and query events; counts from sorted
(key, time) arrays answered by binary search. No Python loop per query.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import numpy as np
import polars as pl

from feed_dagster.data.schema import ACTIONS, POSITIVE_ACTIONS
from feed_dagster.models.catalog import (
    NEVER_US,
    FeatureConfig,
    ItemCatalog,
    _micros,
    age_bucket,
    hash_buckets,
)

N_ACTIONS = len(ACTIONS)


@dataclass(frozen=True)
class History:
    """The last H engagements of each query (user, time), oldest first, left-padded."""

    item: np.ndarray  # int32 [Q, H] catalog rows, 0 = padding
    actions: np.ndarray  # int16 [Q, H] bit a set <=> ACTIONS[a] happened
    dwell: np.ndarray  # float32 [Q, H] log1p(seconds)
    age: np.ndarray  # int16 [Q, H] age bucket of the post when engaged with, 0 = padding
    time_us: np.ndarray  # int64 [Q] the query time the history was taken before
    user_bucket: np.ndarray  # int32 [Q, id_hashes] hashed user id
    # The user's first engagement (NEVER_US if none): the user-id embedding is used only for
    # users who had engaged before the query time and the model's training cut.
    user_first_us: np.ndarray  # int64 [Q]

    @property
    def mask(self) -> np.ndarray:
        return self.item > 0

    def take(self, idx: np.ndarray) -> History:
        return History(*(getattr(self, f.name)[idx] for f in fields(self)))


def _time_keys(item: np.ndarray, time_us: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """(sorted keys, time origin, time resolution, step) of events keyed item * step + time:
    one sorted array answers "how many events of this item before t"."""
    item = np.asarray(item, dtype=np.int64)
    t0 = int(time_us.min()) if time_us.size else 0
    span = int(time_us.max()) - t0 + 2 if time_us.size else 2
    # Coarser time steps when item * span would overflow int64. Counting floor(e / r) <
    # floor(t / r) still counts only events strictly before t (it may miss a few in the same
    # step), so no future event leaks in.
    n_items = int(item.max()) + 2 if item.size else 2
    resolution = 1
    while n_items * (span // resolution + 2) >= 2**62:
        resolution *= 2
    step = span // resolution + 2
    keys = np.sort(item * step + (time_us - t0) // resolution)
    return keys, t0, resolution, step


def _count_before(
    index: tuple[np.ndarray, int, int, int], item: np.ndarray, time_us: np.ndarray
) -> np.ndarray:
    """Events of `item` strictly before `time_us` (element-wise) in a `_time_keys` index."""
    keys, t0, resolution, step = index
    if keys.size == 0:
        return np.zeros(len(item), dtype=np.float32)
    item = np.asarray(item, dtype=np.int64)
    # Times before the index's start count nothing; later ones are capped inside the item.
    rel = np.clip((np.asarray(time_us, dtype=np.int64) - t0) // resolution, 0, step - 1)
    first = np.searchsorted(keys, item * step, side="left")
    upto = np.searchsorted(keys, item * step + rel, side="left")
    return (upto - first).astype(np.float32)


@dataclass(frozen=True)
class ExposureLog:
    """Logged impressions (who was shown which catalog row when), for exposure counts."""

    user: np.ndarray  # int64 [N]
    item: np.ndarray  # int32 [N] catalog rows
    time_us: np.ndarray  # int64 [N]

    @classmethod
    def build(cls, impressions: pl.DataFrame, catalog: ItemCatalog) -> ExposureLog:
        return cls(
            user=impressions["user_id"].to_numpy().astype(np.int64),
            item=catalog.rows(impressions["article_id"].to_numpy(), "impressions.article_id"),
            time_us=_micros(impressions["shown_at"]),
        )

    @functools.cached_property
    def _item_index(self) -> tuple[np.ndarray, int, int, int]:
        return _time_keys(self.item, self.time_us)

    def shown_before(self, item: np.ndarray, time_us: np.ndarray) -> np.ndarray:
        """How often catalog row `item` was shown (to anyone) strictly before `time_us`."""
        return _count_before(self._item_index, item, time_us)

    def pair_counter(self, of_item: np.ndarray) -> PairCounter:
        """Counts of (user, of_item[item]) exposures, e.g. of_item = the catalog's topics."""
        return _attribute_counter(of_item, self.user, self.item, self.time_us)


def _attribute_index(
    of_item: np.ndarray, item: np.ndarray, time_us: np.ndarray
) -> tuple[np.ndarray, int, int, int]:
    """`_time_keys` of the events keyed by an attribute of their item (of_item[item], e.g.
    its author); events whose attribute is unknown (< 0) are left out."""
    key = of_item[item].astype(np.int64)
    known = key >= 0
    return _time_keys(key[known], time_us[known])


def _attribute_counter(
    of_item: np.ndarray, user: np.ndarray, item: np.ndarray, time_us: np.ndarray
) -> PairCounter:
    """(user, of_item[item]) events; events whose attribute is unknown (< 0) are left out."""
    key = of_item[item].astype(np.int64)
    known = key >= 0
    return PairCounter.build(user[known], key[known], time_us[known])


@dataclass(frozen=True)
class PairCounter:
    """How many (a, b) events happened strictly before a time: the pairs get dense ids, so
    one sorted (pair, time) key array answers every query with two binary searches."""

    pairs: np.ndarray  # int64 sorted unique a * 2**31 + b
    index: tuple[np.ndarray, int, int, int]

    @classmethod
    def build(cls, a: np.ndarray, b: np.ndarray, time_us: np.ndarray) -> PairCounter:
        key = np.asarray(a, np.int64) * 2**31 + np.asarray(b, np.int64)
        pairs, dense = np.unique(key, return_inverse=True)
        return cls(pairs, _time_keys(dense, np.asarray(time_us, np.int64)))

    def before(self, a: np.ndarray, b: np.ndarray, time_us: np.ndarray) -> np.ndarray:
        key = np.asarray(a, np.int64) * 2**31 + np.asarray(b, np.int64)
        if self.pairs.size == 0:
            return np.zeros(len(key), dtype=np.float32)
        pos = np.searchsorted(self.pairs, key).clip(0, self.pairs.size - 1)
        found = (self.pairs[pos] == key) & (np.asarray(b) >= 0)
        return np.where(found, _count_before(self.index, pos, time_us), 0.0).astype(np.float32)


@dataclass(frozen=True)
class EngagementLog:
    """Engagements sorted by (user, time) with the per-row features history tokens need."""

    user: np.ndarray  # int64 [E]
    time_us: np.ndarray  # int64 [E]
    item: np.ndarray  # int32 [E] catalog rows
    actions: np.ndarray  # int16 [E] action bitmask
    dwell: np.ndarray  # float32 [E] log1p(seconds)
    age: np.ndarray  # int16 [E]
    # Logged impressions, when the source has them: exposure counts for the profile.
    exposures: ExposureLog | None = None
    # The catalog's topic and author per row, for the exposure counters.
    catalog_topic: np.ndarray | None = None
    catalog_author: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        engagements: pl.DataFrame,
        catalog: ItemCatalog,
        impressions: pl.DataFrame | None = None,
    ) -> EngagementLog:
        # Ties are broken by article id so the history order never depends on input order.
        e = engagements.sort(["user_id", "engaged_at", "article_id"])
        item = catalog.rows(e["article_id"].to_numpy(), "engagements.article_id")
        bits = np.zeros(e.height, dtype=np.int16)
        for a, name in enumerate(ACTIONS):
            bits |= e[name].fill_null(False).to_numpy().astype(np.int16) << a
        time_us = _micros(e["engaged_at"])
        return cls(
            user=e["user_id"].to_numpy().astype(np.int64),
            time_us=time_us,
            item=item,
            actions=bits,
            dwell=np.log1p(e["dwell_seconds"].fill_null(0.0).to_numpy().clip(0)).astype(np.float32),
            age=age_bucket(time_us - catalog.published_us[item]),
            exposures=None if impressions is None else ExposureLog.build(impressions, catalog),
            catalog_topic=catalog.topic,
            catalog_author=catalog.author_id,
        )

    @functools.cached_property
    def shown_topic(self) -> PairCounter:
        """(user, topic) exposures; needs `exposures` and the catalog the log was built on."""
        assert self.exposures is not None and self.catalog_topic is not None
        return self.exposures.pair_counter(self.catalog_topic)

    @functools.cached_property
    def shown_author(self) -> PairCounter:
        assert self.exposures is not None and self.catalog_author is not None
        return self.exposures.pair_counter(self.catalog_author)

    def _positives(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user, item, time_us) of the positive engagements."""
        pos = self.positive()
        return self.user[pos], self.item[pos], self.time_us[pos]

    @functools.cached_property
    def positive_author(self) -> PairCounter:
        """(user, author) positive engagements."""
        assert self.catalog_author is not None
        return _attribute_counter(self.catalog_author, *self._positives())

    @functools.cached_property
    def positive_total(self) -> PairCounter:
        """Positive engagements per user (the pair's second id is always 0)."""
        user, _, time_us = self._positives()
        return PairCounter.build(user, np.zeros_like(user), time_us)

    @functools.cached_property
    def positive_topic(self) -> PairCounter:
        """(user, topic) positive engagements."""
        assert self.catalog_topic is not None
        return _attribute_counter(self.catalog_topic, *self._positives())

    @functools.cached_property
    def _author_positives(self) -> tuple[np.ndarray, int, int, int]:
        assert self.catalog_author is not None
        _, item, time_us = self._positives()
        return _attribute_index(self.catalog_author, item, time_us)

    @functools.cached_property
    def _author_shown(self) -> tuple[np.ndarray, int, int, int]:
        assert self.exposures is not None and self.catalog_author is not None
        return _attribute_index(self.catalog_author, self.exposures.item, self.exposures.time_us)

    def author_counts(self, item: np.ndarray, time_us: np.ndarray) -> tuple[np.ndarray, ...]:
        """(everyone's positives, everyone's exposures) of the author of catalog row `item`
        strictly before `time_us`; zeros for unknown authors and without exposures."""
        assert self.catalog_author is not None
        author = self.catalog_author[item]
        known = author >= 0
        a = np.maximum(author, 0)
        engaged = np.where(known, _count_before(self._author_positives, a, time_us), 0.0)
        shown = np.zeros(len(a), dtype=np.float32)
        if self.exposures is not None:
            shown = np.where(known, _count_before(self._author_shown, a, time_us), 0.0)
        return engaged.astype(np.float32), shown.astype(np.float32)

    @functools.cached_property
    def _item_positives(self) -> tuple[np.ndarray, int, int, int]:
        _, item, time_us = self._positives()
        return _time_keys(item, time_us)

    def positives_before(self, item: np.ndarray, time_us: np.ndarray) -> np.ndarray:
        """Everyone's positive engagements with catalog row `item` strictly before `time_us`
        (element-wise), as float32 counts."""
        return _count_before(self._item_positives, item, time_us)

    def positive(self) -> np.ndarray:
        bits = sum(1 << ACTIONS.index(a) for a in POSITIVE_ACTIONS)
        return (self.actions & bits) != 0

    def history(self, users: np.ndarray, times_us: np.ndarray, cfg: FeatureConfig) -> History:
        """Last `cfg.history_len` engagements of each user strictly before each time.

        A sort-merge: query events sort before engagement events at the same (user, time),
        so the running count of engagements at a query is the end of its window in the
        engagement order, and "strictly before" holds by construction.
        """
        length = cfg.history_len
        users = np.asarray(users, dtype=np.int64)
        times_us = np.asarray(times_us, dtype=np.int64)
        q = len(users)
        ev_user = np.concatenate([self.user, users])
        ev_time = np.concatenate([self.time_us, times_us])
        ev_is_eng = np.concatenate([np.ones(len(self.user), np.int8), np.zeros(q, np.int8)])
        order = np.lexsort((ev_is_eng, ev_time, ev_user))
        n_before = np.cumsum(ev_is_eng[order]) - ev_is_eng[order]
        end = np.empty(q, dtype=np.int64)
        is_query = order >= len(self.user)
        end[order[is_query] - len(self.user)] = n_before[is_query]
        start = np.searchsorted(self.user, users, side="left")
        idx = end[:, None] - length + np.arange(length)[None, :]
        valid = idx >= start[:, None]
        idx = np.where(valid, idx, 0)
        if len(self.user) == 0:
            valid[:] = False

        def gather(values: np.ndarray, fill: float | int) -> np.ndarray:
            if len(values) == 0:
                return np.full((q, length), fill, dtype=values.dtype)
            return np.where(valid, values[idx], fill).astype(values.dtype)

        # The log is sorted by (user, time): a user's first engagement sits at `start`.
        user_first = np.full(q, NEVER_US, dtype=np.int64)
        if len(self.user):
            pos = start.clip(0, len(self.user) - 1)
            user_first = np.where(self.user[pos] == users, self.time_us[pos], NEVER_US)
        return History(
            item=gather(self.item, 0),
            actions=gather(self.actions, 0),
            dwell=gather(self.dwell, 0.0),
            age=gather(self.age, 0),
            time_us=times_us,
            user_bucket=hash_buckets(users, cfg.user_buckets, 2, cfg.id_hashes),
            user_first_us=user_first.astype(np.int64),
        )
