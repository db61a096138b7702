"""Read precomputed feeds from the serving DuckDB file.

Every read opens the file read-only, so readers never block a publish (which writes a
different file and renames it into place) and several processes can read at once.
Connections are made by ATTACHing the file to a private in-memory database rather than by
`duckdb.connect(path)`: DuckDB caches one database instance per path inside a process, so
`connect(path)` while another connection to that path is open would hand back the
*replaced* file. User input is always a bound parameter, never part of the SQL text.

Pages for the HTTP service (`FeedReader.page`) come from the generation's lookup file when
it has one (serving/lookup.py: the same rows as memory-mapped arrays, found by binary
search), because a DuckDB point lookup scans a whole row group; `get_feed` and everything
else query DuckDB.

Deleted posts and authors blocked or muted since the publish are dropped at read time from
the safety list beside the serving file (`serving/safety.py`), so a delete holds from the
ingest that recorded it, before any refresh. The remaining rows keep their published
positions (a gap shows where a post was removed).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl

from feed_dagster.data.schema import ACTIONS
from feed_dagster.paths import safety_path_for, serving_path
from feed_dagster.serving.lookup import PAGE_COLUMNS, LookupFile, LookupFileError, lookup_path_for
from feed_dagster.serving.safety import SafetyCache, SafetyList

log = logging.getLogger(__name__)

ALIAS = "serving"
# DuckDB buffer pool of a reader. Lookups of random users over a 2 GB file run ~1.4x
# faster with a 4 GB pool than with 1 GB (blocks stay decompressed in memory) and ~1.2x
# slower with 256 MB; the default keeps a long-lived reader's memory bounded.
READER_MEMORY = "1GB"
# Title and author handle were joined in at publish time: one table, one row group read.
# Positions are 1..n, so `position <= limit` is the LIMIT: DuckDB's top-N operator for
# ORDER BY ... LIMIT costs about twice this filtered sort of 35 rows.
FEED_QUERY = f"""
SELECT user_id, position, article_id, title, author_handle, author_id, score, source,
       reason, {", ".join(f"p_{a}" for a in ACTIONS)}, dwell_seconds,
       model_version, vector_table_version, generated_at
FROM {ALIAS}.feeds WHERE user_id = $user_id AND position <= $limit ORDER BY position
"""


# One page of a feed for the HTTP service (PAGE_COLUMNS, defined with the lookup file that
# holds exactly these columns): fetched as tuples, not a polars frame, because at ~35 rows
# building a DataFrame costs more than the lookup itself.
PAGE_QUERY = f"""
SELECT {", ".join(PAGE_COLUMNS)}
FROM {ALIAS}.feeds WHERE user_id = $user_id AND position > $after ORDER BY position
"""
_ARTICLE, _AUTHOR = PAGE_COLUMNS.index("article_id"), PAGE_COLUMNS.index("author_id")
USER_EXISTS_QUERY = f"SELECT 1 FROM {ALIAS}.feeds WHERE user_id = $user_id LIMIT 1"


@dataclass(frozen=True)
class Page:
    """One page of a user's feed, read on one connection, so rows and generation agree."""

    meta: dict[str, Any]  # the generation the rows come from (generation_id, versions...)
    rows: list[tuple[Any, ...]]  # PAGE_COLUMNS, by position, without hidden posts
    has_more: bool  # more visible rows after the last one
    user_known: bool  # the user has a feed in this generation


class FeedNotPublishedError(FileNotFoundError):
    """The serving file does not exist yet."""


def resolve_path(path: str | Path | None) -> Path:
    """`path`, or the serving file under the storage root (FEED_DAGSTER_DATA) when None;
    resolved at call time, so a changed environment is followed."""
    return serving_path() if path is None else Path(path)


def _missing(path: Path) -> FeedNotPublishedError:
    return FeedNotPublishedError(
        f"no serving file at {path}: feeds have not been published yet "
        "(run `make run` or materialise the published_feeds asset first)"
    )


def connect(
    path: str | Path | None = None, memory_limit: str = READER_MEMORY
) -> duckdb.DuckDBPyConnection:
    """A read-only connection with the serving file attached as `serving` (query
    `serving.feeds`, `serving.articles`, ...). It keeps reading the generation that was
    live when it opened, even after a publish replaces the file."""
    return _open(resolve_path(path), memory_limit)


