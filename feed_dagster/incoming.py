"""Batches of new activity and safety actions dropped as Parquet files into an incoming
folder.

A batch file is named `<kind>-<anything>.parquet`:

* `articles`: article_id, published_at, kind, conversation_id, title, text (+ the other
  article columns) -> table articles;
* `engagements`: user_id, article_id, engaged_at (+ actions, impression_id,
  dwell_seconds) -> engagements;
* `deletions`: article_id, deleted_at -> deleted_posts (tombstones);
* `blocks`: user_id, blocked_id -> blocks;
* `mutes`: user_id, muted_id -> mutes.

Ingesting validates every file (readable Parquet, required columns present and non-null,
types, ids >= 0, value domains, timestamps in the plausible window, unique keys, no
self-blocks, references to known users and articles), then appends the rows to the
warehouse in one transaction and only then moves the files to `done/`; a batch that fails
validation moves to `failed/` beside a `.error.txt` that says why, and nothing of it is
written. Deletions become tombstones (the article row stays: history and evaluation keep
their meaning); a block or mute already recorded, or a post already deleted, is not
recorded twice. A file with the columns but no rows is a no-op (an exporter with nothing
to report), not an error.

With the warehouse on a bucket (data/warehouse_store.py), the transaction runs on in-memory
copies of the tables it reads and changes, and after its commit each changed table is
uploaded whole: readers see every table whole, but an upload that fails part-way leaves
the batch in some tables and not in others, with the files still in the incoming folder.

When a batch carried deletions, blocks or mutes, or engagements while feeds are published,
the ingest also rewrites the safety list beside the serving file (`serving/safety.py`), so
readers drop those posts and authors, and the posts a user has just engaged with, from the
next lookup on, before any feed refresh. Committed batches in `done/` are
replayed on top of the source when the raw tables are rebuilt, so a full rebuild never
loses ingested activity or deletions.

Because it writes both the warehouse and the serving side's safety list, this module sits
above `data` and `serving` (see tests/test_layers.py), not inside `data`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import duckdb
import polars as pl

from feed_dagster.artifacts import Location
from feed_dagster.data.schema import TABLE_SCHEMAS, World
from feed_dagster.data.validate import (
    check_canonical,
    check_unique,
    conform_checked,
    read_parquet,
)
from feed_dagster.data.warehouse_store import connect_remote, is_remote_warehouse, upload_tables
from feed_dagster.errors import DataValidationError
from feed_dagster.serving.safety import (
    build_safety_file,
    publish_safety_file,
    seen_in_live_feeds,
    serving_path_for,
)

# batch kind -> warehouse table
BATCH_TABLES = {
    "articles": "articles",
    "engagements": "engagements",
    "deletions": "deleted_posts",
    "blocks": "blocks",
    "mutes": "mutes",
}
SAFETY_KINDS = ("deletions", "blocks", "mutes")
TIME_COLUMN = {"articles": "published_at", "engagements": "engaged_at", "deletions": "deleted_at"}
REQUIRED = {
    "articles": ("article_id", "published_at", "kind", "conversation_id", "title", "text"),
    "engagements": ("user_id", "article_id", "engaged_at"),
    "deletions": ("article_id", "deleted_at"),
    "blocks": ("user_id", "blocked_id"),
    "mutes": ("user_id", "muted_id"),
}
# Keys a batch may not repeat. Safety actions are sets: a repeated row means the same
# action and collapses, so they have no entry here.
UNIQUE = {
    "articles": ["article_id"],
    "engagements": ["user_id", "article_id", "impression_id", "engaged_at"],
}
EDGE_TARGET = {"blocks": "blocked_id", "mutes": "muted_id"}


class BatchError(DataValidationError):
    """A batch file that cannot be ingested: names the file, the column, the rule and the
    first offending rows (a DataValidationError like every other bad input)."""

    @classmethod
    def wrap(cls, err: DataValidationError) -> BatchError:
        if isinstance(err, BatchError):
            return err
        out = cls(err.file, err.column, err.expected, err.found, err.rows)
        out.__cause__ = err
        return out


@dataclass
class IngestReport:
    files: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # by warehouse table
    now: datetime | None = None
    safety_file: Path | None = None  # rewritten safety list, when the batch changed it


def pending_batches(incoming: Path) -> list[Path]:
    """Batch files waiting in `incoming` (not in done/ or failed/), oldest name first."""
    if not incoming.is_dir():
        return []
    return sorted(p for p in incoming.glob("*.parquet") if p.is_file())


def table_of(path: Path) -> str:
    """The batch kind of a file, from its name."""
    kind = path.name.split("-", 1)[0]
    if kind not in BATCH_TABLES:
        raise BatchError(
            str(path),
            None,
            f"a name '<kind>-<anything>.parquet' with kind one of {tuple(BATCH_TABLES)}",
            f"'{path.name}': cannot tell the table",
        )
    return kind


def read_batch(path: Path) -> tuple[str, pl.DataFrame]:
    """The batch kind and its rows in the warehouse table's schema, or BatchError.

    Checks everything that needs only the file itself (module doc); references to the
    warehouse are checked inside the ingest transaction."""
    kind = table_of(path)
    table = BATCH_TABLES[kind]
    file = str(path)
    try:
        df = conform_checked(table, read_parquet(path, file), file, REQUIRED[kind])
        check_canonical(table, df, file)
        if kind in UNIQUE:
            check_unique(df, file, UNIQUE[kind])
        if kind in EDGE_TARGET:
            target = EDGE_TARGET[kind]
            bad = df.with_row_index("row").filter(pl.col("user_id") == pl.col(target))
            if bad.height:
                raise DataValidationError.from_frame(
                    file,
                    target,
                    f"{target} different from user_id (nobody {kind[:-1]}s themselves)",
                    f"{bad.height} rows acting on the user themselves",
                    bad.select("row", "user_id", target),
                )
    except DataValidationError as exc:
        raise BatchError.wrap(exc) from exc
    return kind, df


def _unknown(
    con: duckdb.DuckDBPyConnection,
    df: pl.DataFrame,
    column: str,
    target_sql: str,
    extra: pl.Series | None = None,
) -> pl.DataFrame:
    """Rows of df whose non-null `column` is neither in `target_sql`'s ids nor in `extra`."""
    known = con.execute(target_sql).pl().to_series()
    if extra is not None and extra.len():
        known = pl.concat([known.cast(pl.Int64), extra.cast(pl.Int64)])
    return (
        df.with_row_index("row")
        .filter(pl.col(column).is_not_null() & ~pl.col(column).is_in(known.implode()))
        .select("row", column)
    )


