"""Publish feeds into the serving DuckDB file, atomically.

The new file is built beside the live one (`feeds.duckdb.tmp-<random>`), checkpointed,
closed, fsynced and renamed over the live path with `os.replace`. A rename is atomic on a
POSIX file system, so a reader opening the path gets either the old file or the new one,
never a mix; a reader that already has the old file open keeps reading the old inode,
which stays intact until it closes. If the build fails or is killed, the live file is
untouched; the half-built temporary file is removed (or, after a kill, swept away by the
next publish).

Tables and views in the file:
- feeds(user_id, position, article_id, author_id, author_handle, title, score, source,
  p_<action>..., dwell_seconds, reason, model_version, vector_table_version,
  generated_at), ordered by user_id, position so a point lookup reads one row group.
  Title and author handle are joined in at publish time: a lookup then touches one table,
  where joining the articles table per request costs several times the lookup itself
  (docs/BENCHMARKS.md, lookup);
- articles(article_id, title, author_id, author_handle, topic_name, published_at) for the
  posts in feeds, for analysts;
- meta: one row describing the generation;
- views feed_summary (per source), feed_users (per user), feed_readable (who sees what).

Beside it, `feeds.lookup/<generation_id>.lookup` holds the served columns of `feeds` as
memory-mappable arrays, the HTTP service's fast read path (serving/lookup.py). It is
renamed into place before the serving file, so the generation a reader opens always has
its lookup file; the lookup files of older generations are swept after the swap.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl

from feed_dagster.atomic import TMP_MARKER, remove_temp, replace_atomically, temp_path_beside
from feed_dagster.data.schema import FEED_SCHEMA
from feed_dagster.errors import DataValidationError
from feed_dagster.pipeline.tables import naive_utc
from feed_dagster.serving.lookup import lookup_path_for, sweep_lookup_files, write_lookup

FEED_COLUMNS: tuple[str, ...] = tuple(FEED_SCHEMA)
VERSION_COLUMNS: tuple[str, ...] = ("model_version", "vector_table_version", "generated_at")
# The served table leads with these columns, then the author handle and title joined in at
# publish time, then the rest of FEED_COLUMNS (scores, probabilities, reason).
KEY_COLUMNS: tuple[str, ...] = ("user_id", "position", "article_id", "author_id")
# A temporary file this old is left over from a killed publish, not one in progress.
STALE_TMP_AFTER = timedelta(hours=6)

FeedsInput = str | Path | pl.DataFrame | Sequence[str | Path] | Sequence[pl.DataFrame]


@dataclass(frozen=True)
class PublishResult:
    path: Path
    generation_id: str
    rows: int
    users: int
    bytes: int
    seconds: float
    model_version: str
    vector_table_version: str
    generated_at: datetime
    lookup_path: Path | None = None  # the generation's lookup file (serving/lookup.py)


def publish_feeds(
    feeds: FeedsInput,
    serving_path: str | Path,
    *,
    model_version: str,
    vector_table_version: str,
    generated_at: datetime,
    articles: pl.DataFrame | None = None,
    users: pl.DataFrame | None = None,
    memory_limit: str | None = "4GB",
) -> PublishResult:
    """Build the serving file from feed shards (Parquet paths or frames in FEED_SCHEMA)
    and swap it in atomically. `articles` (canonical articles table) and `users` (for
    author handles) fill the `articles` table; without them it is empty.

    `memory_limit` caps DuckDB's memory for the build (sorting and checking tens of
    millions of rows); past it DuckDB spills to a temporary directory beside the file.
    None leaves DuckDB's default (80% of RAM)."""
    t0 = time.perf_counter()
    generated_at = naive_utc(generated_at)  # TIMESTAMP columns hold naive UTC
    live = Path(serving_path)
    live.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(live)
    tmp = temp_path_beside(live)
    generation_id = uuid.uuid4().hex
    config = {"memory_limit": memory_limit} if memory_limit else {}
    con = duckdb.connect(str(tmp), config=config)
    lookup = lookup_path_for(live, generation_id)
    lookup_tmp: Path | None = None
    swapped = False
    try:
        _register_articles(con, articles, users)
        _load_feeds(con, feeds, (model_version, vector_table_version, generated_at))
        _check_feeds(con)
        _load_articles(con)
        _create_views(con)
        rows, n_users = _write_meta(
            con, generation_id, model_version, vector_table_version, generated_at
        )
        lookup_tmp = write_lookup(con, "feeds", lookup, generation_id)
        con.execute("CHECKPOINT")
        con.close()
        # The lookup file first: whoever opens the new serving file finds it in place.
        replace_atomically(lookup_tmp, lookup)
        replace_atomically(tmp, live)
        swapped = True
    except BaseException:
        con.close()
        for suffix in ("", ".wal", ".tmp"):
            remove_temp(tmp.with_name(tmp.name + suffix))
        if lookup_tmp is not None:
            remove_temp(lookup_tmp)
        if not swapped:
            lookup.unlink(missing_ok=True)  # a generation that never went live
        raise
    sweep_lookup_files(live, generation_id)
    return PublishResult(
        path=live,
        generation_id=generation_id,
        rows=rows,
        users=n_users,
        bytes=live.stat().st_size,
        seconds=time.perf_counter() - t0,
        model_version=model_version,
        vector_table_version=vector_table_version,
        generated_at=generated_at,
        lookup_path=lookup,
    )


