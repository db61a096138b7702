"""Batches of new posts and engagements dropped as Parquet files into an incoming folder.

A batch file is named `<table>-<anything>.parquet` where table is `articles` or
`engagements`, with the canonical columns of that table. Ingesting appends the rows to the
warehouse in one transaction and only then moves the files to `done/`; a batch that fails
validation moves to `failed/` beside a `.error.txt` that says why, and nothing of it is
written. Committed batches in `done/` are replayed on top of the source when the raw tables
are rebuilt, so a full rebuild never loses ingested activity.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb
import polars as pl

from feed_dagster.data.schema import TABLE_SCHEMAS, World, conform

BATCH_TABLES = ("articles", "engagements")
TIME_COLUMN = {"articles": "published_at", "engagements": "engaged_at"}
REQUIRED = {
    "articles": ("article_id", "published_at", "kind", "conversation_id", "title", "text"),
    "engagements": ("user_id", "article_id", "engaged_at"),
}


class BatchError(ValueError):
    """A batch file that cannot be ingested; the message names the file and the problem."""


@dataclass
class IngestReport:
    files: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    now: datetime | None = None


def pending_batches(incoming: Path) -> list[Path]:
    """Batch files waiting in `incoming` (not in done/ or failed/), oldest name first."""
    if not incoming.is_dir():
        return []
    return sorted(p for p in incoming.glob("*.parquet") if p.is_file())


def table_of(path: Path) -> str:
    table = path.name.split("-", 1)[0]
    if table not in BATCH_TABLES:
        raise BatchError(
            f"{path.name}: cannot tell the table; name batch files "
            f"'<table>-<anything>.parquet' with table one of {BATCH_TABLES}"
        )
    return table


def read_batch(path: Path) -> tuple[str, pl.DataFrame]:
    """The batch's table name and its rows in the canonical schema, or BatchError."""
    table = table_of(path)
    try:
        df = pl.read_parquet(path)
    except Exception as exc:  # a torn or non-Parquet file
        raise BatchError(f"{path.name}: not a readable Parquet file ({exc})") from exc
    missing = [c for c in REQUIRED[table] if c not in df.columns]
    if missing:
        raise BatchError(f"{path.name}: missing column(s) {missing} for table {table}")
    try:
        df = conform(table, df)
    except Exception as exc:
        raise BatchError(f"{path.name}: columns do not cast to the {table} schema ({exc})") from exc
    nulls = df.filter(pl.any_horizontal(pl.col(REQUIRED[table]).is_null()))
    if nulls.height:
        raise BatchError(
            f"{path.name}: {nulls.height} rows with nulls in {REQUIRED[table]}, "
            f"e.g. {nulls.head(3).to_dicts()}"
        )
    return table, df


def _check_references(
    con: duckdb.DuckDBPyConnection, name: str, df: pl.DataFrame, new_articles: pl.DataFrame
) -> None:
    if df.is_empty():
        return
    if name == "articles":
        dup = con.execute(
            "select count(*) from df join main.articles a using (article_id)"
        ).fetchone()[0]
        if dup:
            raise BatchError(f"articles batch repeats {dup} article ids already in the warehouse")
        return
    known_articles = pl.concat(
        [
            con.execute("select article_id from main.articles").pl(),
            new_articles.select("article_id"),
        ]
    )
    bad = df.join(known_articles, on="article_id", how="anti")
    if bad.height:
        raise BatchError(
            f"engagements batch: {bad.height} rows refer to unknown article ids, "
            f"e.g. {bad['article_id'].head(3).to_list()}"
        )
    users = con.execute("select user_id from main.users").pl()
    bad = df.join(users, on="user_id", how="anti")
    if bad.height:
        raise BatchError(
            f"engagements batch: {bad.height} rows refer to unknown user ids, "
            f"e.g. {bad['user_id'].head(3).to_list()}"
        )


def ingest_batches(warehouse: Path, files: list[Path]) -> IngestReport:
    """Append every batch to the warehouse in one transaction, then move files to done/.

    Raises BatchError (after moving the offending file to failed/) when any file is bad;
    in that case nothing is written and the other files stay where they were.
    """
    report = IngestReport()
    if not files:
        return report
    batches: list[tuple[Path, str, pl.DataFrame]] = []
    for path in files:
        try:
            table, df = read_batch(path)
        except BatchError as exc:
            _quarantine(path, str(exc))
            raise
        batches.append((path, table, df))
    new_articles = pl.concat(
        [df for _, t, df in batches if t == "articles"]
        or [pl.DataFrame(schema=TABLE_SCHEMAS["articles"])]
    )
    con = duckdb.connect(str(warehouse))
    try:
        con.execute("begin transaction")
        for path, table, df in batches:
            try:
                _check_references(con, table, df, new_articles)
            except BatchError as exc:
                con.execute("rollback")
                _quarantine(path, str(exc))
                raise
            con.register("batch_rows", df)
            con.execute(f"insert into main.{table} by name select * from batch_rows")
            con.unregister("batch_rows")
            report.rows[table] = report.rows.get(table, 0) + df.height
            latest = df[TIME_COLUMN[table]].max()
            if latest is not None and (report.now is None or latest > report.now):
                report.now = latest
        if report.now is not None:
            # The world's clock moves forward to the newest ingested activity.
            con.execute(
                "update main.world_info set now = greatest(now, ?::timestamp)", [report.now]
            )
        con.execute("commit")
    except BatchError:
        raise
    except Exception:
        con.execute("rollback")
        raise
    finally:
        con.close()
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


def replay_done(world: World, done: Path) -> World:
    """The world with every committed batch in `done/` appended (for full rebuilds)."""
    from dataclasses import replace

    files = sorted(done.glob("*.parquet")) if done.is_dir() else []
    if not files:
        return world
    extra: dict[str, list[pl.DataFrame]] = {t: [] for t in BATCH_TABLES}
    for path in files:
        table, df = read_batch(path)
        extra[table].append(df)
    tables = {t: pl.concat([getattr(world, t), *dfs]) for t, dfs in extra.items() if dfs}
    latest = max(
        (df[TIME_COLUMN[t]].max() for t, dfs in extra.items() for df in dfs), default=world.now
    )
    return replace(world, **tables, now=max(world.now, latest))
