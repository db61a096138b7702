""" "How many events of this key strictly before t", answered by binary search.

An index is one sorted int64 array of `key * step + time`: the events of a key before a time
are a contiguous run of it, so a count is two `searchsorted` calls, for any number of
queries at once. The index can be built in numpy (`time_index`) or, for logs too big to load,
in DuckDB (`models.exposures`) from the same `KeyLayout`, so both give identical arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from feed_dagster.sorted_search import ascending, distinct, search_sorted, unique

# Pair keys a * PAIR_BASE + b (user, topic) or (user, author): ids below 2**31 each.
PAIR_BASE = 2**31
# From this many queries at one time, each distinct key is counted once (see per_distinct_key).
DISTINCT_MIN = 4096


class DistinctQueries:
    """Queries (key, time) asked of one or more counters, each distinct key once when every
    query is at one time.

    A feed batch asks at one `now` for hundreds of thousands of candidates that share a few
    thousand posts and authors and each user's few dozen topics. One sort of the keys
    replaces a sort per binary search (see sorted_search), the searches run over the
    distinct keys in ascending order, and the answers are spread back to the queries: the
    same counts, several times fewer passes. Several counters asked of the same keys share
    the one sort (ranker_data.engagement_profile)."""

    def __init__(self, key: np.ndarray, time_us: np.ndarray):
        key = np.asarray(key, dtype=np.int64)
        times = np.broadcast_to(np.asarray(time_us, dtype=np.int64), key.shape)
        self.key, self.time_us, self.inverse = key, times, None
        if key.ndim == 1 and key.size >= DISTINCT_MIN and one_time(times) and not ascending(key):
            self.key, self.inverse = distinct(key)
            self.time_us = times[: self.key.size]

    def of(self, count: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
        """`count(key, time_us)` of every query."""
        out = count(self.key, self.time_us)
        return out if self.inverse is None else out[self.inverse]


def per_distinct_key(
    count: Callable[[np.ndarray, np.ndarray], np.ndarray], key: np.ndarray, time_us: np.ndarray
) -> np.ndarray:
    """`count(key, time_us)`, asked once per distinct key when every query is at one time."""
    return DistinctQueries(key, time_us).of(count)


def one_time(time_us: np.ndarray) -> bool:
    """Whether every query of a (1-D) batch is at the same time."""
    return time_us.size == 0 or bool((time_us == time_us[0]).all())


def pair_key(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a * PAIR_BASE + b, or -1 where b is unknown (< 0): no pair has that key."""
    b = np.asarray(b, np.int64)
    return np.where(b >= 0, np.asarray(a, np.int64) * PAIR_BASE + b, -1)


