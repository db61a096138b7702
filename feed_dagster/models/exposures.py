"""Exposure counts: how often a user was shown a topic or an author, and how often anyone
was shown a post or an author's posts, strictly before a time.

The impression log is the biggest table a world has (62.7M rows at 100k users), and these
counts need all of it. Its rows never reach Python: DuckDB joins every impression to its
catalog row, author and topic and hands back only the finished keys of the four count
indexes (`models.counts`), sorted. The same queries run over an
in-memory frame (tests, serving) or over the warehouse's `impressions` table, so both give
the same arrays.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb
import numpy as np
import polars as pl

from feed_dagster.artifacts import Location
from feed_dagster.data.warehouse import arrow_batches, connect_read_only
from feed_dagster.models.catalog import ItemCatalog, to_micros
from feed_dagster.models.counts import (
    PAIR_BASE,
    CountsAt,
    CountsAtPoints,
    KeyLayout,
    PairCounter,
    TimeIndex,
    _point_keys,
    pair_key,
)
from feed_dagster.sorted_search import search_sorted, unique

EXPOSURE_MEMORY = "2GB"


def micros_sql(column: str) -> str:
    """SQL of a timestamp column in microseconds (0 when unknown), as the counts read times."""
    return f"coalesce(epoch_us({column}), 0)"


# An impression's time.
_SHOWN_US = micros_sql("e.shown_at")
# Every impression with its catalog row, the post's author and topic (-1: unknown) and time.
_EXPOSED = f"""
select e.user_id::bigint as user_id, c.item, c.author, c.topic, {_SHOWN_US} as t
from {{source}} e join exposure_catalog c using (article_id)
"""
# Events handed over at a time when counting at points: 2M int64 keys, 16 MiB.
_EVENT_BATCH = 1 << 21


@contextlib.contextmanager
def spilling(con: duckdb.DuckDBPyConnection, prefix: str) -> Iterator[None]:
    """`con` held to EXPOSURE_MEMORY, spilling to a temporary directory past it: DuckDB
    would otherwise take up to 80% of the machine for the distinct pairs and the joins."""
    with tempfile.TemporaryDirectory(prefix=prefix) as spill:
        con.execute(f"set memory_limit = '{EXPOSURE_MEMORY}'")
        con.execute(f"set temp_directory = '{spill}'")
        yield


def catalog_frame(catalog: ItemCatalog) -> pl.DataFrame:
    """(article_id, item, author, topic) of every catalog row: what the queries join each
    event to (-1: unknown author or topic)."""
    ids = catalog.article_ids
    return pl.DataFrame(
        {
            "article_id": ids,
            "item": np.arange(1, len(ids) + 1, dtype=np.int64),
            "author": catalog.author_id[1:],
            "topic": catalog.topic[1:].astype(np.int64),
        }
    )


@dataclass(frozen=True)
class ExposurePoints:
    """The (user, catalog row, time) points a trainer will read exposure counts at: its
    sampled impression rows. Counts kept at these points only are a small fraction of one
    key per impression (1.2M points against 62.7M impressions at 100k users)."""

    user: np.ndarray  # int64 [Q]
    item: np.ndarray  # int32 [Q] catalog rows
    time_us: np.ndarray  # int64 [Q]


@dataclass(frozen=True)
class ExposureLog:
    """Count indexes over logged impressions (who was shown which catalog row when)."""

    rows: int  # impressions counted
    shown_post: TimeIndex | CountsAt | CountsAtPoints  # keyed by catalog row
    shown_author_everyone: TimeIndex | CountsAt | CountsAtPoints  # keyed by author id
    shown_topic: PairCounter  # (user, topic)
    shown_author: PairCounter  # (user, author)
    # The users whose (user, ...) counts were built (sorted); None: every user. A feed
    # shard needs only its own users' counts, and the global ones.
    users: np.ndarray | None = None

    @classmethod
    def build(cls, impressions: pl.DataFrame, catalog: ItemCatalog) -> ExposureLog:
        """From a frame with user_id, article_id, shown_at."""
        con = duckdb.connect()
        try:
            frame = impressions.select("user_id", "article_id", "shown_at").to_arrow()
            con.register("impressions_frame", frame)
            return cls._query(con, "impressions_frame", catalog)
        finally:
            con.close()

    @classmethod
    def from_warehouse(
        cls,
        path: Location,
        catalog: ItemCatalog,
        users: np.ndarray | None = None,
        at: datetime | None = None,
        points: ExposurePoints | None = None,
    ) -> ExposureLog:
        """From the warehouse's `impressions` table, read by DuckDB column by column; the
        per-user counts only for `users` (all users when None).

        With `points`, the counts at those points only (see ExposurePoints): each index is
        cut down as soon as it is built, and any other query is refused.

        With `at`, the counts as of that one time: impressions shown before it, one count
        per key (`CountsAt`) rather than one key per impression. A feed run asks at `now`
        only, an evaluation at its cut, whose catalog does not know the posts published
        after it."""
        con = connect_read_only(path)
        try:
            if at is None:
                return cls._query(con, "main.impressions", catalog, users, points=points)
            at_us = _view_before(con, "main.impressions", at)
            return cls._query(con, "impressions_before", catalog, users, at_us)
        finally:
            con.close()

    def require(self, users: np.ndarray) -> None:
        """Raise unless every user of `users` has per-user counts here: a user left out
        would silently count zero exposures."""
        if self.users is None or len(users) == 0:
            return
        pos = np.searchsorted(self.users, users).clip(0, max(len(self.users) - 1, 0))
        missing = self.users[pos] != users if len(self.users) else np.ones(len(users), bool)
        if missing.any():
            raise ValueError(
                f"exposure counts were built for {len(self.users):,} users only, not for "
                f"e.g. user {int(np.asarray(users)[missing][0])}"
            )

    @classmethod
    def _query(
        cls,
        con: duckdb.DuckDBPyConnection,
        source: str,
        catalog: ItemCatalog,
        users: np.ndarray | None = None,
        at_us: int | None = None,
        points: ExposurePoints | None = None,
    ) -> ExposureLog:
        with spilling(con, "exposures-"):
            return cls._indexes(con, source, catalog, users, at_us, points)

    @classmethod
    def _indexes(
        cls,
        con: duckdb.DuckDBPyConnection,
        source: str,
        catalog: ItemCatalog,
        users: np.ndarray | None,
        at_us: int | None = None,
        points: ExposurePoints | None = None,
        totals: ExposureTotals | None = None,
    ) -> ExposureLog:
        con.register("exposure_catalog", catalog_frame(catalog).to_arrow())
        if users is not None:
            users = unique(np.asarray(users, dtype=np.int64))
            con.register("exposure_users", pl.DataFrame({"user_id": users}).to_arrow())
        if at_us is not None:  # `source` holds only the impressions before it
            return cls._indexes_at(con, source, users, at_us, totals)
        _refuse_unknown_articles(con, f"select distinct article_id from {source}")
        if points is not None:
            return cls._at_points(con, source, catalog, users, points)
        exposed = _EXPOSED.format(source=source)
        rows = con.execute(f"select count(*) from {source}").fetchone()[0]
        author = f"select author as k, t from ({exposed}) where author >= 0"
        scoped = exposed
        if users is not None:
            scoped = f"select * from ({exposed}) semi join exposure_users using (user_id)"
        post = f"select item as k, t from ({exposed})"
        return cls(
            rows=int(rows),
            shown_post=_index(con, post),
            shown_author_everyone=_index(con, author),
            shown_topic=_pairs(con, scoped, "topic"),
            shown_author=_pairs(con, scoped, "author"),
            users=users,
        )

    @classmethod
    def _at_points(
        cls,
        con: duckdb.DuckDBPyConnection,
        source: str,
        catalog: ItemCatalog,
        users: np.ndarray | None,
        points: ExposurePoints,
    ) -> ExposureLog:
        """The four counts at `points` only (see PointCounts), from two passes over the
        log: its rows joined to the catalog rows of the points' posts and of their
        authors' posts (everyone's counts), and the rows of `users` (None: everyone)
        joined to the whole catalog (the per-user counts)."""
        p = points
        author_id = catalog.author_id[p.item]
        # Rows of unknown authors ask author 0, as EngagementLog.author_counts does.
        author_of = np.maximum(author_id, 0)
        topic_of = catalog.topic[p.item].astype(np.int64)
        bounds = time_bounds(con, source, "shown_at")
        shown = f"select article_id, {_SHOWN_US} as t from {source} e"
        by_post, by_author = post_and_author_counts(
            con, shown, catalog_frame(catalog), p.item, author_of, p.time_us, bounds
        )
        scoped = source
        if users is not None:
            scoped = f"(select * from {source} semi join exposure_users using (user_id))"
        pairs = _user_pair_counts(
            con,
            _EXPOSED.format(source=scoped),
            p.user,
            {"topic": topic_of, "author": author_id},
            p.time_us,
            bounds,
        )
        return cls(
            rows=bounds[0],
            shown_post=by_post,
            shown_author_everyone=by_author,
            shown_topic=pairs["topic"],
            shown_author=pairs["author"],
            users=users,
        )

    @classmethod
    def for_users_at(
        cls,
        impressions: pl.DataFrame,
        catalog: ItemCatalog,
        users: np.ndarray,
        at: datetime,
        totals: ExposureTotals,
    ) -> ExposureLog:
        """The counts as of `at` for `users`, per-user ones from `impressions` (a frame
        holding at least every impression of theirs, as a feed shard reads them) and
        everyone's from `totals` (taken from the whole log at the same time): what
        from_warehouse(users=users, at=at) gives, without a pass over the whole log."""
        con = duckdb.connect()
        try:
            frame = impressions.select("user_id", "article_id", "shown_at")
            con.register("impressions_frame", frame.to_arrow())
            at_us = _view_before(con, "impressions_frame", at)
            if totals.at_us != at_us:
                raise ValueError(f"exposure totals taken at {totals.at_us} us, not at {at_us} us")
            return cls._indexes(con, "impressions_before", catalog, users, at_us, totals=totals)
        finally:
            con.close()

    @classmethod
    def _indexes_at(
        cls,
        con: duckdb.DuckDBPyConnection,
        source: str,
        users: np.ndarray | None,
        at_us: int,
        totals: ExposureTotals | None = None,
    ) -> ExposureLog:
        """The counts of every impression of `source` (all before `at_us`), from two passes
        over it: impressions per post (unless `totals` has them), and per (user, post) of
        `users`' (None: everyone's). Every count is a sum of those, so each row of the log
        is read twice instead of once per index and joined to its post's author and topic
        never."""
        if totals is None:
            totals = _totals_at(con, source, at_us)
        scoped = source
        if users is not None:
            scoped = f"(select * from {source} semi join exposure_users using (user_id))"
        con.execute(
            "create or replace temp table exposure_user_posts as "
            f"select user_id::bigint as user_id, article_id, count(*) as n from {scoped} "
            "group by user_id, article_id"
        )
        user_posts = "exposure_user_posts p join exposure_catalog c using (article_id)"
        counts = {
            "shown_topic": (
                f"select p.user_id * {PAIR_BASE} + c.topic as k, sum(p.n) as n "
                f"from {user_posts} where c.topic >= 0 group by k"
            ),
            "shown_author": (
                f"select p.user_id * {PAIR_BASE} + c.author as k, sum(p.n) as n "
                f"from {user_posts} where c.author >= 0 group by k"
            ),
        }
        pairs = {}
        for name, query in counts.items():
            at = _summed_at(con, query, at_us)
            pairs[name] = PairCounter(
                at.keys, CountsAt(np.arange(at.keys.size, dtype=np.int64), at.counts, at_us)
            )
        con.execute("drop table exposure_user_posts")
        return cls(
            rows=totals.rows,
            shown_post=totals.shown_post,
            shown_author_everyone=totals.shown_author_everyone,
            shown_topic=pairs["shown_topic"],
            shown_author=pairs["shown_author"],
            users=users,
        )

    def shown_before(self, item: np.ndarray, time_us: np.ndarray) -> np.ndarray:
        """How often catalog row `item` was shown (to anyone) strictly before `time_us`."""
        return self.shown_post.count_before(item, time_us)


def _stats(con: duckdb.DuckDBPyConnection, events: str) -> tuple[int, int, int, int]:
    """(rows, max key, min time, max time) of `events` (columns k, t)."""
    n, max_key, t_min, t_max = con.execute(
        f"select count(*), max(k), min(t), max(t) from ({events})"
    ).fetchone()
    return int(n), max_key or 0, t_min or 0, t_max or 0


def _index(
    con: duckdb.DuckDBPyConnection, events: str, stats: tuple[int, int, int, int] | None = None
) -> TimeIndex:
    """The TimeIndex of `events` (columns k, t), built as counts.time_index builds it;
    `stats` when they are known without a pass over `events`."""
    layout = KeyLayout.of(*(stats or _stats(con, events)))
    # DuckDB sorts on every core while it makes the keys: at 100k users (62.7M keys) 5.0 s
    # for the query and its sort, against 4.1 s for the query and 4.6 s for numpy's sort.
    keys = con.execute(
        f"select k * $step + (t - $t0) // $resolution as key from ({events}) order by key",
        {"step": layout.step, "t0": layout.t0, "resolution": layout.resolution},
    ).fetchnumpy()["key"]
    return TimeIndex(np.asarray(keys, dtype=np.int64), layout)


def time_bounds(con: duckdb.DuckDBPyConnection, table: str, column: str) -> tuple[int, int, int]:
    """(rows, first and last time in us, 0 when unknown) of the timestamp `column` of
    `table`: one pass over one column, bounds for the events of any keys of it (see
    PointCounts)."""
    t = micros_sql(column)
    n, t_min, t_max = con.execute(f"select count(*), min({t}), max({t}) from {table}").fetchone()
    return int(n), t_min or 0, t_max or 0


class PointCounts:
    """Counts of events at fixed (key, time) points, each point's events of its key strictly
    before its time, under a layout for keys up to the points' largest and times within
    `bounds` (rows, first and last time of a set of events holding these): the counts
    CountsAtPoints.of takes from a TimeIndex of the same events, without building the index.

    The events stream past the sorted points once (`add`, a batch at a time): each is
    counted at the first point of its key after it, and a running sum over each key's
    points gives the counts. Events of keys no point asks about are never counted (keys
    above the points' largest must not reach `event`, whose layout ends there). At 1M
    users an index of everyone's exposures to the points' authors held 417M keys for DuckDB
    to sort (past its memory limit, on disk) and hand over whole, to be asked at about a
    million points."""

    def __init__(self, key: np.ndarray, time_us: np.ndarray, bounds: tuple[int, int, int]):
        key = np.asarray(key, dtype=np.int64)
        n, t_min, t_max = bounds
        self.layout = KeyLayout.of(n, int(key.max()) if key.size else 0, t_min, t_max)
        self.points = unique(_point_keys(self.layout, key, time_us))
        self._counted = np.zeros(self.points.size, dtype=np.int64)

    def event(self, key: str, time_us: str) -> str:
        """SQL of an event's key under the layout, from SQL of its key and its time (-1,
        no event, when there are no points to count at)."""
        if not self.points.size:
            return "-1"
        lay = self.layout
        return f"{key} * {lay.step} + ({time_us} - {lay.t0}) // {lay.resolution}"

    def add(self, events: np.ndarray) -> None:
        """Count a batch of events (`event` keys, in any order; negative: not an event)."""
        if not self.points.size:
            return
        # Sorted first (a batch's order does not matter here): searching ascending needles
        # walks the points once, 0.10 s for 2M needles into 1.2M points against 0.59 s for
        # search_sorted, which keeps their order.
        e = np.sort(events)
        e = e[np.searchsorted(e, 0) :]
        at = np.searchsorted(self.points, e, side="right")
        inside = at < self.points.size
        at, e = at[inside], e[inside]
        step = self.layout.step
        at = at[self.points[at] // step == e // step]
        self._counted += np.bincount(at, minlength=self.points.size)

    def counts(self) -> CountsAtPoints:
        if not self.points.size:
            return CountsAtPoints(self.points, np.zeros(0, np.float32), self.layout)
        running = np.cumsum(self._counted)
        keys = self.points // self.layout.step
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        before = (running - self._counted)[starts]
        sizes = np.diff(np.r_[starts, self.points.size])
        counts = (running - np.repeat(before, sizes)).astype(np.float32)
        return CountsAtPoints(self.points, counts, self.layout)


def stream_counts(con: duckdb.DuckDBPyConnection, query: str, counts: list[PointCounts]) -> None:
    """Count the events of `query`, whose i-th column holds those of `counts[i]` (-1 in a
    row that is none of its), in one pass."""
    for batch in arrow_batches(con.execute(query), _EVENT_BATCH):
        for i, c in enumerate(counts):
            c.add(batch.column(i).to_numpy())


def post_and_author_counts(
    con: duckdb.DuckDBPyConnection,
    events: str,
    items: pl.DataFrame,
    item: np.ndarray,
    author: np.ndarray,
    time_us: np.ndarray,
    bounds: tuple[int, int, int],
) -> tuple[CountsAtPoints, CountsAtPoints]:
    """Counts at the points (item[i], time_us[i]) and (author[i], time_us[i]) of `events`
    (columns article_id, t) by catalog row and by author (`items`: a catalog_frame), from
    one pass over the events of the points' posts and of their authors' posts: DuckDB
    joins each event to its catalog row once, and the rows of posts nobody asks about
    never leave it."""
    posts = PointCounts(item, time_us, bounds)
    authors = PointCounts(author, time_us, bounds)
    asked = items.with_columns(
        post=pl.col("item").is_in(unique(np.asarray(item, np.int64))),
        by_author=pl.col("author").is_in(unique(np.asarray(author, np.int64)))
        & (pl.col("author") >= 0),
    ).filter(pl.col("post") | pl.col("by_author"))
    con.register("counted_posts", asked.to_arrow())
    stream_counts(
        con,
        f"select case when c.post then {posts.event('c.item', 'e.t')} else -1 end, "
        f"case when c.by_author then {authors.event('c.author', 'e.t')} else -1 end "
        f"from ({events}) e join counted_posts c using (article_id)",
        [posts, authors],
    )
    con.unregister("counted_posts")
    return posts.counts(), authors.counts()


def _user_pair_counts(
    con: duckdb.DuckDBPyConnection,
    exposed: str,
    user: np.ndarray,
    by_attribute: dict[str, np.ndarray],
    time_us: np.ndarray,
    bounds: tuple[int, int, int],
) -> dict[str, PairCounter]:
    """(user, attribute) exposures counted at the points (user[i], values[i], time_us[i]),
    for each attribute (topic, author) and its `values`, from one pass over `exposed`:
    every pair asked about keeps its counts at its points (zero for a pair never shown)."""
    out, counts, keys, joins = {}, [], [], []
    times = np.asarray(time_us, np.int64)
    for name, values in by_attribute.items():
        key = pair_key(user, values)
        known = key >= 0
        pairs = unique(key[known])
        table = f"exposure_points_{name}_pairs"
        dense = np.arange(pairs.size, dtype=np.int64)
        con.register(table, pl.DataFrame({"pk": pairs, "dense": dense}).to_arrow())
        counted = PointCounts(search_sorted(pairs, key[known]), times[known], bounds)
        out[name] = (pairs, counted)
        counts.append(counted)
        keys.append(f"case when {name} >= 0 then user_id * {PAIR_BASE} + {name} end as {name}_pk")
        joins.append(f"left join {table} {name}_p on {name}_p.pk = e.{name}_pk")
    events = ", ".join(
        f"coalesce({c.event(f'{n}_p.dense', 'e.t')}, -1)"
        for n, c in zip(by_attribute, counts, strict=True)
    )
    matched = " or ".join(f"{n}_p.dense is not null" for n in by_attribute)
    stream_counts(
        con,
        f"select {events} from (select {', '.join(keys)}, t from ({exposed})) e "
        f"{' '.join(joins)} where {matched}",
        counts,
    )
    return {name: PairCounter(pairs, c.counts()) for name, (pairs, c) in out.items()}


def _pairs(con: duckdb.DuckDBPyConnection, exposed: str, attribute: str) -> PairCounter:
    """(user, attribute) exposures as a PairCounter: pairs get their rank among the distinct
    pairs as dense id, as `PairCounter.build` gives them."""
    pair = f"user_id * {PAIR_BASE} + {attribute}"
    known = f"select {pair} as pk, t from ({exposed}) where {attribute} >= 0"
    # One pass over the exposures gives the distinct pairs and the index's stats (rows,
    # first and last time), which the join below then need not count.
    con.execute(
        f"""create or replace temp table exposure_pairs as
        select pk, count(*) as n, min(t) as t_min, max(t) as t_max,
            (row_number() over (order by pk)) - 1 as dense
        from ({known}) group by pk"""
    )
    pairs = np.asarray(
        con.execute("select pk from exposure_pairs order by pk").fetchnumpy()["pk"], np.int64
    )
    n, t_min, t_max = con.execute(
        "select coalesce(sum(n), 0), min(t_min), max(t_max) from exposure_pairs"
    ).fetchone()
    events = f"select p.dense as k, e.t from ({known}) e join exposure_pairs p using (pk)"
    index = _index(con, events, (int(n), len(pairs) - 1, t_min or 0, t_max or 0))
    con.execute("drop table exposure_pairs")
    return PairCounter(pairs, index)


@dataclass(frozen=True)
class ExposureTotals:
    """Everyone's impressions strictly before one time: how many, and per catalog row and
    per author. The same in every feed shard of a refresh (models.shared_inputs)."""

    rows: int
    shown_post: CountsAt  # keyed by catalog row
    shown_author_everyone: CountsAt  # keyed by author id
    at_us: int

    @classmethod
    def from_warehouse(cls, path: Location, catalog: ItemCatalog, at: datetime) -> ExposureTotals:
        """From one pass over the warehouse's impressions before `at`."""
        con = connect_read_only(path)
        try:
            at_us = _view_before(con, "main.impressions", at)
            with spilling(con, "exposures-"):
                con.register("exposure_catalog", catalog_frame(catalog).to_arrow())
                return _totals_at(con, "impressions_before", at_us)
        finally:
            con.close()


