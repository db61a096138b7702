"""Read-only access to the DuckDB warehouse from outside the IO manager.

DuckDB lets one process write a file; while it does, other processes cannot open it, even
read-only. Readers here retry with backoff for a bounded time instead of failing at once.
"""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import polars as pl


def connect_read_only(path: Path, timeout_s: float = 120.0) -> duckdb.DuckDBPyConnection:
    if not Path(path).exists():
        raise FileNotFoundError(f"warehouse {path} does not exist: materialise the raw assets")
    delay, waited = 0.2, 0.0
    while True:
        try:
            return duckdb.connect(str(path), read_only=True)
        except duckdb.IOException as exc:  # another process holds the write lock
            if waited >= timeout_s:
                raise TimeoutError(f"warehouse {path} stayed locked for {waited:.0f}s") from exc
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)


def read_tables(
    path: Path, names: list[str], optional: tuple[str, ...] = ()
) -> dict[str, pl.DataFrame]:
    """Whole tables by name, read in one read-only session (one consistent snapshot).

    Names in `optional` that the warehouse lacks (tables added after it was built, such as
    deleted_posts) are left out of the result instead of failing the read."""
    con = connect_read_only(path)
    try:
        present = {
            r[0]
            for r in con.execute(
                "select table_name from information_schema.tables where table_schema = 'main'"
            ).fetchall()
        }
        return {
            name: con.execute(f'select * from main."{name}"').pl()
            for name in names
            if name in present or name not in optional
        }
    finally:
        con.close()