@dataclass(frozen=True)
class KeyLayout:
    """How (key, time) events map to one int64: key * step + (time - t0) // resolution."""

    t0: int
    resolution: int
    step: int

    @classmethod
    def of(cls, n_events: int, max_key: int, t_min: int, t_max: int) -> KeyLayout:
        t0 = t_min if n_events else 0
        span = t_max - t0 + 2 if n_events else 2
        n_keys = max_key + 2 if n_events else 2
        # Coarser time steps when key * span would overflow int64. Counting floor(e / r) <
        # floor(t / r) still counts only events strictly before t (it may miss a few in the
        # same step), so no future event leaks in.
        resolution = 1
        while n_keys * (span // resolution + 2) >= 2**62:
            resolution *= 2
        return cls(t0, resolution, span // resolution + 2)


@dataclass(frozen=True)
class TimeIndex:
    """Sorted event keys under a layout: counts of a key's events before a time."""

    keys: np.ndarray  # int64, sorted
    layout: KeyLayout

    def count_before(self, key: np.ndarray, time_us: np.ndarray) -> np.ndarray:
        """Events of `key` strictly before `time_us` (element-wise), as float32."""
        if self.keys.size == 0:
            return np.zeros(len(key), dtype=np.float32)
        return per_distinct_key(self._count_before, key, time_us)

    def _count_before(self, key: np.ndarray, time_us: np.ndarray) -> np.ndarray:
        lay = self.layout
        # Times before the index's start count nothing; later ones are capped inside the key.
        rel = np.clip(
            (np.asarray(time_us, dtype=np.int64) - lay.t0) // lay.resolution, 0, lay.step - 1
        )
        first = search_sorted(self.keys, key * lay.step)
        upto = search_sorted(self.keys, key * lay.step + rel)
        return (upto - first).astype(np.float32)


@dataclass(frozen=True)
class CountsAt:
    """Each key's events strictly before one fixed time, one count per key: what a feed run
    asks of an index (every candidate is scored at the same `now`), in a fraction of the
    memory of a TimeIndex holding one key per event. Asking at another time is refused."""

    keys: np.ndarray  # int64, sorted unique
    counts: np.ndarray  # float32, per key
    at_us: int

    def count_before(self, key: np.ndarray, time_us: np.ndarray) -> np.ndarray:
        key = np.asarray(key, dtype=np.int64)
        times = np.asarray(time_us, dtype=np.int64)
        if times.size and not (times == self.at_us).all():
            raise ValueError(
                f"counts were taken at {self.at_us} us only, not at e.g. "
                f"{int(times[times != self.at_us][0])} us"
            )
        if self.keys.size == 0:
            return np.zeros(len(key), dtype=np.float32)
        return per_distinct_key(self._count, key, times)

    def _count(self, key: np.ndarray, _times: np.ndarray) -> np.ndarray:
        pos = search_sorted(self.keys, key).clip(0, self.keys.size - 1)
        return np.where(self.keys[pos] == key, self.counts[pos], 0.0).astype(np.float32)


@dataclass(frozen=True)
class CountsAtPoints:
    """A TimeIndex's counts at a fixed set of (key, time) points, one count per point: what a
    trainer asks of an index whose queries are all known up front (its sampled slates), in a
    fraction of the memory of one key per event. Asking at another point is refused."""

    points: np.ndarray  # int64, sorted unique key * step + time step (the index's layout)
    counts: np.ndarray  # float32, per point
    layout: KeyLayout

    @classmethod
    def of(cls, index: TimeIndex, key: np.ndarray, time_us: np.ndarray) -> CountsAtPoints:
        """`index`'s counts at the points (key[i], time_us[i])."""
        points = unique(_point_keys(index.layout, key, time_us))
        lay = index.layout
        counts = index.count_before(
            points // lay.step, lay.t0 + (points % lay.step) * lay.resolution
        )
        return cls(points, counts, lay)

    def count_before(self, key: np.ndarray, time_us: np.ndarray) -> np.ndarray:
        points = _point_keys(self.layout, key, time_us)
        if points.size == 0:
            return np.zeros(0, dtype=np.float32)
        pos = search_sorted(self.points, points).clip(0, max(self.points.size - 1, 0))
        found = self.points[pos] == points if self.points.size else np.zeros(points.size, bool)
        if not found.all():
            k = int(points[~found][0])
            raise ValueError(
                f"counts were taken at fixed points only, not at key {k // self.layout.step} "
                f"time step {k % self.layout.step}"
            )
        return self.counts[pos].astype(np.float32)


def _point_keys(layout: KeyLayout, key: np.ndarray, time_us: np.ndarray) -> np.ndarray:
    """(key, time) points as TimeIndex.count_before reads them: times clipped to the layout's
    span, so two times it would count alike are one point."""
    key = np.asarray(key, dtype=np.int64)
    rel = np.clip(
        (np.asarray(time_us, dtype=np.int64) - layout.t0) // layout.resolution, 0, layout.step - 1
    )
    return key * layout.step + rel


def time_index(key: np.ndarray, time_us: np.ndarray) -> TimeIndex:
    """The index of events (key[i], time_us[i]); keys are non-negative ints."""
    key = np.asarray(key, dtype=np.int64)
    time_us = np.asarray(time_us, dtype=np.int64)
    n = key.size
    layout = KeyLayout.of(
        n,
        int(key.max()) if n else 0,
        int(time_us.min()) if n else 0,
        int(time_us.max()) if n else 0,
    )
    keys = key * layout.step + (time_us - layout.t0) // layout.resolution
    keys.sort()
    return TimeIndex(keys, layout)


def attribute_index(of_item: np.ndarray, item: np.ndarray, time_us: np.ndarray) -> TimeIndex:
    """The index of events keyed by an attribute of their item (of_item[item], e.g. its
    author); events whose attribute is unknown (< 0) are left out."""
    key = of_item[item].astype(np.int64)
    known = key >= 0
    return time_index(key[known], time_us[known])


@dataclass(frozen=True)
class PairCounter:
    """How many (a, b) events happened strictly before a time: the pairs get dense ids, so
    one sorted (pair, time) index answers every query with two binary searches."""

    pairs: np.ndarray  # int64 sorted unique a * PAIR_BASE + b
    index: TimeIndex | CountsAt | CountsAtPoints  # keyed by the pair's position in `pairs`

    @classmethod
    def build(cls, a: np.ndarray, b: np.ndarray, time_us: np.ndarray) -> PairCounter:
        key = np.asarray(a, np.int64) * PAIR_BASE + np.asarray(b, np.int64)
        pairs, dense = np.unique(key, return_inverse=True)
        return cls(pairs, time_index(dense, time_us))

    @classmethod
    def of_attribute(
        cls, of_item: np.ndarray, user: np.ndarray, item: np.ndarray, time_us: np.ndarray
    ) -> PairCounter:
        """(user, of_item[item]) events; events whose attribute is unknown (< 0) are left out."""
        key = of_item[item].astype(np.int64)
        known = key >= 0
        return cls.build(user[known], key[known], time_us[known])

    def _find(self, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in `pairs`, whether the pair is there) of `pair_key`s; an unknown b's
        key (-1) is never there."""
        if self.pairs.size == 0:
            return np.zeros(len(key), np.int64), np.zeros(len(key), bool)
        pos = search_sorted(self.pairs, key).clip(0, self.pairs.size - 1)
        return pos, self.pairs[pos] == key

    def before(self, a: np.ndarray, b: np.ndarray, time_us: np.ndarray) -> np.ndarray:
        return self.before_keys(pair_key(a, b), time_us)

    def before_keys(self, key: np.ndarray, time_us: np.ndarray) -> np.ndarray:
        """`before` of pairs given as `pair_key`s."""
        if self.pairs.size == 0:
            return np.zeros(len(key), dtype=np.float32)
        return per_distinct_key(self._before, key, time_us)

    def _before(self, key: np.ndarray, time_us: np.ndarray) -> np.ndarray:
        pos, found = self._find(key)
        if isinstance(self.index, CountsAtPoints):
            # Only pairs with events were kept, at their queried times: ask for those only.
            time_us = np.broadcast_to(np.asarray(time_us, np.int64), key.shape)
            out = np.zeros(len(key), dtype=np.float32)
            out[found] = self.index.count_before(pos[found], time_us[found])
            return out
        return np.where(found, self.index.count_before(pos, time_us), 0.0).astype(np.float32)


@dataclass(frozen=True)
class CountsAtTimes:
    """CountsAt at a few fixed times (a feed run asks a post's engagement at `now` and some
    hours before): each key's events before each time, asked at any of them; other times
    are refused."""

    at: dict[int, CountsAt]  # by time in us

    def count_before(self, key: np.ndarray, time_us: np.ndarray) -> np.ndarray:
        key = np.asarray(key, dtype=np.int64)
        times = np.asarray(time_us, dtype=np.int64)
        out = np.zeros(len(key), dtype=np.float32)
        for t in unique(times):
            if int(t) not in self.at:
                raise ValueError(
                    f"counts were taken at {sorted(self.at)} us only, not at {int(t)} us"
                )
            rows = times == t
            out[rows] = self.at[int(t)].count_before(key[rows], times[rows])
        return out