def _load_feeds(
    con: duckdb.DuckDBPyConnection, feeds: FeedsInput, versions: tuple[str, str, datetime]
) -> None:
    """CREATE TABLE feeds from Parquet files or frames, ordered by user_id, position."""
    # By name, not position: a column added to or moved in FEED_SCHEMA cannot shift
    # another one into the key block.
    head = ", ".join(f'f."{c}"' for c in KEY_COLUMNS)
    rest = ", ".join(f'f."{c}"' for c in FEED_COLUMNS if c not in KEY_COLUMNS)
    select = f"{head}, a.author_handle, a.title, {rest}"
    tail = (
        "?::VARCHAR AS model_version, ?::VARCHAR AS vector_table_version, "
        "?::TIMESTAMP AS generated_at"
    )
    items = [feeds] if isinstance(feeds, str | Path | pl.DataFrame) else list(feeds)
    params: list[object] = [*versions]
    if not items or all(isinstance(i, pl.DataFrame) for i in items):
        frames = [_conform(f, f"frame #{n}") for n, f in enumerate(items)]  # type: ignore[arg-type]
        frame = pl.concat(frames) if frames else pl.DataFrame(schema=FEED_SCHEMA)
        con.register("feeds_input", frame.to_arrow())
        source = "feeds_input"
    else:
        paths = [str(i) for i in items]
        for p in paths:
            _check_parquet(con, p)
        source = "read_parquet(?)"
        params.append(paths)
    con.execute(
        f"CREATE TABLE feeds AS SELECT {select}, {tail} FROM {source} f "
        "LEFT JOIN articles_input a ON a.article_id = f.article_id "
        "ORDER BY f.user_id, f.position",
        params,
    )


def _conform(frame: pl.DataFrame, what: str) -> pl.DataFrame:
    missing = [c for c in FEED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataValidationError(
            f"feeds {what}", None, f"columns {list(FEED_COLUMNS)}", f"{missing} missing"
        )
    return frame.select([pl.col(c).cast(t) for c, t in FEED_SCHEMA.items()])


def _check_parquet(con: duckdb.DuckDBPyConnection, path: str) -> None:
    if not Path(path).exists() and "://" not in path:
        raise FileNotFoundError(f"feed shard {path} does not exist")
    cols = {r[0] for r in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [path]).fetchall()}
    missing = [c for c in FEED_COLUMNS if c not in cols]
    if missing:
        raise DataValidationError(
            path, None, f"feed shard columns {list(FEED_COLUMNS)}", f"{missing} missing"
        )


