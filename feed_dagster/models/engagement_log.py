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
from feed_dagster.models.counts import (
    CountsAt,
    CountsAtPoints,
    CountsAtTimes,
    KeyLayout,
    PairCounter,
    TimeIndex,
    attribute_index,
    time_index,
)
from feed_dagster.models.exposures import ExposureLog
from feed_dagster.sorted_search import search_sorted, unique

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


@dataclass(frozen=True)
class EveryonesPositives:
    """Every user's positive engagements per catalog row and per author, as the indexes an
    EngagementLog of every row builds (EngagementLog._item_positives, _author_positives),
    or as counts at a few times only, or at a trainer's points only
    (models.warehouse_engagements)."""

    item: TimeIndex | CountsAtTimes | CountsAtPoints
    author: TimeIndex | CountsAtTimes | CountsAtPoints

    @classmethod
    def of(
        cls, engagements: pl.DataFrame, catalog: ItemCatalog, times_us: tuple[int, ...] = ()
    ) -> EveryonesPositives:
        """With `times_us`, counts before those times only (CountsAtTimes): a count per
        post and per author and time, where the indexes hold a key per engagement."""
        present = [a for a in POSITIVE_ACTIONS if a in engagements.columns]
        positive = (
            pl.any_horizontal([pl.col(a).fill_null(False) for a in present])
            if present
            else pl.lit(False)
        )
        # As _micros reads them (a missing time is 0).
        t = pl.col("engaged_at").cast(pl.Datetime("us")).dt.epoch("us").fill_null(0)
        pos = engagements.lazy().filter(positive).select("article_id", t.alias("t"))
        if not times_us:
            rows = pos.collect()
            item = catalog.rows(rows["article_id"].to_numpy(), "engagements.article_id")
            time_us = rows["t"].to_numpy().astype(np.int64)
            return cls(time_index(item, time_us), attribute_index(catalog.author_id, item, time_us))
        per_post = {
            at: pos.filter(pl.col("t") < at).group_by("article_id").len("n").collect()
            for at in {int(x) for x in times_us}
        }
        return cls.from_counts(per_post, catalog)

    @classmethod
    def from_counts(
        cls, per_post: dict[int, pl.DataFrame], catalog: ItemCatalog
    ) -> EveryonesPositives:
        """From each time's (article_id, n) positive engagements before it, one row per
        engaged post: what `of` counts from a frame, or the warehouse from its table
        (models.warehouse_engagements)."""
        items, authors = {}, {}
        for at, counts in sorted(per_post.items()):
            counts = counts.sort("article_id")
            item = catalog.rows(counts["article_id"].to_numpy(), "engagements.article_id")
            n = counts["n"].to_numpy().astype(np.int64)
            # One article per catalog row, and the rows ascend with the ids.
            items[at] = CountsAt(item.astype(np.int64), n.astype(np.float32), at)
            author = catalog.author_id[item]
            known = author >= 0
            keys, inverse = np.unique(author[known], return_inverse=True)
            total = np.bincount(inverse, weights=n[known], minlength=len(keys))
            authors[at] = CountsAt(keys, total.astype(np.float32), at)
        return cls(CountsAtTimes(items), CountsAtTimes(authors))


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
    # The users whose rows the log holds (sorted); None: every user. Everyone's positives
    # per post and per author then come from every row, counted before the others were
    # left out (`everyone`).
    users: np.ndarray | None = None
    everyone: EveryonesPositives | None = None

    @classmethod
    def build(
        cls,
        engagements: pl.DataFrame,
        catalog: ItemCatalog,
        exposures: ExposureLog | pl.DataFrame | None = None,
        users: np.ndarray | None = None,
        times_us: tuple[int, ...] = (),
        everyone: EveryonesPositives | None = None,
    ) -> EngagementLog:
        """`exposures`: the logged impressions' count indexes, or a frame of impressions
        (user_id, article_id, shown_at) to build them from. `users`: keep only these
        users' rows (a feed shard's), for their histories and per-user counts; the counts
        over everyone stay those of every row, asked at `times_us` only when given (a feed
        run's, see EveryonesPositives). A feed shard holds 1/16 of the rows so. With
        `everyone` (counted where every row lives), `engagements` need hold only the
        users' rows."""
        if isinstance(exposures, pl.DataFrame):
            exposures = ExposureLog.build(exposures, catalog)
        if everyone is not None and users is None:
            raise ValueError("everyone's positives come with the users whose rows are kept")
        if users is not None:
            users = unique(np.asarray(users, dtype=np.int64))
            if everyone is None:
                everyone = EveryonesPositives.of(engagements, catalog, times_us)
            engagements = engagements.join(
                pl.DataFrame({"user_id": users}, schema={"user_id": engagements["user_id"].dtype}),
                on="user_id",
                how="semi",
            )
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
            exposures=exposures,
            catalog_topic=catalog.topic,
            catalog_author=catalog.author_id,
            users=users,
            everyone=everyone,
        )

    def require(self, users: np.ndarray) -> None:
        """Raise unless the log holds every row of each user of `users`: a user left out
        would silently have no history and no engagement counts."""
        if self.users is None or len(users) == 0:
            return
        users = np.asarray(users, dtype=np.int64)
        pos = np.searchsorted(self.users, users).clip(0, max(len(self.users) - 1, 0))
        missing = self.users[pos] != users if len(self.users) else np.ones(len(users), bool)
        if missing.any():
            raise ValueError(
                f"the engagement log holds {len(self.users):,} users' rows only, not "
                f"e.g. user {int(users[missing][0])}'s"
            )

    @property
    def shown_topic(self) -> PairCounter:
        """(user, topic) exposures; needs `exposures`."""
        assert self.exposures is not None
        return self.exposures.shown_topic

    @property
    def shown_author(self) -> PairCounter:
        assert self.exposures is not None
        return self.exposures.shown_author

    def _positives(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user, item, time_us) of the positive engagements."""
        pos = self.positive()
        return self.user[pos], self.item[pos], self.time_us[pos]

    @functools.cached_property
    def positive_author(self) -> PairCounter:
        """(user, author) positive engagements."""
        assert self.catalog_author is not None
        return PairCounter.of_attribute(self.catalog_author, *self._positives())

    @functools.cached_property
    def positive_total(self) -> PairCounter:
        """Positive engagements per user (the pair's second id is always 0)."""
        user, _, time_us = self._positives()
        return PairCounter.build(user, np.zeros_like(user), time_us)

    @functools.cached_property
    def positive_topic(self) -> PairCounter:
        """(user, topic) positive engagements."""
        assert self.catalog_topic is not None
        return PairCounter.of_attribute(self.catalog_topic, *self._positives())

    @functools.cached_property
    def _author_positives(self) -> TimeIndex | CountsAtTimes | CountsAtPoints:
        if self.everyone is not None:
            return self.everyone.author
        assert self.catalog_author is not None
        _, item, time_us = self._positives()
        return attribute_index(self.catalog_author, item, time_us)

    def author_counts(self, item: np.ndarray, time_us: np.ndarray) -> tuple[np.ndarray, ...]:
        """(everyone's positives, everyone's exposures) of the author of catalog row `item`
        strictly before `time_us`; zeros for unknown authors and without exposures."""
        assert self.catalog_author is not None
        author = self.catalog_author[item]
        known = author >= 0
        a = np.maximum(author, 0)
        engaged = np.where(known, self._author_positives.count_before(a, time_us), 0.0)
        shown = np.zeros(len(a), dtype=np.float32)
        if self.exposures is not None:
            everyone = self.exposures.shown_author_everyone
            shown = np.where(known, everyone.count_before(a, time_us), 0.0)
        return engaged.astype(np.float32), shown.astype(np.float32)

    @functools.cached_property
    def _item_positives(self) -> TimeIndex | CountsAtTimes | CountsAtPoints:
        if self.everyone is not None:
            return self.everyone.item
        _, item, time_us = self._positives()
        return time_index(item, time_us)

    def positives_before(self, item: np.ndarray, time_us: np.ndarray) -> np.ndarray:
        """Everyone's positive engagements with catalog row `item` strictly before `time_us`
        (element-wise), as float32 counts."""
        return self._item_positives.count_before(item, time_us)

    def positive(self) -> np.ndarray:
        bits = sum(1 << ACTIONS.index(a) for a in POSITIVE_ACTIONS)
        return (self.actions & bits) != 0

    @functools.cached_property
    def _user_times(self) -> tuple[np.ndarray, np.ndarray, KeyLayout]:
        """(distinct users, keys, layout): the log's (user, time) as one int64 per row,
        user rank * step + time. The log is sorted by (user, time), so the keys are too."""
        distinct = unique(self.user)
        n = len(self.user)
        layout = KeyLayout.of(
            n,
            len(distinct) - 1,
            int(self.time_us.min()) if n else 0,
            int(self.time_us.max()) if n else 0,
        )
        rank = np.searchsorted(distinct, self.user)
        keys = rank * layout.step + (self.time_us - layout.t0) // layout.resolution
        return distinct, keys, layout

    def history(self, users: np.ndarray, times_us: np.ndarray, cfg: FeatureConfig) -> History:
        """Last `cfg.history_len` engagements of each user strictly before each time.

        One binary search per query in the log's (user, time) keys: the engagements before
        (user, t) end where the key of (user, t) would be inserted on the left, so "strictly
        before" holds by construction. (Past 2**62 / users microseconds of log the keys
        count time in coarser steps and may leave out engagements in t's own step.)
        """
        length = cfg.history_len
        users = np.asarray(users, dtype=np.int64)
        times_us = np.asarray(times_us, dtype=np.int64)
        self.require(users)
        q = len(users)
        start = search_sorted(self.user, users)
        end = start.copy()
        if len(self.user):
            distinct, keys, lay = self._user_times
            rank = np.searchsorted(distinct, users).clip(0, len(distinct) - 1)
            known = distinct[rank] == users
            rel = np.clip((times_us - lay.t0) // lay.resolution, 0, lay.step - 1)
            found = search_sorted(keys, rank * lay.step + rel)
            end = np.where(known, found, start)
        idx = end[:, None] - length + np.arange(length)[None, :]
        valid = idx >= start[:, None]
        idx = np.where(valid, idx, 0)

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
