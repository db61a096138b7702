"""Read-only access to the warehouse from outside the IO manager.

The warehouse is a DuckDB file, or Parquet objects on a bucket behind DuckDB views
(data/warehouse_store.py); `connect_read_only` gives a connection with the same `main`
tables either way, so every reader's SQL, column pruning and filters included, runs
unchanged on both.

DuckDB lets one process write a file; while it does, other processes cannot open it, even
read-only. Readers here retry with backoff for a bounded time instead of failing at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

from feed_dagster.artifacts import Location
from feed_dagster.data.warehouse_store import connect_remote, is_remote_warehouse


def connect_read_only(path: Location, timeout_s: float = 120.0) -> duckdb.DuckDBPyConnection:
    """A connection to the warehouse at `path` (a DuckDB file or a bucket prefix) that
    reads its tables as `main."<table>"`."""
    if is_remote_warehouse(path):
        return connect_remote(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"warehouse {path} does not exist: materialise the raw assets")
    delay, waited = 0.2, 0.0
    while True:
        try:
            con = duckdb.connect(str(path), read_only=True)
            # Long scans draw a progress bar on stdout, which ends up in every step's log.
            con.execute("set enable_progress_bar = false")
            return con
        except duckdb.IOException as exc:  # another process holds the write lock
            if waited >= timeout_s:
                raise TimeoutError(f"warehouse {path} stayed locked for {waited:.0f}s") from exc
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)


# What `read_tables(users=...)` puts in place of the whole impression log's count: one row,
# the impressions shown (to anyone) before the world's `now`.
IMPRESSION_TOTALS = "impression_totals"
# The users whose rows a frame of `engagements` holds, when it holds only some users' (a
# feed shard's, see read_tables): what every user shares is then read where the rows live.
ENGAGEMENT_USERS = "engagement_users"


def select_sql(name: str, columns: list[str] | None = None) -> str:
    """The query of table `name`, or of only its `columns` (DuckDB reads column by column,
    so the others are never fetched)."""
    listed = ", ".join(f'"{c}"' for c in columns) if columns else "*"
    return f'select {listed} from main."{name}"'


def read_table(path: Location, name: str, columns: list[str] | None = None) -> pl.DataFrame:
    """One table, or only its `columns`, from the warehouse at `path`."""
    con = connect_read_only(path)
    try:
        return con.execute(select_sql(name, columns)).pl()
    finally:
        con.close()


def read_tables(
    path: Location,
    names: list[str],
    optional: tuple[str, ...] = (),
    users: np.ndarray | None = None,
    totals_at: datetime | None = None,
    columns: dict[str, list[str]] | None = None,
    engagements_of_users: bool = False,
    scopes: dict[str, str] | None = None,
) -> dict[str, pl.DataFrame]:
    """Whole tables by name, read in one read-only session (one consistent snapshot);
    `columns` names the only columns to read of some of them.

    Names in `optional` that the warehouse lacks (tables added after it was built, such as
    deleted_posts) are left out of the result instead of failing the read. With `users` (a
    feed shard's), `impressions` holds only those users' rows, the largest table cut to
    what a shard reads per user, and IMPRESSION_TOTALS carries the one global figure read
    from it: how many impressions anyone was shown before `totals_at` (default: the
    world's `now`, when feeds are built; an evaluation builds them at its cut). With
    `engagements_of_users` too, `engagements` holds only those users' rows as well (20.8M
    rows at 100k users, 1.3M a shard's), and ENGAGEMENT_USERS names the users. `scopes`
    (with `users`) gives, by table name, the query of the only rows to read of it, which
    may name the users as the view `shard_users` (user_id) and, with
    `engagements_of_users`, their engagements as the table `shard_engagements`."""
    if (engagements_of_users or scopes) and users is None:
        raise ValueError("engagements_of_users and scopes need the users")
    con = connect_read_only(path)
    try:
        present = {
            r[0]
            for r in con.execute(
                "select table_name from information_schema.tables where table_schema = 'main'"
            ).fetchall()
        }
        wanted = [n for n in names if n in present or n not in optional]

        def select(name: str) -> str:
            return select_sql(name, (columns or {}).get(name))

        if users is None or "impressions" not in wanted:
            return {name: con.execute(select(name)).pl() for name in wanted}
        shard_users = pl.DataFrame({"user_id": np.asarray(users, np.int64)})
        con.register("shard_users", shard_users.to_arrow())
        queries = {name: (scopes or {}).get(name) or select(name) for name in wanted}
        # By user: a feed build hydrates each batch from its users' slice of these
        # (pipeline.tables.batch_tables), which needs them sorted.
        queries["impressions"] = (
            "select * from main.impressions semi join shard_users using (user_id) order by user_id"
        )
        if engagements_of_users and "engagements" in wanted:
            # Kept in the session: a scope may read them too (a shard's history posts)
            # without a second pass over every engagement. Sorted once, as they are read.
            con.execute(
                "create temp table shard_engagements as select * from main.engagements "
                "semi join shard_users using (user_id)"
            )
            queries["engagements"] = "select * from shard_engagements order by user_id"
            queries[ENGAGEMENT_USERS] = "select user_id from shard_users"
        at = "(select max(now) from main.world_info)" if totals_at is None else "$at::timestamp"
        queries[IMPRESSION_TOTALS] = (
            f"select count(*) as shown, {at} as now from main.impressions where shown_at < {at}"
        )
        params = {IMPRESSION_TOTALS: {"at": totals_at} if totals_at is not None else None}
        return {name: con.execute(q, params.get(name)).pl() for name, q in queries.items()}
    finally:
        con.close()


# Users with held-out impressions in a seeded random order; "<this> limit n" is the sample
# of n held-out users that both the evaluation and models.budget use.
HELDOUT_USERS_SQL = """
select user_id from (select distinct user_id from main.impressions where is_heldout)
order by hash(user_id, $seed), user_id
"""


# read_heldout_sample's `scoped` rows: a table's rows that concern the sampled users.
_SAMPLE_SCOPES = {
    "engagements": "{} where article_id in (select distinct article_id from main.impressions "
    "where is_heldout and user_id in (select user_id from _users))",
    "follows": "{} where follower_id in (select user_id from _users)",
}


def read_heldout_sample(
    path: Location,
    names: list[str],
    max_users: int,
    seed: int = 0,
    columns: dict[str, list[str]] | None = None,
    scoped: bool = False,
) -> tuple[dict[str, pl.DataFrame], dict[str, int]]:
    """Tables `names` for a held-out evaluation, read in one session: `impressions` (and
    `impression_truth`) are the held-out impressions of a seeded random sample of at most
    `max_users` users (every user when `max_users` is 0); other tables are read whole, or
    only the columns `columns` names for them. With `scoped`, `engagements` holds only the
    rows on the posts those impressions show (their labels and the posts' own histories)
    and `follows` only the sampled users' own: what is asked of everyone stays in the
    warehouse (at 1M users 165M engagement rows, 5.7 GiB as a frame).

    Returns (tables, {"evaluated_users", "heldout_users"}): per-user metrics on a fixed-size
    sample stay comparable across world sizes, and the sample size goes in the metadata."""
    if max_users < 0:
        raise ValueError(f"max_users must be >= 0 (0 = every user), got {max_users}")
    con = connect_read_only(path)
    try:
        limit = f" limit {int(max_users)}" if max_users else ""
        con.execute(f"create temp table _users as {HELDOUT_USERS_SQL}{limit}", {"seed": seed})
        available = con.execute(
            "select count(distinct user_id) from main.impressions where is_heldout"
        ).fetchone()[0]
        sampled = con.execute("select count(*) from _users").fetchone()[0]
        tables = {}
        for name in names:
            if name == "impressions":
                query = (
                    "select * from main.impressions where is_heldout "
                    "and user_id in (select user_id from _users)"
                )
            elif name == "impression_truth":
                query = (
                    "select t.* from main.impression_truth t semi join "
                    "(select impression_id from main.impressions where is_heldout and "
                    "user_id in (select user_id from _users)) using (impression_id)"
                )
            elif scoped and name in _SAMPLE_SCOPES:
                query = _SAMPLE_SCOPES[name].format(select_sql(name, (columns or {}).get(name)))
            else:
                query = select_sql(name, (columns or {}).get(name))
            tables[name] = con.execute(query).pl()
    finally:
        con.close()
    return tables, {"evaluated_users": int(sampled), "heldout_users": int(available)}


def scan_batches(
    path: Location, query: str, params: dict | None = None, rows: int = 1 << 21
) -> Iterator[pl.DataFrame]:
    """The rows of `query` on the warehouse at `path`, `rows` at a time: one pass over a
    table that need not fit in memory."""
    con = connect_read_only(path)
    try:
        for batch in arrow_batches(con.execute(query, params or {}), rows):
            yield pl.from_arrow(batch)
    finally:
        con.close()


def arrow_batches(result: duckdb.DuckDBPyConnection, rows: int) -> pa.RecordBatchReader:
    """The rows of an executed query as Arrow record batches of up to `rows` rows."""
    # to_arrow_reader is the newer name (DuckDB 1.4+) of fetch_record_batch.
    return getattr(result, "to_arrow_reader", result.fetch_record_batch)(rows)
