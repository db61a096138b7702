"""Integrity checks on the canonical tables, as SQL over the DuckDB warehouse.

Each check counts offending rows inside DuckDB and fetches only a few of them, so checking a
100M-row table costs one scan and no copy of the table in Python. Each returns a
CheckOutcome naming the table, the column and a few offending rows, so a failure in the UI
says exactly what is wrong without opening the warehouse.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import duckdb

SAMPLE_ROWS = 5


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    n_bad: int = 0
    sample: list[dict] | None = None

    def metadata(self) -> dict[str, object]:
        meta: dict[str, object] = {"offending_rows": self.n_bad}
        if self.sample:
            meta["sample"] = str(self.sample)
        return meta


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _outcome(
    con: duckdb.DuckDBPyConnection,
    table: str,
    column: str,
    what: str,
    bad_sql: str,
    params: list | None = None,
) -> CheckOutcome:
    """Outcome of the query `bad_sql`, whose rows are the violations."""
    con.execute(f"create or replace temp table _bad as {bad_sql}", params or [])
    n_bad = con.execute("select count(*) from _bad").fetchone()[0]
    if n_bad == 0:
        return CheckOutcome(True, f"{table}.{column}: {what} holds")
    cur = con.execute(f"select * from _bad limit {SAMPLE_ROWS}")
    names = [d[0] for d in cur.description]
    sample = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    return CheckOutcome(
        False, f"{table}.{column}: {n_bad:,} rows violate '{what}', e.g. {sample}", n_bad, sample
    )


def unique_non_null(
    con: duckdb.DuckDBPyConnection, table: str, key: list[str], nullable: tuple[str, ...] = ()
) -> CheckOutcome:
    """The key combination is unique, and its columns non-null except those in `nullable`
    (a null there counts as one value, e.g. engagements outside any logged impression)."""
    column = ", ".join(key)
    cols = ", ".join(_q(c) for c in key)
    required = [c for c in key if c not in nullable]
    if required:
        null_rows = " or ".join(f"{_q(c)} is null" for c in required)
        nulls = _outcome(
            con,
            table,
            column,
            "key is never null",
            f"select {cols} from main.{_q(table)} where {null_rows}",
        )
        if not nulls.passed:
            return nulls
    if len(key) == 2 and not nullable:
        # A two-column key of non-null columns (checked above): first the values of the
        # first column under which the second repeats, from one group per first value,
        # then the exact duplicates under those only. At 62.7M impressions (5.3M
        # impression ids) this took 3.7 s against 7.6 s for grouping by both columns.
        outer, inner = _q(key[0]), _q(key[1])
        repeats = (
            f"select {outer} from main.{_q(table)} group by {outer} "
            f"having count(*) > len(list_distinct(list({inner})))"
        )
        dupes = (
            f"select {cols} from main.{_q(table)} where {outer} in ({repeats}) "
            "group by all having count(*) > 1 order by all"
        )
    else:
        # GROUP BY treats nulls as one value, as the rule wants for the nullable columns.
        dupes = f"select {cols} from main.{_q(table)} group by all having count(*) > 1 order by all"
    return _outcome(con, table, column, "key is unique", dupes)


def references(
    con: duckdb.DuckDBPyConnection, table: str, column: str, target: str, target_column: str
) -> CheckOutcome:
    """Every non-null value of table.column exists in target.target_column."""
    c, t = _q(column), _q(target_column)
    bad = (
        f"select distinct {c} from main.{_q(table)} where {c} is not null "
        f"and {c} not in (select {t} from main.{_q(target)} where {t} is not null) order by 1"
    )
    return _outcome(con, table, column, f"refers to an existing {target}.{target_column}", bad)


def no_self_follows(con: duckdb.DuckDBPyConnection) -> CheckOutcome:
    bad = "select * from main.follows where follower_id = followee_id"
    return _outcome(con, "follows", "follower_id, followee_id", "nobody follows themselves", bad)


def within_window(
    con: duckdb.DuckDBPyConnection,
    table: str,
    column: str,
    start: datetime | None,
    end: datetime,
) -> CheckOutcome:
    """Timestamps are non-null, not after `end` and (when given) not before `start`."""
    c = _q(column)
    cond, params = f"{c} is null or {c} > ?", [end]
    if start is not None:
        cond, params = f"{cond} or {c} < ?", [end, start]
    span = f"[{start}, {end}]" if start is not None else f"<= {end}"
    bad = f"select * from main.{_q(table)} where {cond}"
    return _outcome(con, table, column, f"timestamp inside {span}", bad, params)