def _check_references(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    kind: str,
    df: pl.DataFrame,
    new_articles: pl.DataFrame,
) -> None:
    if df.is_empty():
        return
    file = str(path)
    users = "select user_id from main.users"
    articles = "select article_id from main.articles"

    def fail(column: str, bad: pl.DataFrame, target: str) -> None:
        if bad.height:
            raise BatchError.from_frame(
                file,
                column,
                f"ids present in the warehouse's {target} (or this ingest's articles)",
                f"{bad.height} rows refer to unknown {target.rstrip('s')} ids",
                bad,
            )

    if kind == "articles":
        dup = df.join(con.execute(articles).pl(), on="article_id", how="semi")
        if dup.height:
            raise BatchError.from_frame(
                file,
                "article_id",
                "new article ids",
                f"{dup.height} article ids already in the warehouse",
                dup.select("article_id"),
            )
        fail("author_id", _unknown(con, df, "author_id", users), "users")
        for column in ("parent_id", "conversation_id"):
            bad = _unknown(con, df, column, articles, new_articles["article_id"])
            fail(column, bad, "articles")
    elif kind in ("engagements", "deletions"):
        fail(
            "article_id",
            _unknown(con, df, "article_id", articles, new_articles["article_id"]),
            "articles",
        )
        if kind == "engagements":
            fail("user_id", _unknown(con, df, "user_id", users), "users")
    else:
        for column in ("user_id", EDGE_TARGET[kind]):
            fail(column, _unknown(con, df, column, users), "users")


# Safety actions are sets: insert only what is not recorded yet (a repeated delete keeps
# its first time).
_INSERT = {
    "deletions": """
        INSERT INTO main.deleted_posts
        SELECT article_id, min(deleted_at) FROM batch_rows
        WHERE article_id NOT IN (SELECT article_id FROM main.deleted_posts)
        GROUP BY article_id""",
    "blocks": """
        INSERT INTO main.blocks
        SELECT DISTINCT user_id, blocked_id FROM batch_rows
        EXCEPT SELECT user_id, blocked_id FROM main.blocks""",
    "mutes": """
        INSERT INTO main.mutes
        SELECT DISTINCT user_id, muted_id FROM batch_rows
        EXCEPT SELECT user_id, muted_id FROM main.mutes""",
}


