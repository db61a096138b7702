"""The warehouse's two backends: the local DuckDB file, or one Parquet object per table on a
bucket.

Which one is decided by the location alone (`StorageLayout.warehouse_path`): a local path
is the DuckDB file under the storage root (the default); a URL is the prefix
`<FEED_DAGSTER_ARTIFACTS_URI>/warehouse`, holding `<table>.parquet` for each table of the
file's `main` schema. Workers on other machines share only the bucket, and DuckDB writes
only local files.

Writing a table to the bucket: DuckDB copies it to a local temporary Parquet file (so its
columns have the types a DuckDB table would give them, and both backends read back the
same frames), which is then uploaded in one PUT (`artifacts.writing`). A reader sees the
previous table or the new one, never part of one, and no temporary object.

Reading from the bucket: an in-memory DuckDB connection with one view per object,
`main."<table>"` over `read_parquet('s3://...')`, read through the s3fs filesystem
registered on the connection (DuckDB's httpfs extension is downloaded on first use, which
the machines this runs on cannot do). Every reader's SQL runs on it unchanged, and DuckDB
fetches only the columns and row groups a query needs, with ranged GETs: on the loopback
test server a 2M-row, 26 MB table reads whole in 0.7 s and through a selective filter in
0.4 s, about ten times a local file, against a download of the whole object first that
would give up the pruning on the wire.

A view reads its object when a query runs, so each table is always one whole version; but,
unlike the DuckDB file, two tables read in one session may come from two different writes
if a writer replaces one meanwhile, and tables written together change one by one. The
steps that write the warehouse and those that read much of it (training, evaluation, the
checks) share the `warehouse` pool, which keeps them apart.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import duckdb
import fsspec
import polars as pl

from feed_dagster.artifacts import (
    Location,
    check_reachable,
    filesystem,
    is_remote,
    join,
    writing_all,
)
from feed_dagster.paths import ARTIFACTS_URI_VARIABLE

TABLE_SUFFIX = ".parquet"
# What DuckDB may cache while it writes tables (its default is 80% of the machine's memory).
WRITER_MEMORY_LIMIT = "2GB"
# Tables being written are built under this prefix and renamed once all is written.
STAGING_PREFIX = "_writing_"


def is_remote_warehouse(warehouse: Location) -> bool:
    """Whether `warehouse` is a prefix of Parquet objects rather than a DuckDB file."""
    return is_remote(warehouse)


def table_location(warehouse: Location, name: str) -> Location:
    """The object of table `name` in a warehouse on a bucket."""
    return join(warehouse, name + TABLE_SUFFIX)


def check_warehouse(warehouse: Location) -> None:
    """Raise ArtifactsUnavailable, naming FEED_DAGSTER_ARTIFACTS_URI (the only setting that
    puts the warehouse on a bucket), unless the bucket exists and answers."""
    check_reachable(warehouse, ARTIFACTS_URI_VARIABLE)


def remote_table_names(warehouse: Location) -> list[str]:
    """The tables of a warehouse on a bucket (one LIST request); [] before any is written."""
    return _table_names(*filesystem(warehouse))


def _table_names(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    names = (str(e).rsplit("/", 1)[-1] for e in entries)
    return sorted(n.removesuffix(TABLE_SUFFIX) for n in names if n.endswith(TABLE_SUFFIX))


def connect_remote(warehouse: Location, copy: Iterable[str] = ()) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection whose `main."<table>"` views read the warehouse's
    objects on the bucket. Raises FileNotFoundError when the warehouse holds no table.

    The tables named in `copy` (those present) are read into memory as tables instead, for
    a writer to change and then `upload_tables`."""
    check_warehouse(warehouse)
    # This connection's own filesystem keeps the one listing below: DuckDB asks for an
    # object's size many times per query, one HEAD request each without it. (An object
    # replaced during the session then fails to read, rather than read as a mix.)
    fs, path = fsspec.url_to_fs(str(warehouse), skip_instance_cache=True)
    names = _table_names(fs, path)
    if not names:
        raise FileNotFoundError(
            f"warehouse {warehouse} holds no tables ({ARTIFACTS_URI_VARIABLE}): "
            "materialise the raw assets"
        )
    copied = set(copy)
    con = duckdb.connect()
    try:
        con.execute("set enable_progress_bar = false")
        con.register_filesystem(fs)
        for name in names:
            url = fs.unstrip_protocol(f"{path}/{name}{TABLE_SUFFIX}")
            kind = "table" if name in copied else "view"
            con.execute(f"create {kind} main.\"{name}\" as select * from read_parquet('{url}')")
    except BaseException:
        con.close()
        raise
    return con