def _totals_at(con: duckdb.DuckDBPyConnection, source: str, at_us: int) -> ExposureTotals:
    """ExposureTotals of `source` (impressions, all before `at_us`) from one pass over it;
    refuses impressions of posts the registered exposure_catalog does not hold."""
    con.execute(
        "create or replace temp table exposure_posts as "
        f"select article_id, count(*) as n from {source} group by article_id"
    )
    _refuse_unknown_articles(con, "select article_id from exposure_posts")
    rows = con.execute("select coalesce(sum(n), 0) from exposure_posts").fetchone()[0]
    posts = "exposure_posts p join exposure_catalog c using (article_id)"
    totals = ExposureTotals(
        rows=int(rows),
        shown_post=_summed_at(
            con, f"select c.item as k, sum(p.n) as n from {posts} group by k", at_us
        ),
        shown_author_everyone=_summed_at(
            con,
            f"select c.author as k, sum(p.n) as n from {posts} where c.author >= 0 group by k",
            at_us,
        ),
        at_us=at_us,
    )
    con.execute("drop table exposure_posts")
    return totals


def _view_before(con: duckdb.DuckDBPyConnection, table: str, at: datetime) -> int:
    """Create the view `impressions_before`: the rows of `table` shown strictly before
    `at`; returns `at` in microseconds."""
    if at.tzinfo is not None:  # the tables hold naive UTC times
        at = at.astimezone(UTC).replace(tzinfo=None)
    con.execute(
        "create temp view impressions_before as "
        f"select * from {table} where shown_at < '{at.isoformat()}'"
    )
    return to_micros(at)