def _ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Warehouses built before tombstones existed get an empty deleted_posts table."""
    con.execute(
        "CREATE TABLE IF NOT EXISTS main.deleted_posts (article_id BIGINT, deleted_at TIMESTAMP)"
    )


def _tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    query = "select table_name from information_schema.tables where table_schema = 'main'"
    return {r[0] for r in con.execute(query).fetchall()}


# The tables an ingest reads (users, for references) or changes.
INGEST_TABLES = (
    "users",
    "articles",
    "engagements",
    "deleted_posts",
    "blocks",
    "mutes",
    "world_info",
)


def ingest_batches(
    warehouse: Location, files: list[Path], safety_path: Path | None = None
) -> IngestReport:
    """Append every batch to the warehouse in one transaction, then move files to done/.

    Raises BatchError (after moving the offending file to failed/) when any file is bad;
    in that case nothing is written (warehouse, safety list) and the other files stay
    where they were. With `safety_path`, a batch that carried deletions, blocks or mutes
    rewrites the safety list there (built inside the transaction, renamed into place after
    the commit).
    """
    report = IngestReport()
    if not files:
        return report
    batches: list[tuple[Path, str, pl.DataFrame]] = []
    for path in files:
        try:
            kind, df = read_batch(path)
        except BatchError as exc:
            _quarantine(path, str(exc))
            raise
        batches.append((path, kind, df))
    new_articles = pl.concat(
        [df for _, k, df in batches if k == "articles"]
        or [pl.DataFrame(schema=TABLE_SCHEMAS["articles"])]
    )
    engaged = [df for _, k, df in batches if k == "engagements" and df.height]
    safety_changed = any(k in SAFETY_KINDS for _, k, _ in batches)
    if safety_path is not None and engaged:
        # New engagements make posts in live feeds "seen": the list must learn them.
        safety_changed = safety_changed or serving_path_for(safety_path).exists()
    tmp_safety: Path | None = None
    committed = False
    remote = is_remote_warehouse(warehouse)
    # On a bucket, the tables the ingest changes are read into memory, changed there in the
    # same transaction, and uploaded after its commit, each whole.
    con = (
        connect_remote(warehouse, copy=INGEST_TABLES) if remote else duckdb.connect(str(warehouse))
    )
    in_transaction = False
    try:
        before = _tables(con)
        con.execute("begin transaction")
        in_transaction = True
        _ensure_tables(con)
        for path, kind, df in batches:
            try:
                _check_references(con, path, kind, df, new_articles)
            except BatchError as exc:
                con.execute("rollback")
                _quarantine(path, str(exc))
                raise
            table = BATCH_TABLES[kind]
            con.register("batch_rows", df)
            if kind in _INSERT:
                con.execute(_INSERT[kind])
            else:
                con.execute(f"insert into main.{table} by name select * from batch_rows")
            con.unregister("batch_rows")
            report.rows[table] = report.rows.get(table, 0) + df.height
            latest = df[TIME_COLUMN[kind]].max() if kind in TIME_COLUMN else None
            if latest is not None and (report.now is None or latest > report.now):
                report.now = latest
        if report.now is not None:
            # The world's clock moves forward to the newest ingested activity.
            con.execute(
                "update main.world_info set now = greatest(now, ?::timestamp)", [report.now]
            )
        if safety_path is not None and safety_changed:
            seen = seen_in_live_feeds(
                safety_path,
                pl.concat([df.select("user_id", "article_id") for df in engaged])
                if engaged
                else pl.DataFrame(schema={"user_id": pl.Int64, "article_id": pl.Int64}),
            )
            tmp_safety = build_safety_file(con, safety_path, seen)
        con.execute("commit")
        in_transaction = False
        if remote:
            changed = [
                t
                for t in _tables(con)
                if t in report.rows
                or (t == "world_info" and report.now is not None)
                or (t in INGEST_TABLES and t not in before)
            ]
            # Each table is replaced whole, but not all at one instant: an upload that
            # fails part-way raises with the batch files still in `incoming`, and the
            # tables already uploaded hold the batch (see README, the warehouse on a bucket).
            upload_tables(con, warehouse, changed)
        committed = True
    except BatchError:
        raise
    except Exception:
        if in_transaction:
            con.execute("rollback")
        raise
    finally:
        con.close()
        # A safety list built for a transaction that did not commit must never go live.
        if tmp_safety is not None and not committed:
            tmp_safety.unlink(missing_ok=True)
    if tmp_safety is not None and safety_path is not None:
        publish_safety_file(tmp_safety, safety_path)
        report.safety_file = safety_path
    done = files[0].parent / "done"
    done.mkdir(exist_ok=True)
    for path, _, _ in batches:
        shutil.move(str(path), done / path.name)
        report.files.append(path.name)
    return report


def _quarantine(path: Path, reason: str) -> None:
    failed = path.parent / "failed"
    failed.mkdir(exist_ok=True)
    shutil.move(str(path), failed / path.name)
    (failed / f"{path.name}.error.txt").write_text(reason + "\n")


def done_batches(done: Path) -> list[Path]:
    """The committed batch files in `done/`, in the order they were committed."""
    return sorted(done.glob("*.parquet")) if done.is_dir() else []


def replay_done(world: World, done: Path) -> World:
    """The world with every committed batch in `done/` appended (for full rebuilds):
    new rows for articles and engagements, set union for tombstones, blocks and mutes."""
    files = done_batches(done)
    if not files:
        return world
    extra: dict[str, list[pl.DataFrame]] = {t: [] for t in BATCH_TABLES.values()}
    times: list[datetime] = []
    for path in files:
        kind, df = read_batch(path)
        extra[BATCH_TABLES[kind]].append(df)
        if kind in TIME_COLUMN and df.height:
            times.append(df[TIME_COLUMN[kind]].max())
    tables = {}
    for table, dfs in extra.items():
        if not dfs:
            continue
        merged = pl.concat([getattr(world, table), *dfs])
        if table == "deleted_posts":
            merged = merged.sort("deleted_at").unique("article_id", keep="first")
            merged = merged.sort("article_id")
        elif table in ("blocks", "mutes"):
            merged = merged.unique(maintain_order=True)
        tables[table] = merged
    return replace(world, **tables, now=max([world.now, *times]))