def _open(path: Path, memory_limit: str = READER_MEMORY) -> duckdb.DuckDBPyConnection:
    if not path.exists():
        raise _missing(path)
    # One thread: a lookup reads one row group, and parallelism only adds scheduling
    # jitter. A bounded buffer pool: a long-lived reader touching random users would
    # otherwise cache blocks up to DuckDB's default of 80% of RAM.
    con = duckdb.connect(":memory:", config={"threads": 1, "memory_limit": memory_limit})
    try:
        # ATTACH takes no bound parameters; the path is configuration, not user input,
        # and is quoted as an SQL string literal.
        literal = "'" + str(path).replace("'", "''") + "'"
        con.execute(f"ATTACH {literal} AS {ALIAS} (READ_ONLY)")
    except BaseException:
        con.close()
        raise
    return con


def _check_args(user_id: int, limit: int) -> tuple[int, int]:
    if isinstance(user_id, bool) or not isinstance(user_id, int):
        raise TypeError(f"user_id must be an int, got {type(user_id).__name__}: {user_id!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a non-negative int, got {limit!r}")
    return user_id, limit


def _feed(con: duckdb.DuckDBPyConnection, user_id: int, limit: int) -> pl.DataFrame:
    return con.execute(FEED_QUERY, {"user_id": user_id, "limit": limit}).pl()


# Every position of a user's feed: with rows to drop, the page is filled from the rest.
ALL_POSITIONS = 2**31 - 1


def _safe_feed(
    con: duckdb.DuckDBPyConnection, safety: SafetyList, user_id: int, limit: int
) -> pl.DataFrame:
    """The feed without what the safety list hides; the plain lookup when it is empty."""
    if safety.empty:
        return _feed(con, user_id, limit)
    return safety.apply(_feed(con, user_id, ALL_POSITIONS), user_id).head(limit)


# One safety cache per serving file for one-shot `get_feed` calls: a stat per call, a
# reload only after an ingest replaced the file.
_SAFETY: dict[Path, SafetyCache] = {}


def _safety_for(path: Path) -> SafetyList:
    safety_path = safety_path_for(path)
    cache = _SAFETY.get(safety_path)
    if cache is None:
        cache = _SAFETY[safety_path] = SafetyCache(safety_path)
    return cache.current()


def get_feed(user_id: int, path: str | Path | None = None, limit: int = 35) -> pl.DataFrame:
    """The precomputed feed of `user_id`, best first, with titles and author handles.

    Opens the file for this one call; for many lookups use `FeedReader`, which keeps the
    connection. An unknown user gets an empty frame.
    """
    user_id, limit = _check_args(user_id, limit)
    path = resolve_path(path)
    con = _open(path)
    try:
        return _safe_feed(con, _safety_for(path), user_id, limit)
    finally:
        con.close()