def _check_feeds(con: duckdb.DuckDBPyConnection) -> None:
    """One row per (user, position) and no null keys: a shard passed twice, or two runs
    mixed, must fail the publish rather than serve a doubled feed."""
    bad = con.execute(
        "SELECT user_id, position, count(*) AS n FROM feeds GROUP BY ALL HAVING n > 1 LIMIT 1"
    ).fetchone()
    if bad:
        raise DataValidationError(
            "feeds to publish",
            "position",
            "one row per (user_id, position) (is a shard included twice?)",
            f"{bad[2]} rows",
            [{"user_id": bad[0], "position": bad[1]}],
        )
    nulls = con.execute(
        "SELECT count(*) FROM feeds WHERE user_id IS NULL OR position IS NULL OR article_id IS NULL"
    ).fetchone()
    if nulls and nulls[0]:
        raise DataValidationError(
            "feeds to publish",
            "user_id/position/article_id",
            "no nulls",
            f"{nulls[0]} rows with a null",
        )


def _register_articles(
    con: duckdb.DuckDBPyConnection, articles: pl.DataFrame | None, users: pl.DataFrame | None
) -> None:
    """Register `articles_input`: title and author handle per post (empty without data)."""
    cols = {
        "article_id": pl.Int64,
        "title": pl.String,
        "author_id": pl.Int64,
        "author_handle": pl.String,
        "topic_name": pl.String,
        "published_at": pl.Datetime("us"),
    }
    if articles is None:
        frame = pl.DataFrame(schema=cols)
    else:
        frame = articles.select("article_id", "title", "author_id", "topic_name", "published_at")
        if users is not None:
            handles = users.select(
                pl.col("user_id").alias("author_id"), pl.col("handle").alias("author_handle")
            )
            frame = frame.join(handles, on="author_id", how="left")
        else:
            frame = frame.with_columns(author_handle=pl.lit(None, dtype=pl.String))
        frame = frame.select([pl.col(c).cast(t) for c, t in cols.items()])
    con.register("articles_input", frame.to_arrow())


def _load_articles(con: duckdb.DuckDBPyConnection) -> None:
    """The `articles` table: every post in feeds."""
    con.execute(
        "CREATE TABLE articles AS SELECT a.* FROM articles_input a "
        "WHERE a.article_id IN (SELECT DISTINCT article_id FROM feeds) ORDER BY a.article_id"
    )
    con.unregister("articles_input")


def _create_views(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        """
        CREATE VIEW feed_summary AS
        SELECT source, count(*) AS rows, count(DISTINCT user_id) AS users,
               avg(score) AS mean_score, avg(position) AS mean_position
        FROM feeds GROUP BY source ORDER BY source
        """
    )
    con.execute(
        """
        CREATE VIEW feed_users AS
        SELECT user_id, count(*) AS posts,
               count(*) FILTER (WHERE source = 'in_network') AS in_network,
               count(*) FILTER (WHERE source = 'out_of_network') AS out_of_network,
               max(score) AS top_score
        FROM feeds GROUP BY user_id ORDER BY user_id
        """
    )
    con.execute(
        """
        CREATE VIEW feed_readable AS
        SELECT user_id, position, title, author_handle, reason, source, score, article_id
        FROM feeds ORDER BY user_id, position
        """
    )


def _write_meta(
    con: duckdb.DuckDBPyConnection,
    generation_id: str,
    model_version: str,
    vector_table_version: str,
    generated_at: datetime,
) -> tuple[int, int]:
    now = datetime.now(UTC).replace(tzinfo=None)  # naive UTC, like every table
    rows, users = con.execute("SELECT count(*), count(DISTINCT user_id) FROM feeds").fetchone()  # type: ignore[misc]
    con.execute(
        """
        CREATE TABLE meta AS SELECT
            ?::VARCHAR AS generation_id, ?::VARCHAR AS model_version,
            ?::VARCHAR AS vector_table_version, ?::TIMESTAMP AS generated_at,
            ?::BIGINT AS rows, ?::BIGINT AS users, ?::TIMESTAMP AS published_at
        """,
        [generation_id, model_version, vector_table_version, generated_at, rows, users, now],
    )
    return int(rows), int(users)


def _remove_stale_tmp(live: Path) -> None:
    """Delete temporary files a killed publish left beside `live`."""
    cutoff = time.time() - STALE_TMP_AFTER.total_seconds()
    for leftover in live.parent.glob(f"{live.name}{TMP_MARKER}*"):
        try:
            if leftover.stat().st_mtime < cutoff:
                remove_temp(leftover)
        except FileNotFoundError:
            pass