def _summed_at(con: duckdb.DuckDBPyConnection, counts: str, at_us: int) -> CountsAt:
    """CountsAt from `counts` (columns k, n: integer counts per key, keys distinct)."""
    arrays = con.execute(f"select k, n::float as n from ({counts}) order by k").fetchnumpy()
    return CountsAt(np.asarray(arrays["k"], np.int64), np.asarray(arrays["n"], np.float32), at_us)


@dataclass(frozen=True)
class WarehouseExposures:
    """Exposure counts to read from the warehouse's whole impression log, for models whose
    impression frames hold only some users' rows (a feed shard's, an evaluation sample's):
    per-user counts for `users` only (None: everyone), as of the one time `at` the models
    score at (None: an index for any time; see ExposureLog.from_warehouse)."""

    path: Location
    users: np.ndarray | None = None
    at: datetime | None = None

    def load(self, catalog: ItemCatalog) -> ExposureLog:
        return ExposureLog.from_warehouse(self.path, catalog, self.users, self.at)


def _refuse_unknown_articles(con: duckdb.DuckDBPyConnection, article_ids: str) -> None:
    """Raise naming up to five of the article ids `article_ids` (a query) that the
    registered exposure_catalog does not hold: an impression of an unknown post."""
    missing = con.execute(
        f"select article_id from ({article_ids}) anti join exposure_catalog "
        "using (article_id) order by article_id limit 5"
    ).fetchall()
    if missing:
        raise ValueError(
            f"impressions.article_id: ids not in the articles table, e.g. {[m[0] for m in missing]}"
        )