class FeedReader:
    """Holds one read-only connection to the serving file for many lookups.

    Before each lookup it compares the file's identity (device, inode) with the one it
    opened; after a publish renamed a new file into place it reopens, so it serves the new
    generation from the next call on, and never a mix of two. It also drops what the
    safety list beside the file hides (deleted posts, newly blocked or muted authors),
    reloading that list only when the ingest replaced it.

    Pages (`page`, the HTTP service's read) come from the generation's lookup file when
    there is one (serving/lookup.py: a binary search and a slice, microseconds) and from a
    DuckDB query otherwise (milliseconds: the query scans the user's row group). Both
    return the same rows; `read_path` says which one is in use and why.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        memory_limit: str = READER_MEMORY,
        use_lookup: bool = True,
    ) -> None:
        self.path = resolve_path(path)
        self.memory_limit = memory_limit
        self.use_lookup = use_lookup
        self._con: duckdb.DuckDBPyConnection | None = None
        self._identity: tuple[int, int] | None = None
        self._meta: dict[str, Any] = {}
        self._lookup: LookupFile | None = None
        self._read_path = ""
        self._safety = SafetyCache(safety_path_for(self.path))

    def _identity_now(self) -> tuple[int, int]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise _missing(self.path) from None
        return st.st_dev, st.st_ino

    def _connection(self) -> duckdb.DuckDBPyConnection:
        identity = self._identity_now()
        if self._con is None or identity != self._identity:
            self.close()
            self._con = _open(self.path, self.memory_limit)
            self._identity = identity
            # The generation is fixed for the life of the connection: read it once, and
            # map the lookup file of exactly this generation.
            self._meta = _meta(self._con)
            self._lookup, self._read_path = self._open_lookup()
        return self._con

    def _open_lookup(self) -> tuple[LookupFile | None, str]:
        """The lookup file of the open generation, or None and why pages come from DuckDB.
        A missing or broken lookup file is not an error: the serving file holds the same
        rows, so pages are served from it, slower, and the reason is logged and shown by
        `read_path` (and /v1/health)."""
        if not self.use_lookup:
            return None, "duckdb (lookup file disabled)"
        generation = str(self._meta.get("generation_id", ""))
        path = lookup_path_for(self.path, generation)
        try:
            lookup = LookupFile.open(path, generation, self._meta.get("rows"))
        except FileNotFoundError:
            why = f"duckdb (no lookup file {path})"
        except (LookupFileError, OSError) as exc:
            why = f"duckdb (unusable lookup file: {exc})"
        else:
            return lookup, f"lookup file {path}"
        log.warning("serving pages of %s from DuckDB queries: %s", self.path, why)
        return None, why

    @property
    def read_path(self) -> str:
        """Where pages of the live generation come from: "lookup file <path>" or
        "duckdb (<why>)"."""
        self._connection()
        return self._read_path

    def get_feed(self, user_id: int, limit: int = 35) -> pl.DataFrame:
        user_id, limit = _check_args(user_id, limit)
        return _safe_feed(self._connection(), self._safety.current(), user_id, limit)

    def meta(self) -> dict[str, Any]:
        """The live generation (follows publishes like `get_feed`)."""
        self._connection()
        return dict(self._meta)

    def page(self, user_id: int, limit: int = 35, after: int = 0) -> Page:
        """Up to `limit` visible rows of the user's feed with position > `after`, as
        tuples of PAGE_COLUMNS, and the generation they were read from.

        Hidden rows (safety list) are skipped and the page is filled from the rows after
        them, so `after` = the last position of one page starts the next one."""
        user_id, limit = _check_args(user_id, limit)
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise ValueError(f"after must be a non-negative int, got {after!r}")
        con = self._connection()
        # Rows and meta from the same generation: both were set together by _connection.
        meta, lookup = self._meta, self._lookup
        safety = self._safety.current()
        if lookup is not None:
            rows, has_more, known = lookup.page(user_id, limit, after, safety)
            return Page(meta, rows, has_more, known)
        return _duckdb_page(con, meta, safety, user_id, limit, after)

    def example_users(self, n: int = 6) -> list[int]:
        """A few users with the fullest feeds among the first rows of the file: cheap on
        any size (reads the first row groups only), for a page to offer as examples."""
        rows = (
            self._connection()
            .execute(
                f"SELECT user_id FROM (SELECT user_id FROM {ALIAS}.feeds LIMIT 5000) "
                "GROUP BY user_id ORDER BY count(*) DESC, user_id LIMIT $n",
                {"n": n},
            )
            .fetchall()
        )
        return [int(r[0]) for r in rows]

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
            self._identity = None
        self._lookup = None  # unmapped once no page holds its arrays

    def __enter__(self) -> FeedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _duckdb_page(
    con: duckdb.DuckDBPyConnection,
    meta: dict[str, Any],
    safety: SafetyList,
    user_id: int,
    limit: int,
    after: int,
) -> Page:
    """`FeedReader.page` by a DuckDB query, for a generation without a usable lookup file."""
    rows = con.execute(PAGE_QUERY, {"user_id": user_id, "after": after}).fetchall()
    if not rows:
        known = (
            after > 0
            and con.execute(USER_EXISTS_QUERY, {"user_id": user_id}).fetchone() is not None
        )
        return Page(meta, [], False, known)
    if not safety.empty:
        n = len(rows)
        articles = np.fromiter((r[_ARTICLE] for r in rows), np.int64, n)
        # -1 for authorless news: ids are >= 0, so it never matches a hidden author.
        authors = np.fromiter((-1 if r[_AUTHOR] is None else r[_AUTHOR] for r in rows), np.int64, n)
        drop = safety.hidden(user_id, articles, authors)
        rows = [r for r, d in zip(rows, drop.tolist(), strict=True) if not d]
    return Page(meta, rows[:limit], len(rows) > limit, True)


def _meta(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    cur = con.execute(f"SELECT * FROM {ALIAS}.meta")
    names = [d[0] for d in cur.description]
    row = cur.fetchone()
    return dict(zip(names, row, strict=True)) if row else {}


def read_meta(path: str | Path | None = None) -> dict[str, Any]:
    """The generation the serving file holds (generation_id, versions, rows, users...)."""
    con = _open(resolve_path(path))
    try:
        return _meta(con)
    finally:
        con.close()


def read_served(path: str | Path | None = None) -> pl.DataFrame | None:
    """(user_id, article_id) of the live feeds, for the previously-served filter of the
    next run; None before the first publish."""
    path = resolve_path(path)
    if not path.exists():
        return None
    con = _open(path)
    try:
        return con.execute(f"SELECT user_id, article_id FROM {ALIAS}.feeds").pl()
    finally:
        con.close()