def upload_tables(
    con: duckdb.DuckDBPyConnection, warehouse: Location, names: Iterable[str]
) -> None:
    """Write the tables `names` of the connection (tables, views or registered frames) to
    the bucket, each whole in one PUT."""
    names = list(names)
    with writing_all([table_location(warehouse, name) for name in names]) as tmps:
        for name, tmp in zip(names, tmps, strict=True):
            con.execute(
                f"copy (select * from \"{name}\") to '{tmp}' (format parquet, compression zstd)"
            )


def write_tables(
    warehouse: Location,
    tables: Mapping[str, pl.DataFrame],
    parts: Iterable[Mapping[str, pl.DataFrame]] = (),
) -> dict[str, int]:
    """Create or replace the tables `tables` (name -> frame) in the warehouse, empty frames
    included, then append each of `parts` (name -> more rows of one of `tables`) as it
    comes, so a table may be written that is never whole in memory. Returns each table's
    row count.

    Nothing shows until all is written: in the DuckDB file the new tables take their names
    in one transaction at the end (`_fill`); for a bucket, a temporary local DuckDB file
    takes them, then each table goes up in one PUT."""
    if not is_remote_warehouse(warehouse):
        Path(warehouse).parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(warehouse), config={"memory_limit": WRITER_MEMORY_LIMIT})
        try:
            return _fill(con, tables, parts)
        finally:
            con.close()
    check_warehouse(warehouse)
    with tempfile.TemporaryDirectory(prefix="feed-warehouse-") as tmp:
        con = duckdb.connect(
            str(Path(tmp) / "tables.duckdb"), config={"memory_limit": WRITER_MEMORY_LIMIT}
        )
        try:
            rows = _fill(con, tables, parts)
            upload_tables(con, warehouse, tables)
        finally:
            con.close()
    return rows


def _fill(
    con: duckdb.DuckDBPyConnection,
    tables: Mapping[str, pl.DataFrame],
    parts: Iterable[Mapping[str, pl.DataFrame]],
) -> dict[str, int]:
    """Write each table under a staging name (`STAGING_PREFIX`), statement by statement,
    then, in one transaction, drop the old tables and give the new ones their names.

    Not one transaction throughout: DuckDB keeps a transaction's appended rows in memory
    until it commits (1M users' impressions would not fit), while rows appended outside
    one go to the file. A failure drops the staged tables; the old ones stay as they were."""
    # DuckDB's progress bar would print into the step's log.
    con.execute("set enable_progress_bar = false")
    staged = {name: f'main."{STAGING_PREFIX}{name}"' for name in tables}
    rows = {}
    in_transaction = False
    try:
        for name, df in tables.items():
            _from_frame(con, f"create or replace table {staged[name]} as select * from _frame", df)
            rows[name] = df.height
        for part in parts:
            for name, df in part.items():
                if name not in rows:
                    raise ValueError(f"rows for table {name!r}, which is not among {sorted(rows)}")
                _from_frame(con, f"insert into {staged[name]} select * from _frame", df)
                rows[name] += df.height
        con.execute("begin transaction")
        in_transaction = True
        for name in tables:
            con.execute(f'drop table if exists main."{name}"')
            con.execute(f'alter table {staged[name]} rename to "{name}"')
        con.execute("commit")
    except BaseException:
        # Best effort: the error that stopped the writing is the one to raise.
        with contextlib.suppress(duckdb.Error):
            if in_transaction:
                con.execute("rollback")
            for table in staged.values():
                con.execute(f"drop table if exists {table}")
        raise
    return rows


def _from_frame(con: duckdb.DuckDBPyConnection, sql: str, df: pl.DataFrame) -> None:
    """Run `sql`, which reads the frame `df` as `_frame`."""
    con.register("_frame", df.to_arrow())
    try:
        con.execute(sql)
    finally:
        con.unregister("_frame")
